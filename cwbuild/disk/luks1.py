"""LUKS1 header: build and parse (LUKS1 On-Disk Format Specification 1.2.3, §2 and Table 1/Table 2).

The partition header ("phdr") is 592 bytes, big-endian:

| offset | field | size | | offset | field | size |
|---|---|---|---|---|---|---|
| 0 | magic `LUKS\\xba\\xbe` | 6 | | 104 | payload-offset (sectors) | 4 |
| 6 | version (1) | 2 | | 108 | key-bytes | 4 |
| 8 | cipher-name | 32 | | 112 | mk-digest | 20 |
| 40 | cipher-mode | 32 | | 132 | mk-digest-salt | 32 |
| 72 | hash-spec | 32 | | 164 | mk-digest-iter | 4 |
| | | | | 168 | uuid | 40 |
| 208 | key-slot 0..7, 48 bytes each: active, iterations, salt[32], key-material-offset, stripes | | | | | |

Layout written (cryptsetup's, 512-bit key): key material of slot i at sector 8 + 504*i (each slot's 500
sectors rounded to 4 KiB), payload at sector 4096 (1 MiB alignment). luksy uses 4040 (cw-format.md §3.1);
both are read.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib

from cwbuild.disk import af
from cwbuild.disk.header import (
    LUKS_SECTOR,
    UUID_RE,
    Keyslot,
    LuksHeader,
    VolumeDigest,
    check_areas,
    check_cipher,
)
from cwbuild.disk.kdf import HASHES, KdfSpec, KdfType, pbkdf2
from cwbuild.errors import FormatError

MAGIC = b"LUKS\xba\xbe"
_PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")  # Table 1, up to the key slots
_SLOT = struct.Struct(">II32sII")  # Table 2
PHDR_SIZE = _PHDR.size + 8 * _SLOT.size
assert PHDR_SIZE == 592  # LUKS1 spec §2.1
SLOT_ACTIVE = 0x00AC71F3  # LUKS_KEY_ENABLED
SLOT_DISABLED = 0x0000DEAD  # LUKS_KEY_DISABLED
NUM_SLOTS = 8
DIGEST_SIZE = 20  # LUKS_DIGESTSIZE
SALT_SIZE = 32  # LUKS_SALTSIZE
FIRST_SLOT_SECTOR = 8  # 4 KiB aligned, after the phdr
ALIGN_SECTORS = 8  # key material areas aligned to 4 KiB
PAYLOAD_ALIGN_SECTORS = 2048  # 1 MiB payload alignment (cryptsetup default)


def _cstr(raw: bytes, what: str) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"LUKS1 {what} is not ASCII") from None


def layout(key_size: int) -> tuple[list[int], int]:
    """(key-material sector of each slot, payload sector) as cryptsetup lays them out."""
    material = -(-key_size * af.STRIPES // LUKS_SECTOR)
    step = material + (-material % ALIGN_SECTORS)
    offsets = [FIRST_SLOT_SECTOR + i * step for i in range(NUM_SLOTS)]
    end = offsets[-1] + step
    return offsets, end + (-end % PAYLOAD_ALIGN_SECTORS)


def build(
    *, volume_key: bytes, kdf: KdfSpec, salt: bytes, uuid: str, digest_salt: bytes
) -> tuple[bytes, int, int]:
    """(phdr bytes, key-material offset in bytes, payload offset in bytes) for one active slot 0.

    The caller writes slot 0's encrypted AF material at the returned offset (see luks.py).
    """
    if kdf.type is not KdfType.PBKDF2:
        raise FormatError("LUKS1 keyslots use pbkdf2 only")
    offsets, payload = layout(len(volume_key))
    mk_digest = pbkdf2(kdf.hash, volume_key, digest_salt, kdf.iterations, DIGEST_SIZE)
    head = _PHDR.pack(
        MAGIC,
        1,
        b"aes",
        b"xts-plain64",
        kdf.hash.encode(),
        payload,
        len(volume_key),
        mk_digest,
        digest_salt,
        kdf.iterations,
        uuid.encode(),
    )
    slots = [_SLOT.pack(SLOT_ACTIVE, kdf.iterations, salt, offsets[0], af.STRIPES)]
    slots += [_SLOT.pack(SLOT_DISABLED, 0, bytes(SALT_SIZE), off, af.STRIPES) for off in offsets[1:]]
    return head + b"".join(slots), offsets[0] * LUKS_SECTOR, payload * LUKS_SECTOR


def new_uuid() -> str:
    return str(uuidlib.UUID(bytes=os.urandom(16), version=4))


def parse(data: bytes, device_size: int) -> LuksHeader:
    """Parse and check a LUKS1 phdr (`data` = at least the first 592 bytes of the device)."""
    if len(data) < PHDR_SIZE:
        raise FormatError(f"LUKS1 header truncated: {len(data)} of {PHDR_SIZE} bytes")
    fields = _PHDR.unpack_from(data, 0)
    magic, version, cname, cmode, hspec, payload, key_bytes, mk_digest, mk_salt, mk_iter, raw_uuid = fields
    if magic != MAGIC or version != 1:
        raise FormatError("not a LUKS1 header")
    cipher = f"{_cstr(cname, 'cipher-name')}-{_cstr(cmode, 'cipher-mode')}"
    check_cipher(cipher, key_bytes, "LUKS1")
    hash_name = _cstr(hspec, "hash-spec")
    if hash_name not in HASHES:
        raise FormatError(f"LUKS1 hash-spec {hash_name!r} is not supported")
    uuid = _cstr(raw_uuid, "uuid")
    if not UUID_RE.match(uuid):
        raise FormatError("LUKS1 uuid is malformed")
    payload_offset = payload * LUKS_SECTOR
    if payload_offset > device_size:
        raise FormatError(f"LUKS1 payload offset {payload_offset} is beyond the end of the device")
    if mk_iter < 1:
        raise FormatError("LUKS1 mk-digest-iter is zero")
    slots = tuple(_parse_slots(data, key_bytes, hash_name, cipher))
    check_areas(slots, PHDR_SIZE, payload_offset)
    if not slots:
        raise FormatError("LUKS1 header has no active keyslot")
    return LuksHeader(
        version=1,
        uuid=uuid,
        label="",
        cipher=cipher,
        key_size=key_bytes,
        sector_size=LUKS_SECTOR,
        payload_offset=payload_offset,
        payload_size=None,
        iv_tweak=0,
        keyslots=slots,
        digest=VolumeDigest(hash_name, mk_iter, mk_salt, mk_digest),
        metadata_size=PHDR_SIZE,
    )


def _parse_slots(data: bytes, key_bytes: int, hash_name: str, cipher: str) -> list[Keyslot]:
    slots = []
    for i in range(NUM_SLOTS):
        active, iterations, salt, offset, stripes = _SLOT.unpack_from(data, _PHDR.size + i * _SLOT.size)
        if active == SLOT_DISABLED:
            continue
        if active != SLOT_ACTIVE:
            raise FormatError(f"LUKS1 keyslot {i} has an invalid state 0x{active:08x}")
        if stripes != af.STRIPES or iterations < 1:
            raise FormatError(
                f"LUKS1 keyslot {i}: stripes {stripes} (expected {af.STRIPES}) or no iterations"
            )
        kdf = KdfSpec(KdfType.PBKDF2, hash=hash_name, iterations=iterations)
        material = key_bytes * stripes
        slots.append(
            Keyslot(
                index=i,
                kdf=kdf,
                salt=salt,
                area_offset=offset * LUKS_SECTOR,
                area_size=material + (-material % LUKS_SECTOR),
                area_cipher=cipher,
                area_key_size=key_bytes,
                key_size=key_bytes,
                stripes=stripes,
                af_hash=hash_name,
            )
        )
    return slots

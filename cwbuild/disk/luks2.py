"""LUKS2 header: build and parse (LUKS2 On-Disk Format Specification 1.1.x, §2 binary header, §3 JSON).

Binary header (§2.1, 4096 bytes, big-endian), one at offset 0 and a copy at offset hdr_size:

| offset | field | size | | offset | field | size |
|---|---|---|---|---|---|---|
| 0 | magic `LUKS\\xba\\xbe` / `SKUL\\xba\\xbe` | 6 | | 168 | uuid | 40 |
| 6 | version (2) | 2 | | 208 | subsystem | 48 |
| 8 | hdr_size (binary + JSON) | 8 | | 256 | hdr_offset | 8 |
| 16 | seqid | 8 | | 264 | reserved_0x108 | 184 |
| 24 | label | 48 | | 448 | csum | 64 |
| 72 | checksum_alg | 32 | | 512 | reserved_0x200 | 3584 |
| 104 | salt | 64 | | | | |

The checksum (§2.2) is checksum_alg over the hdr_size bytes of binary header + JSON area with csum zeroed.
The JSON area follows each binary header, NUL-padded, json_size = hdr_size - 4096.

Layout written (cryptsetup 2.x defaults): hdr_size 16 KiB, keyslots area from 32 KiB to 16 MiB, one
keyslot (AF stripes 4000, its area 258048 bytes at 32 KiB), data segment at 16 MiB.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from typing import Any

from cwbuild.disk import af
from cwbuild.disk.header import UUID_RE, Keyslot, LuksHeader, VolumeDigest, check_areas, check_cipher
from cwbuild.disk.kdf import HASHES, KdfSpec, KdfType
from cwbuild.errors import FormatError

MAGIC_1 = b"LUKS\xba\xbe"
MAGIC_2 = b"SKUL\xba\xbe"
_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s3584s")
BIN_SIZE = 4096
assert _BIN.size == BIN_SIZE
CSUM_OFFSET = 448
CSUM_SIZE = 64
#: §2.1: the allowed hdr_size values, which are also where a secondary header may sit.
HDR_SIZES = tuple(0x4000 << i for i in range(9))  # 16 KiB .. 4 MiB
DEFAULT_HDR_SIZE = 0x4000
KEYSLOTS_OFFSET = 2 * DEFAULT_HDR_SIZE
DATA_OFFSET = 16 * 1024 * 1024
MAX_KEYSLOTS = 32  # LUKS2 spec §3.2: keyslot ids 0..31
MAX_JSON_DEPTH = 16  # our JSON is 4 levels deep; anything deeper is hostile
_UINT_RE = re.compile(r"^[0-9]{1,20}$")
_U64_MAX = (1 << 64) - 1


def _pad(text: str, size: int) -> bytes:
    raw = text.encode("ascii")
    if len(raw) >= size:
        raise FormatError(f"{text!r} does not fit in {size} bytes")
    return raw + bytes(size - len(raw))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def binary_header(
    *, primary: bool, hdr_size: int, seqid: int, label: str, salt: bytes, uuid: str
) -> bytearray:
    """A binary header with csum zeroed (the caller fills it after adding the JSON area)."""
    packed = _BIN.pack(
        MAGIC_1 if primary else MAGIC_2,
        2,
        hdr_size,
        seqid,
        _pad(label, 48),
        _pad("sha256", 32),
        salt,
        _pad(uuid, 40),
        bytes(48),
        0 if primary else hdr_size,
        bytes(184),
        bytes(CSUM_SIZE),
        bytes(3584),
    )
    return bytearray(packed)


def seal(header: bytearray, json_text: str, hdr_size: int) -> bytes:
    """Binary header + NUL-padded JSON area with the sha256 checksum filled in (§2.2)."""
    raw = json_text.encode("ascii")
    if len(raw) >= hdr_size - BIN_SIZE:
        raise FormatError("LUKS2 JSON does not fit in the metadata area")
    area = header + raw + bytes(hdr_size - BIN_SIZE - len(raw))
    digest = hashlib.sha256(area).digest()
    area[CSUM_OFFSET : CSUM_OFFSET + len(digest)] = digest
    return bytes(area)


def metadata_json(  # noqa: PLR0913 - keyword-only parts of one keyslot + one segment
    *,
    key_size: int,
    kdf: KdfSpec,
    kdf_salt: bytes,
    digest: VolumeDigest,
    sector_size: int,
    area_offset: int,
    area_size: int,
) -> str:
    """The §3 JSON for one luks2 keyslot, one crypt segment, one pbkdf2 digest."""
    doc = {
        "keyslots": {"0": _keyslot_json(key_size, kdf, kdf_salt, area_offset, area_size)},
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": str(DATA_OFFSET),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": "aes-xts-plain64",
                "sector_size": sector_size,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": ["0"],
                "segments": ["0"],
                "hash": digest.hash,
                "iterations": digest.iterations,
                "salt": _b64(digest.salt),
                "digest": _b64(digest.value),
            }
        },
        "config": {
            "json_size": str(DEFAULT_HDR_SIZE - BIN_SIZE),
            "keyslots_size": str(DATA_OFFSET - KEYSLOTS_OFFSET),
        },
    }
    return json.dumps(doc, separators=(",", ":"))


def _keyslot_json(
    key_size: int, kdf: KdfSpec, salt: bytes, area_offset: int, area_size: int
) -> dict[str, Any]:
    """§3.2 keyslot object: a luks2 keyslot with AF stripes 4000 (sha256) in a raw aes-xts-plain64 area."""
    kdf_json: dict[str, Any] = {"type": str(kdf.type), "salt": _b64(salt)}
    if kdf.type is KdfType.PBKDF2:
        kdf_json |= {"hash": kdf.hash, "iterations": kdf.iterations}
    else:
        kdf_json |= {"time": kdf.time, "memory": kdf.memory_kib, "cpus": kdf.cpus}
    area = {
        "type": "raw",
        "offset": str(area_offset),
        "size": str(area_size),
        "encryption": "aes-xts-plain64",
        "key_size": key_size,
    }
    af_json = {"type": "luks1", "stripes": af.STRIPES, "hash": "sha256"}
    return {"type": "luks2", "key_size": key_size, "af": af_json, "area": area, "kdf": kdf_json}


# ---------------------------------------------------------------------------------------------- reading


def _cstr(raw: bytes, what: str) -> str:
    try:
        return raw.split(b"\0", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"LUKS2 {what} is not ASCII") from None


def _check_one(area: bytes, offset: int) -> tuple[int, int, str, str, bytes] | None:
    """(hdr_size, seqid, uuid, label, area) when the header at `offset` is intact, else None.

    `area` must start with the binary header; it is read up to hdr_size if long enough.
    """
    if len(area) < BIN_SIZE:
        return None
    fields = _BIN.unpack_from(area, 0)
    magic, version, hdr_size, seqid, label, csum_alg, _, uuid = fields[:8]
    hdr_offset, csum = fields[9], fields[11]
    if magic != (MAGIC_1 if offset == 0 else MAGIC_2) or version != 2:
        return None
    if hdr_size not in HDR_SIZES or hdr_offset != offset or len(area) < hdr_size:
        return None
    alg = _cstr(csum_alg, "checksum_alg")
    if alg not in HASHES:
        return None
    blank = bytearray(area[:hdr_size])
    blank[CSUM_OFFSET : CSUM_OFFSET + CSUM_SIZE] = bytes(CSUM_SIZE)
    digest = hashlib.new(HASHES[alg], blank).digest()
    if csum[: len(digest)] != digest or any(csum[len(digest) :]):
        return None
    return hdr_size, seqid, _cstr(uuid, "uuid"), _cstr(label, "label"), bytes(area[:hdr_size])


def pick_header(read_at: Any, device_size: int) -> tuple[int, int, str, str, bytes]:
    """The valid header copy with the highest seqid (§2.3), trying the secondary at every allowed offset.

    `read_at(offset, size)` returns at most `size` bytes; nothing larger than 4 MiB is ever read.
    """
    candidates = []
    first = read_at(0, BIN_SIZE)
    if len(first) < BIN_SIZE:
        raise FormatError(f"LUKS2 header truncated: {len(first)} of {BIN_SIZE} bytes")
    claimed = struct.unpack_from(">Q", first, 8)[0]
    if claimed in HDR_SIZES and claimed <= device_size:
        found = _check_one(read_at(0, claimed), 0)
        if found:
            candidates.append(found)
    for off in HDR_SIZES:
        if off + BIN_SIZE > device_size or (candidates and off != candidates[0][0]):
            continue
        head = read_at(off, BIN_SIZE)
        if len(head) == BIN_SIZE and head[:6] == MAGIC_2:
            size = struct.unpack_from(">Q", head, 8)[0]
            if size in HDR_SIZES and off + size <= device_size:
                found = _check_one(read_at(off, size), off)
                if found:
                    candidates.append(found)
    if not candidates:
        raise FormatError("no intact LUKS2 header: both checksums are wrong or the header is truncated")
    return max(candidates, key=lambda c: c[1])


def _depth_ok(text: str) -> bool:
    depth = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "}]":
            depth -= 1
    return True


def load_json(area: bytes) -> dict[str, Any]:
    raw = area[BIN_SIZE:].split(b"\0", 1)[0]
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("LUKS2 JSON area is not ASCII") from None
    if not _depth_ok(text):
        raise FormatError(f"LUKS2 JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"LUKS2 JSON is malformed: {str(exc)[:80]}") from None
    if not isinstance(doc, dict):
        raise FormatError("LUKS2 JSON is not an object")
    return doc


def _obj(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise FormatError(f"LUKS2 {where}.{key} is missing or not an object")
    return value


def _str(parent: dict[str, Any], key: str, where: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str) or len(value) > 256:
        raise FormatError(f"LUKS2 {where}.{key} is missing or not a short string")
    return value


def _int(parent: dict[str, Any], key: str, where: str, lo: int = 0, hi: int = _U64_MAX) -> int:
    """An integer field; LUKS2 writes uint64 values as decimal strings (§3.1), small ones as numbers."""
    value = parent.get(key)
    if isinstance(value, str) and _UINT_RE.match(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FormatError(f"LUKS2 {where}.{key} is missing or out of range {lo}..{hi}")
    return value


def _bytes(parent: dict[str, Any], key: str, where: str, max_len: int = 64) -> bytes:
    text = _str(parent, key, where)
    try:
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"LUKS2 {where}.{key} is not base64") from None
    if not 1 <= len(value) <= max_len:
        raise FormatError(f"LUKS2 {where}.{key} has {len(value)} bytes")
    return value


def _kdf(slot: dict[str, Any], where: str) -> tuple[KdfSpec, bytes]:
    kdf = _obj(slot, "kdf", where)
    kind = _str(kdf, "type", where + ".kdf")
    salt = _bytes(kdf, "salt", where + ".kdf")
    if kind == KdfType.PBKDF2:
        hash_name = _str(kdf, "hash", where + ".kdf")
        if hash_name not in HASHES:
            raise FormatError(f"LUKS2 {where}: unsupported kdf hash {hash_name!r}")
        return KdfSpec(KdfType.PBKDF2, hash=hash_name, iterations=_int(kdf, "iterations", where, 1)), salt
    if kind in (KdfType.ARGON2I, KdfType.ARGON2ID):
        spec = KdfSpec(
            KdfType(kind),
            time=_int(kdf, "time", where, 1, 1 << 32),
            memory_kib=_int(kdf, "memory", where, 8, 1 << 32),
            cpus=_int(kdf, "cpus", where, 1, 1 << 24),
        )
        return spec, salt
    raise FormatError(f"LUKS2 {where}: unsupported kdf type {kind!r}")


def _keyslot(index: str, slot: dict[str, Any]) -> Keyslot:
    where = f"keyslots.{index}"
    if _str(slot, "type", where) != "luks2":
        raise FormatError(f"LUKS2 {where}: unsupported keyslot type")
    key_size = _int(slot, "key_size", where, 1, 512)
    afj, area = _obj(slot, "af", where), _obj(slot, "area", where)
    if _str(afj, "type", where + ".af") != "luks1":
        raise FormatError(f"LUKS2 {where}: unsupported af type")
    af_hash = _str(afj, "hash", where + ".af")
    if af_hash not in HASHES:
        raise FormatError(f"LUKS2 {where}: unsupported af hash {af_hash!r}")
    stripes = _int(afj, "stripes", where + ".af", 1, 1 << 32)
    if stripes != af.STRIPES:
        raise FormatError(f"LUKS2 {where}: {stripes} AF stripes (expected {af.STRIPES})")
    if _str(area, "type", where + ".area") != "raw":
        raise FormatError(f"LUKS2 {where}: unsupported area type")
    area_cipher = _str(area, "encryption", where + ".area")
    area_key_size = _int(area, "key_size", where + ".area", 1, 512)
    check_cipher(area_cipher, area_key_size, f"LUKS2 {where}.area")
    kdf, salt = _kdf(slot, where)
    return Keyslot(
        index=int(index),
        kdf=kdf,
        salt=salt,
        area_offset=_int(area, "offset", where + ".area"),
        area_size=_int(area, "size", where + ".area"),
        area_cipher=area_cipher,
        area_key_size=area_key_size,
        key_size=key_size,
        stripes=stripes,
        af_hash=af_hash,
    )


def parse(hdr: tuple[int, int, str, str, bytes], device_size: int) -> LuksHeader:
    """Check the JSON of a header chosen by `pick_header` and return its facts."""
    hdr_size, seqid, uuid, label, area = hdr
    if not UUID_RE.match(uuid):
        raise FormatError("LUKS2 uuid is malformed")
    doc = load_json(area)
    config = _obj(doc, "config", "")
    if _int(config, "json_size", "config") != hdr_size - BIN_SIZE:
        raise FormatError("LUKS2 config.json_size does not match hdr_size")
    keyslots_size = _int(config, "keyslots_size", "config", 0, device_size)
    requirements = config.get("requirements")
    if isinstance(requirements, dict) and requirements.get("mandatory"):
        raise FormatError(
            "LUKS2 header has mandatory requirements (e.g. reencryption) that are not supported"
        )
    ks_end = 2 * hdr_size + keyslots_size
    segment = _segment(_obj(doc, "segments", ""), ks_end, device_size)
    digest, slot_ids = _digest(_obj(doc, "digests", ""))
    slots_json = _obj(doc, "keyslots", "")
    if len(slots_json) > MAX_KEYSLOTS:
        raise FormatError(f"LUKS2 header lists {len(slots_json)} keyslots (at most {MAX_KEYSLOTS})")
    slots = []
    for index, slot in slots_json.items():
        if not (isinstance(index, str) and index.isdigit() and int(index) < MAX_KEYSLOTS):
            raise FormatError(f"LUKS2 keyslot id {index!r} is invalid")
        if not isinstance(slot, dict):
            raise FormatError(f"LUKS2 keyslots.{index} is not an object")
        if index in slot_ids:
            slots.append(_keyslot(index, slot))
    slots.sort(key=lambda k: k.index)
    check_areas(tuple(slots), 2 * hdr_size, ks_end)
    key_sizes = {k.key_size for k in slots}
    if not slots or len(key_sizes) != 1:
        raise FormatError("LUKS2 header has no usable keyslot bound to the segment digest")
    key_size = key_sizes.pop()
    check_cipher(segment[3], key_size, "LUKS2 segment")
    return LuksHeader(
        version=2,
        uuid=uuid,
        label=label,
        cipher=segment[3],
        key_size=key_size,
        sector_size=segment[4],
        payload_offset=segment[0],
        payload_size=segment[1],
        iv_tweak=segment[2],
        keyslots=tuple(slots),
        digest=digest,
        metadata_size=hdr_size,
        seqid=seqid,
    )


def _segment(
    segments: dict[str, Any], ks_end: int, device_size: int
) -> tuple[int, int | None, int, str, int]:
    if list(segments) != ["0"]:
        raise FormatError("LUKS2 header must have exactly one segment '0' (reencryption is not supported)")
    seg = _obj(segments, "0", "segments")
    where = "segments.0"
    if _str(seg, "type", where) != "crypt":
        raise FormatError("LUKS2 segment 0 is not of type crypt")
    sector_size = _int(seg, "sector_size", where, 512, 4096)
    if sector_size not in (512, 1024, 2048, 4096):
        raise FormatError(f"LUKS2 segment sector_size {sector_size} is invalid")
    offset = _int(seg, "offset", where)
    if offset < ks_end or offset % 512 or offset > device_size:
        raise FormatError(f"LUKS2 segment offset {offset} overlaps the metadata or lies beyond the device")
    raw_size = seg.get("size")
    size = None if raw_size == "dynamic" else _int(seg, "size", where)
    if size is not None and (size % sector_size or offset + size > device_size):
        raise FormatError(f"LUKS2 segment size {size} is misaligned or beyond the device")
    iv_tweak = _int(seg, "iv_tweak", where)
    if "integrity" in seg or seg.get("flags"):
        raise FormatError("LUKS2 segment uses integrity or flags, which are not supported")
    return offset, size, iv_tweak, _str(seg, "encryption", where), sector_size


def _digest(digests: dict[str, Any]) -> tuple[VolumeDigest, set[str]]:
    if len(digests) != 1:
        raise FormatError("LUKS2 header must have exactly one digest")
    (key,) = digests
    d = _obj(digests, key, "digests")
    where = f"digests.{key}"
    if _str(d, "type", where) != "pbkdf2":
        raise FormatError("LUKS2 digest is not pbkdf2")
    hash_name = _str(d, "hash", where)
    if hash_name not in HASHES:
        raise FormatError(f"LUKS2 digest hash {hash_name!r} is not supported")
    slots, segments = d.get("keyslots"), d.get("segments")
    if not isinstance(slots, list) or not isinstance(segments, list) or segments != ["0"]:
        raise FormatError("LUKS2 digest must bind keyslots to segment 0")
    if len(slots) > MAX_KEYSLOTS or not all(isinstance(s, str) for s in slots):
        raise FormatError("LUKS2 digest keyslots list is malformed")
    digest = VolumeDigest(
        hash_name, _int(d, "iterations", where, 1), _bytes(d, "salt", where), _bytes(d, "digest", where)
    )
    return digest, set(slots)

"""LUKS2 / LUKS1 containers written and read in userspace: header, keyslot, streamed AES-XTS payload.

`encrypt_image` turns a plaintext file (the ext4 image) into a LUKS container that cryptsetup and the
kernel's dm-crypt open; `read_header` + `unlock` + `decrypt_image` do the reverse for images made by us,
cryptsetup or luksy. UUID, salts and the volume key are fresh random every time (DESIGN.md). The payload
is streamed chunk by chunk (xts.crypt_span), so memory stays flat whatever the disk size; its sha256, when
asked for, is computed from the bytes as they are written. The output is written to a private temporary
file beside OUT and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cwbuild.disk import af, footer, luks1, luks2
from cwbuild.disk.header import LUKS_SECTOR, Keyslot, LuksHeader, VolumeDigest
from cwbuild.disk.kdf import KdfLimits, KdfSpec, KdfType, derive, pbkdf2
from cwbuild.disk.xts import SECTOR_SIZES, SectorCrypt, Span, XtsParams, crypt_span
from cwbuild.errors import DiskError, FormatError
from cwbuild.interrupts import deferred

VOLUME_KEY_SIZE = 64  # aes-xts-plain64 with a 512-bit key (DESIGN.md; cw-format.md §1.7)
SALT_SIZE = 32  # LUKS1 LUKS_SALTSIZE; cryptsetup uses 32-byte salts in LUKS2 too
DIGEST_ITERATIONS = 1000  # volume-key digest: the key is 512 random bits, the floor is plenty
LUKS2_DIGEST_SIZE = 32  # sha256 output, as cryptsetup stores it


class LuksFormat(StrEnum):
    LUKS2 = "luks2"
    LUKS1 = "luks1"


@dataclass(frozen=True)
class LuksSpec:
    """How to format: LUKS version, payload sector size (LUKS1: always 512), keyslot KDF, label."""

    format: LuksFormat = LuksFormat.LUKS2
    sector_size: int = 4096
    kdf: KdfSpec = field(default_factory=lambda: KdfSpec(KdfType.PBKDF2))
    label: str = ""

    def __post_init__(self) -> None:
        if self.sector_size not in SECTOR_SIZES:
            raise DiskError(f"sector size {self.sector_size} is not one of {SECTOR_SIZES}")
        if self.format is LuksFormat.LUKS1 and self.sector_size != LUKS_SECTOR:
            raise DiskError("LUKS1 uses 512-byte sectors only")
        if len(self.label.encode()) >= 48:
            raise DiskError("LUKS2 label is limited to 47 bytes")
        self.kdf.check_writable()


@dataclass(frozen=True)
class Artifact:
    """A file a step produced: where, how big, and (when asked for) its sha256."""

    path: Path
    size: int
    sha256: str | None = None


Progress = Callable[[int], None]


@contextmanager
def _private_output(out: Path) -> Iterator[tuple[Path, int]]:
    """A 0600 temp file beside `out`, renamed onto `out` on success and removed on any failure."""
    tmp = out.with_name(f".{out.name}.{os.urandom(6).hex()}.tmp")
    fd = -1
    try:
        with deferred():  # a SIGTERM right after the open is acted on inside the try, where it is undone
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        yield tmp, fd
        # No fsync: like cryptsetup, luksy and cp, durability is left to the caller (a 1 GiB fsync costs
        # seconds on a slow disk); the rename still keeps a half-written file from ever appearing as OUT.
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:  # ours (O_EXCL): never a file someone else made under the same name
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def _encrypt_material(volume_key: bytes, kdf: KdfSpec, passphrase: bytes, salt: bytes) -> bytes:
    """The keyslot area content: AF-split volume key encrypted with the passphrase-derived key."""
    slot_key = derive(kdf, passphrase, salt, len(volume_key))
    material = bytearray(af.split(volume_key, af.STRIPES, "sha256"))
    material.extend(bytes(-len(material) % LUKS_SECTOR))
    with SectorCrypt(XtsParams(slot_key, LUKS_SECTOR), encrypt=True) as crypt:
        crypt.run(material, 0)
    return bytes(material)


def build_header(spec: LuksSpec, volume_key: bytes, passphrase: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """(pieces to write at their offsets, payload offset): everything before the payload.

    Pure apart from randomness; the unwritten parts of the metadata area stay zero.
    """
    salt, digest_salt = os.urandom(SALT_SIZE), os.urandom(SALT_SIZE)
    material = _encrypt_material(volume_key, spec.kdf, passphrase, salt)
    uuid = luks1.new_uuid()
    if spec.format is LuksFormat.LUKS1:
        phdr, material_at, payload = luks1.build(
            volume_key=volume_key, kdf=spec.kdf, salt=salt, uuid=uuid, digest_salt=digest_salt
        )
        return [(0, phdr), (material_at, material)], payload
    digest = VolumeDigest(
        "sha256",
        DIGEST_ITERATIONS,
        digest_salt,
        pbkdf2("sha256", volume_key, digest_salt, DIGEST_ITERATIONS, LUKS2_DIGEST_SIZE),
    )
    text = luks2.metadata_json(
        key_size=len(volume_key),
        kdf=spec.kdf,
        kdf_salt=salt,
        digest=digest,
        sector_size=spec.sector_size,
        area_offset=luks2.KEYSLOTS_OFFSET,
        area_size=len(material) + (-len(material) % 4096),
    )
    size = luks2.DEFAULT_HDR_SIZE
    pieces = []
    for primary in (True, False):
        head = luks2.binary_header(
            primary=primary, hdr_size=size, seqid=1, label=spec.label, salt=os.urandom(64), uuid=uuid
        )
        pieces.append((0 if primary else size, luks2.seal(head, text, size)))
    pieces.append((luks2.KEYSLOTS_OFFSET, material))
    return pieces, luks2.DATA_OFFSET


def encrypt_image(  # noqa: PLR0913 - keyword-only options of one step
    plain: Path,
    out: Path,
    *,
    spec: LuksSpec,
    passphrase: bytes,
    krun_footer: bytes | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    digest: bool = False,
    direct: bool = True,
) -> Artifact:
    """Write `out`: a LUKS container of `plain` (zero-padded to whole sectors), optionally with the krun
    footer (spec §1.5) after the payload. Returns its size, and with `digest` its sha256, computed from the
    bytes as they are written (header area with its zero gaps, payload, footer: the file in order), so
    nothing is read back. `direct`: the payload written with O_DIRECT where the file system takes it
    (xts.crypt_span), faster unless the file is read again soon (then the page cache's copy pays off).
    The volume key never leaves this function."""
    if not passphrase:
        raise DiskError("the passphrase is empty")
    length = plain.stat().st_size
    padded = length + (-length % spec.sector_size)
    volume_key = os.urandom(VOLUME_KEY_SIZE)
    pieces, payload = build_header(spec, volume_key, passphrase)
    tail = footer.encode(krun_footer, payload + padded) if krun_footer is not None else b""
    total = payload + padded + len(tail)
    sha = hashlib.sha256() if digest else None
    with _private_output(out) as (tmp, fd):
        os.ftruncate(fd, total)
        for offset, data in pieces:
            os.pwrite(fd, data, offset)
        if tail:
            os.pwrite(fd, tail, payload + padded)
        if sha is not None:
            _hash_layout(sha, pieces, payload)
        span = Span(str(plain), str(tmp), 0, payload, length)
        params = XtsParams(volume_key, spec.sector_size)
        crypt_span(
            span, params=params, encrypt=True, workers=workers, progress=progress, digest=sha, direct=direct
        )
        if sha is not None:
            sha.update(tail)
    return Artifact(out, total, sha.hexdigest() if sha is not None else None)


def _hash_layout(sha: hashlib._Hash, pieces: list[tuple[int, bytes]], end: int) -> None:
    """Feed `sha` bytes [0, end) of a file holding `pieces` at their offsets and zeros in between (what
    ftruncate left: the metadata area's unwritten parts)."""
    zeros = memoryview(bytes(1 << 20))
    pos = 0
    for offset, data in [*sorted(pieces), (end, b"")]:
        if offset < pos or offset + len(data) > end:
            raise DiskError("LUKS header pieces overlap or pass the payload offset")  # a bug, not input
        while pos < offset:
            step = min(len(zeros), offset - pos)
            sha.update(zeros[:step])
            pos += step
        sha.update(data)
        pos += len(data)


def read_header(path: Path) -> LuksHeader:
    """Parse the LUKS1 or LUKS2 header of `path` (a regular file or block device), bounded and checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DiskError(f"cannot open {path}: {exc.strerror}") from None
    try:
        size = _device_size(fd)

        def read_at(offset: int, n: int) -> bytes:
            return os.pread(fd, n, offset)

        head = read_at(0, luks1.PHDR_SIZE)
        if head[:6] == luks1.MAGIC and head[6:8] == b"\0\1":
            return luks1.parse(head, size)
        return luks2.parse(luks2.pick_header(read_at, size), size)
    finally:
        os.close(fd)


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _try_slot(fd: int, slot: Keyslot, passphrase: bytes, digest: VolumeDigest) -> bytes | None:
    slot_key = derive(slot.kdf, passphrase, slot.salt, slot.area_key_size)
    material = bytearray(os.pread(fd, slot.material_size, slot.area_offset))
    if len(material) != slot.material_size:
        raise FormatError(f"keyslot {slot.index}: key material is truncated")
    with SectorCrypt(
        XtsParams(slot_key, LUKS_SECTOR, plain64=slot.area_cipher.endswith("64")), encrypt=False
    ) as c:
        c.run(material, 0)
    candidate = af.merge(bytes(material), slot.key_size, slot.stripes, slot.af_hash)
    check = pbkdf2(digest.hash, candidate, digest.salt, digest.iterations, len(digest.value))
    return candidate if hmac.compare_digest(check, digest.value) else None


def unlock(path: Path, header: LuksHeader, passphrase: bytes, *, limits: KdfLimits | None = None) -> bytes:
    """The volume key, from the first keyslot the passphrase opens; `DiskError` when none does.

    Every KDF cost is checked against `limits` before it runs.
    """
    limits = limits or KdfLimits()
    if header.digest.iterations > limits.max_iterations:
        raise FormatError(f"volume key digest iterations {header.digest.iterations} exceed the limit")
    for slot in header.keyslots:
        limits.check(slot.kdf, f"keyslot {slot.index}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for slot in header.keyslots:
            key = _try_slot(fd, slot, passphrase, header.digest)
            if key is not None:
                return key
    finally:
        os.close(fd)
    raise DiskError(f"no keyslot of {path} accepts this passphrase")


def payload_length(path: Path, header: LuksHeader) -> int:
    """Bytes of payload: the segment size, or to the end of the device minus a krun footer, in sectors."""
    if header.payload_size is not None:
        return header.payload_size
    end = path.stat().st_size if path.is_file() else _size_of(path)
    found = footer.locate(path, header.sector_size)
    if found is not None:
        end = found
    n = end - header.payload_offset
    return max(0, n - n % header.sector_size)


def _size_of(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _device_size(fd)
    finally:
        os.close(fd)


def decrypt_image(
    image: Path,
    out: Path,
    *,
    passphrase: bytes,
    limits: KdfLimits | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Artifact:
    """Write the plaintext payload of `image` to `out` (0600, renamed into place when complete)."""
    header = read_header(image)
    key = unlock(image, header, passphrase, limits=limits)
    length = payload_length(image, header)
    first = header.iv_tweak  # in 512-byte units like dm-crypt's iv_offset
    with _private_output(out) as (tmp, fd):
        os.ftruncate(fd, length)
        span = Span(str(image), str(tmp), header.payload_offset, 0, length, first_iv=first)
        params = XtsParams(key, header.sector_size, plain64=header.plain64)
        crypt_span(span, params=params, encrypt=False, workers=workers, progress=progress)
    return Artifact(out, length)

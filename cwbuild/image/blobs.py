"""Content-addressed blobs: digests, streams checked against their digest while they are read, decompression.

A blob is trusted only once its last byte has been read and its sha256 equals the descriptor's digest (OCI
image-spec v1.1, descriptor.md "Digests": `algorithm ":" encoded`, sha256 encoded as 64 lowercase hex). Every
stream is bounded by its declared size: a blob longer than declared fails at the first extra byte, a shorter
one at end of file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import BinaryIO, cast

import zstandard

from cwbuild.errors import DigestMismatchError, FormatError, ImageError

#: OCI image-spec v1.1 descriptor.md: sha256 is the only algorithm registered as REQUIRED; sha512 is optional
#: and not used by Podman, so we refuse it rather than half-support it.
_DIGEST_RE = re.compile(r"sha256:([a-f0-9]{64})")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Digest:
    """A `sha256:<hex>` digest."""

    hex: str

    @classmethod
    def parse(cls, text: object) -> Digest:
        if not isinstance(text, str) or not _DIGEST_RE.fullmatch(text):
            raise FormatError(f"invalid digest {str(text)[:80]!r}", hint="expected sha256:<64 lowercase hex>")
        return cls(text[7:])

    def __str__(self) -> str:
        return f"sha256:{self.hex}"


class Compression(StrEnum):
    """Layer compression, named by the media type suffix (OCI image-spec v1.1 layer.md, media-types.md)."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"

    @classmethod
    def sniff(cls, head: bytes) -> Compression:
        """By magic number: gzip 1f 8b (RFC 1952 2.3.1), zstd 28 b5 2f fd (RFC 8878 3.1.1)."""
        if head.startswith(b"\x1f\x8b"):
            return cls.GZIP
        if head.startswith(b"\x28\xb5\x2f\xfd"):
            return cls.ZSTD
        return cls.NONE


class HashingReader(io.RawIOBase):
    """Reads `raw`, hashing every byte; never more than `limit` bytes (a longer stream is an error)."""

    def __init__(self, raw: BinaryIO, *, limit: int, what: str) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self._what = what
        self.hash = hashlib.sha256()
        self.count = 0
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override] # RawIOBase's Buffer
        data = self._raw.read(min(len(buffer), self._limit - self.count + 1))
        if not data:
            self.eof = True
            return 0
        self.count += len(data)
        if self.count > self._limit:
            raise DigestMismatchError(f"{self._what} is longer than its declared size {self._limit}")
        self.hash.update(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to end of stream (the rest is hashed and counted)."""
        while self.read(CHUNK):
            pass


def check(reader: HashingReader, *, digest: Digest, size: int | None, what: str) -> None:
    """After `reader` hit EOF: its byte count and sha256 must match the descriptor."""
    if size is not None and reader.count != size:
        raise DigestMismatchError(f"{what} is truncated: {reader.count} of {size} bytes")
    got = reader.hash.hexdigest()
    if got != digest.hex:
        raise DigestMismatchError(f"{what} does not match its digest: got sha256:{got[:16]}…, want {digest}")


def read_verified(raw: BinaryIO, *, digest: Digest, size: int, limit: int, what: str) -> bytes:
    """A small blob (manifest, index, config) read whole and checked; `size` bounded by `limit`."""
    if size < 0 or size > limit:
        raise ImageError(f"{what}: declared size {size} exceeds the limit of {limit} bytes")
    reader = HashingReader(raw, limit=size, what=what)
    data = reader.read(size + 1) or b""
    while len(data) < size and not reader.eof:
        more = reader.read(size - len(data))
        if not more:
            break
        data += more
    reader.drain()
    check(reader, digest=digest, size=size, what=what)
    return data


def decompressor(compression: Compression) -> Callable[[BinaryIO], BinaryIO]:
    """A function wrapping a compressed stream into an uncompressed one."""
    if compression is Compression.GZIP:
        return lambda raw: cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    if compression is Compression.ZSTD:
        dctx = zstandard.ZstdDecompressor()
        return lambda raw: cast(BinaryIO, dctx.stream_reader(raw, read_across_frames=True, closefd=False))
    return lambda raw: raw

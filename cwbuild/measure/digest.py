"""Streaming digests of large inputs: each file is read once, in fixed-size chunks (constant memory).

One pass feeds every hash a caller needs: SHA-256 (SEV hashes table), SHA-384 (TDX RTMR2 initrd event)
and the Authenticode SHA-384 of a kernel (TDX RTMR1), optionally over QEMU's patched setup header (spec
§3.5), while the SEV digest keeps hashing the file as given (QEMU does not patch the header for SEV
guests, spec §1.3).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cwbuild.errors import MeasurementError
from cwbuild.measure import authenticode

CHUNK = 1 << 20
#: Bytes read before planning the Authenticode ranges: the PE headers (and the Linux setup header) live here.
HEAD = 64 * 1024


@dataclass(frozen=True)
class FileDigests:
    size: int
    sha256: bytes
    sha384: bytes | None = None
    authenticode_sha384: bytes | None = None


@dataclass(frozen=True)
class Wants:
    sha384: bool = False
    authenticode: bool = False
    #: edits the first HEAD bytes seen by the Authenticode hash only (QEMU's TDX kernel patch)
    patch: Callable[[bytearray], None] | None = None


class _RangeHasher:
    """Feeds the parts of a byte stream that fall inside ascending [start, end) ranges to one hash."""

    def __init__(self, ranges: tuple[tuple[int, int], ...]) -> None:
        self.ranges = ranges
        self.index = 0
        self.hash = hashlib.sha384()

    def feed(self, offset: int, chunk: memoryview) -> None:
        end = offset + len(chunk)
        while self.index < len(self.ranges):
            start, stop = self.ranges[self.index]
            if start >= end:
                return
            lo, hi = max(start, offset), min(stop, end)
            if hi > lo:
                self.hash.update(chunk[lo - offset : hi - offset])
            if stop > end:
                return
            self.index += 1


def digest_file(path: Path, wants: Wants = Wants()) -> FileDigests:
    """Hash `path` in one streaming pass. Raises MeasurementError when it cannot be read."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _digest_stream(f, size, wants)
    except OSError as exc:
        raise MeasurementError(f"cannot read {path}: {exc.strerror}") from None


def _digest_stream(f: BinaryIO, size: int, wants: Wants) -> FileDigests:
    read = f.readinto  # type: ignore[attr-defined]  # BinaryIO lacks readinto; open("rb") files have it
    sha256 = hashlib.sha256()
    sha384 = hashlib.sha384() if wants.sha384 else None
    ranged: _RangeHasher | None = None
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while True:
        n = read(view)
        if not n:
            break
        chunk = view[:n]
        sha256.update(chunk)
        if sha384 is not None:
            sha384.update(chunk)
        if wants.authenticode:
            if ranged is None:
                head = bytearray(chunk[:HEAD])
                if wants.patch is not None:
                    wants.patch(head)
                ranged = _RangeHasher(authenticode.plan(bytes(head), size).ranges)
                ranged.feed(0, memoryview(head))
                ranged.feed(len(head), chunk[len(head) :])
            else:
                ranged.feed(offset, chunk)
        offset += n
    if offset != size:
        raise MeasurementError("input changed size while it was being hashed")
    if wants.authenticode and ranged is None:
        raise MeasurementError("kernel is empty")
    return FileDigests(
        size=size,
        sha256=sha256.digest(),
        sha384=sha384.digest() if sha384 is not None else None,
        authenticode_sha384=ranged.hash.digest() if ranged is not None else None,
    )

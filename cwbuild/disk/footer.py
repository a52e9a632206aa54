"""The krun workload-config footer appended to disk.img (cw-format.md §1.5, buildah internal/mkcw).

Layout at the end of the file: P zero bytes, the JSON, `KRUN`, uint64_le(len(JSON)), with P chosen so that
the file size is a multiple of 4096. Readers (libkrun, buildah) seek to -12, check `KRUN`, read the length
(at most 1 MiB, buildah's maxWorkloadConfigSize) and take the JSON before it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from cwbuild.errors import FormatError

MAGIC = b"KRUN"
TRAILER = struct.Struct("<4sQ")  # magic + LE64 length (§1.5)
MAX_CONFIG = 1024 * 1024  # buildah maxWorkloadConfigSize
ALIGN = 4096


def validated(config_json: bytes) -> bytes:
    """`config_json` if it is a JSON object of at most MAX_CONFIG bytes, else FormatError."""
    if len(config_json) > MAX_CONFIG:
        raise FormatError(f"workload config is larger than {MAX_CONFIG} bytes")
    try:
        doc = json.loads(config_json)
    except (ValueError, RecursionError):
        raise FormatError("workload config is not JSON") from None
    if not isinstance(doc, dict):
        raise FormatError("workload config is not a JSON object")
    return config_json


def encode(config_json: bytes, start: int) -> bytes:
    """The bytes to write at `start` (the end of the payload): zero pad, JSON, trailer."""
    body = validated(config_json) + TRAILER.pack(MAGIC, len(config_json))
    pad = -(start + len(body)) % ALIGN
    return bytes(pad) + body


def read(path: Path) -> bytes | None:
    """The footer JSON of `path`, or None when there is no footer. A malformed footer is a FormatError."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < TRAILER.size:
            return None
        f.seek(size - TRAILER.size)
        magic, length = TRAILER.unpack(f.read(TRAILER.size))
        if magic != MAGIC:
            return None
        if length > MAX_CONFIG or length > size - TRAILER.size:
            raise FormatError(f"krun footer claims {length} bytes of config")
        f.seek(size - TRAILER.size - length)
        data = f.read(length)
    return validated(data)


def locate(path: Path, sector_size: int = ALIGN) -> int | None:
    """Where the payload ends when `path` carries a footer, or None. The footer does not say: the payload
    ends on a sector boundary at most ALIGN - 1 bytes before the JSON, and everything from there to the
    JSON is zero padding. So it is the first sector boundary in that window after which only zeros
    follow (the payload's last sector is ciphertext, all zero with probability 2^-(8 * sector_size)).
    Sectors are counted from the file's start: LUKS payload offsets are multiples of 4096."""
    data = read(path)
    if data is None:
        return None
    json_start = path.stat().st_size - TRAILER.size - len(data)
    low = max(0, json_start - (ALIGN - 1))
    with path.open("rb") as f:
        f.seek(low)
        window = f.read(json_start - low)
    used = len(window.rstrip(b"\0"))  # bytes of the window before the padding
    end = low + used
    return end + (-end % sector_size)

"""Unpack Debian binary packages in Python (no dpkg, no root).

A .deb is an `ar` archive (deb(5)): `debian-binary`, `control.tar.*`, then `data.tar[.xz|.zst|.gz]`. The
`ar` member header is 60 bytes (ar(5), the common System V/GNU format): name[16] mtime[12] uid[6] gid[6]
mode[8] size[10] fmag[2] = "`\\n"; member data is padded to an even offset. Member paths are normalised
to relative POSIX paths; absolute paths and `..` components are refused, device nodes and FIFOs skipped.
"""

from __future__ import annotations

import gzip
import io
import lzma
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import IO

import zstandard

from cwbuild.errors import FormatError

AR_MAGIC = b"!<arch>\n"  # ar(5)
AR_HEADER_SIZE = 60  # ar(5): fixed-size member header
AR_FMAG = b"`\n"
#: A single member of a .deb is never larger than this once decompressed (the largest kernel file is
#: ~12 MiB; firmware volumes 4 MiB): bounds memory against decompression bombs.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
MAX_DATA_TAR_BYTES = 2 * 1024 * 1024 * 1024


class Kind(StrEnum):
    """What a data.tar member is."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"


@dataclass(frozen=True)
class Member:
    """One entry of a package's data.tar; `data` only for files, `target` only for links."""

    path: str
    kind: Kind
    mode: int
    data: bytes = b""
    target: str = ""


def ar_members(blob: bytes) -> dict[str, bytes]:
    """The members of an `ar` archive by name (bounds-checked)."""
    if not blob.startswith(AR_MAGIC):
        raise FormatError("not a Debian package: missing ar magic")
    out: dict[str, bytes] = {}
    pos = len(AR_MAGIC)
    while pos < len(blob):
        header = blob[pos : pos + AR_HEADER_SIZE]
        if len(header) < AR_HEADER_SIZE or header[58:60] != AR_FMAG:
            raise FormatError(f"Debian package: bad ar member header at offset {pos}")
        name = header[0:16].decode("ascii", "replace").rstrip(" ").rstrip("/")
        size_field = header[48:58].decode("ascii", "replace").strip()
        if not size_field.isdigit():
            raise FormatError(f"Debian package: bad ar member size for {name!r}")
        size = int(size_field)
        start = pos + AR_HEADER_SIZE
        if start + size > len(blob):
            raise FormatError(f"Debian package: ar member {name!r} truncated")
        out[name] = blob[start : start + size]
        pos = start + size + (size & 1)
    return out


def _decompressed(name: str, payload: bytes) -> IO[bytes]:
    if name == "data.tar":
        return io.BytesIO(payload)
    if name == "data.tar.xz":
        return lzma.LZMAFile(io.BytesIO(payload))
    if name == "data.tar.zst":
        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload))
        return reader
    if name == "data.tar.gz":
        gz: IO[bytes] = gzip.GzipFile(fileobj=io.BytesIO(payload), mode="rb")  # type: ignore[assignment]  # GzipFile is a binary IO
        return gz
    raise FormatError(f"Debian package: unsupported data member {name!r}")


def normalize(path: str) -> str:
    """A data.tar member name as a relative POSIX path ('' for the root); traversal is refused."""
    if path.startswith("/"):
        raise FormatError(f"Debian package: absolute member path {path!r}")
    norm = posixpath.normpath(path) if path not in ("", ".", "./") else "."
    if norm == ".":
        return ""
    if norm == ".." or norm.startswith("../"):
        raise FormatError(f"Debian package: member path escapes the root: {path!r}")
    return norm


def data_members(blob: bytes) -> Iterator[Member]:
    """Every file, directory and link in a .deb's data.tar, in archive order."""
    members = ar_members(blob)
    names = [n for n in members if n.startswith("data.tar")]
    if len(names) != 1:
        raise FormatError("Debian package: expected exactly one data.tar member")
    stream = _decompressed(names[0], members[names[0]])
    total = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                member = _member(tar, info)
                if member is None:
                    continue
                total += len(member.data)
                if total > MAX_DATA_TAR_BYTES:
                    raise FormatError("Debian package: data.tar too large")
                yield member
    except (tarfile.TarError, lzma.LZMAError, zstandard.ZstdError, EOFError, OSError) as exc:
        raise FormatError(f"Debian package: corrupt data.tar: {exc}") from exc


def _member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Member | None:
    path = normalize(info.name)
    mode = info.mode & 0o7777
    if info.isdir():
        return Member(path, Kind.DIR, mode)
    if info.issym():
        return Member(path, Kind.SYMLINK, 0o777, target=info.linkname)
    if info.islnk():
        return Member(path, Kind.HARDLINK, mode, target=normalize(info.linkname))
    if not info.isfile():
        return None  # device nodes, FIFOs: nothing a kit needs
    if info.size > MAX_MEMBER_BYTES:
        raise FormatError(f"Debian package: member {path!r} too large ({info.size} bytes)")
    handle = tar.extractfile(info)
    if handle is None:
        raise FormatError(f"Debian package: cannot read member {path!r}")
    data = handle.read()
    if len(data) != info.size:
        raise FormatError(f"Debian package: member {path!r} truncated")
    return Member(path, Kind.FILE, mode, data=data)

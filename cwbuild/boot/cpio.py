"""A deterministic `newc` cpio writer (the format the kernel's initramfs unpacker reads).

Layout from the kernel's Documentation/driver-api/early-userspace/buffer-format.rst: a 110-byte ASCII
header ("070701" + 13 eight-digit hex fields), the NUL-terminated name padded to a multiple of 4, the data
padded to a multiple of 4; the archive ends with the entry "TRAILER!!!". Entries are written sorted by path
with their parent directories, owner 0:0, one fixed mtime and nlink 1 for files (so no hardlink detection,
and inode numbers never collide across concatenated segments).
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from cwbuild.errors import FormatError

NEWC_MAGIC = b"070701"  # buffer-format.rst: "c_magic"
HEADER_SIZE = 110  # 6 + 13 * 8
TRAILER = "TRAILER!!!"  # buffer-format.rst: end of archive
MAX_NAME = 4096  # PATH_MAX, include/uapi/linux/limits.h


class EntryKind(StrEnum):
    """What an archive entry is."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"


@dataclass(frozen=True)
class Entry:
    """One archive entry; `data` is the file content or the symlink target."""

    kind: EntryKind
    mode: int = 0o644
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def file(cls, data: bytes, mode: int = 0o644) -> Entry:
        """A regular file."""
        return cls(EntryKind.FILE, mode, data)

    @classmethod
    def directory(cls, mode: int = 0o755) -> Entry:
        """A directory."""
        return cls(EntryKind.DIR, mode)

    @classmethod
    def symlink(cls, target: str) -> Entry:
        """A symbolic link to `target`."""
        return cls(EntryKind.SYMLINK, 0o777, target.encode("utf-8"))

    @classmethod
    def char_device(cls, major: int, minor: int, mode: int = 0o600) -> Entry:
        """A character device node (written as bytes: no privileges needed to build the archive)."""
        return cls(EntryKind.CHAR, mode, b"", (major, minor))


_TYPE_BITS = {
    EntryKind.FILE: stat.S_IFREG,
    EntryKind.DIR: stat.S_IFDIR,
    EntryKind.SYMLINK: stat.S_IFLNK,
    EntryKind.CHAR: stat.S_IFCHR,
}


def _check_path(path: str) -> str:
    norm = posixpath.normpath(path.lstrip("/"))
    if norm in ("", ".") or norm.startswith("../") or norm == ".." or path.startswith("//"):
        raise FormatError(f"initrd: bad path {path!r}")
    if len(norm.encode("utf-8")) >= MAX_NAME or "\0" in norm:
        raise FormatError(f"initrd: path too long or invalid: {path[:60]!r}")
    return norm


def with_parents(entries: Mapping[str, Entry]) -> dict[str, Entry]:
    """`entries` (paths normalised) plus a 0755 directory for every missing parent."""
    out: dict[str, Entry] = {}
    for path, entry in entries.items():
        out[_check_path(path)] = entry
    for path in list(out):
        parent = posixpath.dirname(path)
        while parent and parent not in out:
            out[parent] = Entry.directory()
            parent = posixpath.dirname(parent)
        if parent and out[parent].kind is not EntryKind.DIR:
            raise FormatError(f"initrd: parent of {path!r} is not a directory")
    return out


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(  # noqa: PLR0913 - one keyword per header field (buffer-format.rst)
    *, ino: int, mode: int, nlink: int, mtime: int, size: int, namesize: int, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    if any(f < 0 or f > 0xFFFFFFFF for f in fields):
        raise FormatError("initrd: a cpio header field does not fit 32 bits")
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def _record(  # noqa: PLR0913 - one keyword per header field
    name: str, *, ino: int, mode: int, nlink: int, mtime: int, data: bytes, rdev: tuple[int, int] = (0, 0)
) -> Iterable[bytes]:
    raw = name.encode("utf-8") + b"\0"
    yield _header(ino=ino, mode=mode, nlink=nlink, mtime=mtime, size=len(data), namesize=len(raw), rdev=rdev)
    yield raw
    yield _pad4(HEADER_SIZE + len(raw))
    yield data
    yield _pad4(len(data))


def write_newc(entries: Mapping[str, Entry], *, mtime: int = 0, first_inode: int = 1) -> bytes:
    """A complete newc archive of `entries` (and their parents), sorted by path, ending in the trailer."""
    full = with_parents(entries)
    parts: list[bytes] = []
    for i, path in enumerate(sorted(full)):
        entry = full[path]
        mode = _TYPE_BITS[entry.kind] | (entry.mode & 0o7777)
        nlink = 2 if entry.kind is EntryKind.DIR else 1
        data = b"" if entry.kind in (EntryKind.DIR, EntryKind.CHAR) else entry.data
        parts.extend(
            _record(
                path, ino=first_inode + i, mode=mode, nlink=nlink, mtime=mtime, data=data, rdev=entry.rdev
            )
        )
    parts.extend(_record(TRAILER, ino=0, mode=0, nlink=1, mtime=0, data=b""))
    return b"".join(parts)

"""Flatten an image's layers into a directory with the semantics of Podman (containers/storage applying each
layer chrooted into the layer's root, pkg/archive UnpackLayer + createTarFile, vfs driver), safely.

Per entry, in tar order (Go names in brackets are the upstream steps reproduced):
  - the name is cleaned lexically and joined to `/` [filepath.Clean, filepath.Join(dest, name)]: a leading `/`
    or `..` never climbs above the root;
  - a missing parent directory is created 0755, root-owned [os.MkdirAll(parent, 0755)], following symlinks
    inside the root; a parent that cannot exist (a dangling symlink, a file) refuses the layer;
  - names starting `.wh..wh.` at the top are AUFS metadata and skipped, except `.wh..wh..opq`;
  - `.wh..wh..opq` empties its directory of everything not unpacked by this layer so far; `.wh.NAME` removes
    NAME [os.RemoveAll];
  - anything else first replaces an existing entry (a directory over a directory merges), then is created:
    directories, regular files, symlinks (target stored verbatim), hardlinks (the target is looked up inside
    the root and must exist and not be a directory), FIFOs; device nodes are skipped with a warning;
  - then owner (numeric, lchown), xattrs (SCHILY.xattr.*; unsupported ones skipped with a warning), mode
    (all 12 bits, not for symlinks) and times.
Where Podman fails, cwbuild raises `LayerError` naming the layer and the entry. Directory mtimes come from
their own entries and are not disturbed by later writes into them (Podman leaves the time of extraction
there). Writing stays inside the root: see `fsops`.

Ownership needs root (lchown to any uid). Rootless, run cwbuild inside a user namespace with a subordinate ID
range (`podman unshare cwbuild ...`): there it is root, owners within the mapping come out as they do for root
(on disk they are the mapped host IDs, and tools run in the same namespace, such as mkfs.ext4 -d, see the
image's IDs); an ID outside the mapping fails the layer, as it does for rootless Podman. Without a namespace
owners cannot be kept: every file belongs to the caller, and the result carries a warning saying so.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import partial
from pathlib import Path
from typing import BinaryIO, Self

from cwbuild.errors import CwbuildError, LayerError, UsageError
from cwbuild.image.blobs import CHUNK
from cwbuild.image.fsops import MAX_DEPTH, KeepMtime, ResolveError, Root, lstat_at, remove_all, rooted
from cwbuild.image.model import Image

log = logging.getLogger("cwbuild.image.rootfs")

#: containers/storage pkg/archive/whiteouts.go: WhiteoutPrefix, WhiteoutMetaPrefix, WhiteoutOpaqueDir
#: (the OCI image-spec v1.1 layer.md "Whiteouts" names).
WH_PREFIX = ".wh."
WH_META_PREFIX = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"
#: PAX records carrying extended attributes (star/GNU tar's SCHILY.xattr.NAME, read by Go's archive/tar).
XATTR_PAX = "SCHILY.xattr."
NOT_ROOT_WARNING = "not running as root: file owners are not kept (run under `podman unshare` to keep them)"
#: tarfile's stream-mode read size (its default, 10 KiB, costs a hundred reads and joins per MiB of data; each
#: header read copies what is left of the buffer, so bigger is not better for layers of small files).
TAR_BUFSIZE = 64 << 10
#: Linux PATH_MAX (include/uapi/linux/limits.h).
PATH_MAX = 4096


@dataclass(frozen=True)
class Limits:
    """Bounds on what a set of layers may make us write."""

    max_bytes: int = 256 << 30
    max_entries: int = 10_000_000


@dataclass(frozen=True)
class RootfsResult:
    """What `flatten` wrote: `skipped_devices` go to the build manifest; `warnings` were also logged."""

    path: Path
    entries: int
    bytes: int
    skipped_devices: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass
class _State:
    limits: Limits
    as_root: bool
    entries: int = 0
    bytes: int = 0
    devices: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    root_entry: tarfile.TarInfo | None = None


#: Opens one layer's uncompressed tar, checked against its digests when the block exits normally.
LayerOpener = Callable[[], AbstractContextManager[BinaryIO]]


def flatten(image: Image, dest: str | os.PathLike[str], *, limits: Limits | None = None) -> RootfsResult:
    """Apply `image`'s layers in order into `dest`, which must not exist; it is created (0700 while being
    written) and removed again if anything fails."""
    return flatten_layers(
        [partial(image.layer_stream, i) for i in range(len(image.layers))], dest, limits=limits
    )


def flatten_layers(
    layers: Iterable[LayerOpener], dest: str | os.PathLike[str], *, limits: Limits | None = None
) -> RootfsResult:
    """`flatten` of layers given as openers, called in order (a streamed export opens them as they come)."""
    path = Path(dest)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise UsageError(f"{path} already exists", hint="give a directory that does not exist yet") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from exc
    state = _State(limits or Limits(), as_root=os.geteuid() == 0)
    if not state.as_root:
        state.warnings.append(NOT_ROOT_WARNING)
        log.warning("%s", NOT_ROOT_WARNING)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        root = Root(fd)
        for index, opener in enumerate(layers):
            with opener() as stream:
                apply_layer(stream, root, state, what=f"layer {index + 1}")
        _finish_root(fd, state)
    except BaseException:
        os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        raise
    os.close(fd)
    return RootfsResult(path, state.entries, state.bytes, tuple(state.devices), tuple(state.warnings))


def apply_layer(stream: BinaryIO, root: Root, state: _State, *, what: str) -> None:
    """Apply one uncompressed layer tar, read as a stream (memory stays flat)."""
    unpacked: set[str] = set()
    dirs: list[list[str]] = []
    if isinstance(stream, io.BufferedReader) and not stream.peek(1):
        return  # an empty layer: Go's archive/tar reads it as an archive without entries
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo, bufsize=TAR_BUFSIZE)  # noqa: SIM115 - closed below
    except tarfile.TarError as exc:
        raise LayerError(f"{what} is not a tar archive: {exc}") from exc
    member: tarfile.TarInfo | None = None
    try:
        while True:
            member = tar.next()
            if member is None:
                break
            tar.members = []  # type: ignore[attr-defined] # tarfile keeps every header in stream mode; we need none of them
            state.entries += 1
            if state.entries > state.limits.max_entries:
                raise LayerError(f"{what}: more than {state.limits.max_entries} entries")
            if _Entry(tar, member, root, state, unpacked).apply() and member.isdir():
                dirs.append(rooted(member.name))
        member = None
        _check_dirs(root, dirs)
    except ResolveError as exc:
        raise LayerError(f"{what}: cannot apply {_name(member)}: {exc}") from exc
    except OSError as exc:
        raise LayerError(f"{what}: cannot apply {_name(member)}: {exc.strerror or exc}") from exc
    except tarfile.TarError as exc:
        raise LayerError(f"{what}: broken tar after {_name(member)}: {exc}") from exc
    except CwbuildError as exc:
        if isinstance(exc, LayerError):
            exc.message = f"{what}: {exc.message}"
            exc.args = (exc.message,)
        raise
    finally:
        tar.close()


def _check_dirs(root: Root, dirs: list[list[str]]) -> None:
    """UnpackLayer sets directory times after the layer (system.Chtimes, following symlinks) and fails if a
    directory entry of the layer no longer exists by then."""
    for comps in dirs:
        try:
            os.close(root.resolve_dir(comps, create=False))
        except ResolveError as exc:
            if exc.errno == errno.ENOENT:
                raise LayerError(
                    f"directory {'/'.join(comps)!r} was removed by the layer that made it"
                ) from exc


def _name(member: tarfile.TarInfo | None) -> str:
    return repr(member.name) if member is not None else "the first entry"


#: tarfile's private header exceptions (not in typeshed): end of archive, and an empty read.
_EOF_HEADER: type[Exception] = tarfile.__dict__["EOFHeaderError"]
_EMPTY_HEADER: type[Exception] = tarfile.__dict__["EmptyHeaderError"]


class _BrokenTarError(tarfile.TarError):
    """A header that Go's archive/tar rejects; Python's tarfile would quietly end the archive there."""


class _StrictTarInfo(tarfile.TarInfo):
    """Header reading with Go's archive/tar end-of-archive rule (reader.go Next/readHeader): a zero block
    must be followed by another zero block or end of stream; a bad or partial header is an error."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        if buf and buf.count(0) == tarfile.BLOCKSIZE:
            after = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            if after and after.count(0) != tarfile.BLOCKSIZE:
                raise _BrokenTarError("a single zero block followed by data")
            raise _EOF_HEADER("end of archive")
        if buf and len(buf) != tarfile.BLOCKSIZE:
            raise _BrokenTarError("truncated header")
        try:
            obj = cls.frombuf(buf, tarfile_.encoding, tarfile_.errors)
        except _EMPTY_HEADER:
            raise
        except tarfile.HeaderError as exc:
            raise _BrokenTarError(f"invalid header: {exc}") from None
        obj.offset = tarfile_.fileobj.tell() - tarfile.BLOCKSIZE
        return obj._proc_member(tarfile_)  # type: ignore[no-any-return,attr-defined] # tarfile internals


class _Entry:
    """One tar entry being applied (the steps of UnpackLayer's loop body)."""

    def __init__(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, root: Root, state: _State, unpacked: set[str]
    ) -> None:
        if len(member.name) > PATH_MAX or len(member.linkname) > PATH_MAX:
            raise LayerError(f"entry name or link target longer than {PATH_MAX} bytes: {member.name[:80]!r}")
        self.tar, self.m, self.root, self.state, self.unpacked = tar, member, root, state, unpacked
        self.comps = rooted(member.name)
        if len(self.comps) > MAX_DEPTH:
            raise LayerError(f"entry {member.name[:80]!r}… is nested deeper than {MAX_DEPTH} directories")

    def apply(self) -> bool:
        """Apply the entry; True if it created or updated something (not a whiteout or skipped name)."""
        m, comps = self.m, self.comps
        if not comps:
            self._root_entry()
            return False
        parent = self.root.resolve_dir(comps[:-1], create=True)
        try:
            if _go_clean(m.name).startswith(WH_META_PREFIX) and _go_clean(m.name) != WH_OPAQUE:
                return False  # AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): skipped after its parent was made
            base = comps[-1]
            if base == WH_OPAQUE:
                self._opaque(comps[:-1])
            elif base.startswith(WH_PREFIX):
                self._whiteout([*comps[:-1], base[len(WH_PREFIX) :]])
            else:
                with KeepMtime(parent):
                    self._create(parent, base)
                self._metadata(parent, base)
                self.unpacked.add("/".join(comps))
                return True
            return False
        finally:
            os.close(parent)

    def _root_entry(self) -> None:
        if not self.m.isdir():
            raise LayerError(f"entry {self.m.name!r} would replace the root directory")
        self.state.root_entry = self.m

    def _whiteout(self, target_comps: list[str]) -> None:
        target = rooted("/".join(target_comps))
        if not target:
            raise LayerError(f"whiteout {self.m.name!r} would remove the root directory")
        try:
            tfd = self.root.resolve_dir(target[:-1], create=False)
        except ResolveError as exc:
            if exc.errno == errno.ENOENT:
                return  # RemoveAll of a path whose parent does not exist succeeds
            raise
        try:
            remove_all(tfd, target[-1])
        finally:
            os.close(tfd)

    def _opaque(self, dir_comps: list[str]) -> None:
        """filepath.Walk(dir): remove what this layer did not unpack; a symlinked dir is not descended."""
        if not dir_comps:
            self._empty(self.root.fd, "", keep=self.unpacked)
            return
        pfd = self.root.resolve_dir(dir_comps[:-1], create=False)
        try:
            st = lstat_at(pfd, dir_comps[-1])
            if st is None:
                raise ResolveError(errno.ENOENT, dir_comps[-1])
            if not stat.S_ISDIR(st.st_mode):
                return
            dfd = os.open(dir_comps[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
        finally:
            os.close(pfd)
        try:
            self._empty(dfd, "/".join(dir_comps), keep=self.unpacked)
        finally:
            os.close(dfd)

    def _empty(self, dfd: int, prefix: str, *, keep: set[str]) -> None:
        with KeepMtime(dfd):
            for name in sorted(os.listdir(dfd)):
                path = f"{prefix}/{name}" if prefix else name
                if path not in keep:
                    remove_all(dfd, name)
                    continue
                st = lstat_at(dfd, name)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                    try:
                        self._empty(sub, path, keep=keep)
                    finally:
                        os.close(sub)

    def _create(self, parent: int, base: str) -> None:
        m = self.m
        existing = lstat_at(parent, base)
        if existing is not None and not (stat.S_ISDIR(existing.st_mode) and m.isdir()):
            remove_all(parent, base)
            existing = None
        if m.isdir():
            if existing is None:
                os.mkdir(base, 0o700, dir_fd=parent)
        elif m.type in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.issparse():
            self._write_file(parent, base)
        elif m.issym():
            os.symlink(m.linkname, base, dir_fd=parent)
        elif m.islnk():
            self._hardlink(parent, base)
        elif m.isfifo():
            os.mkfifo(base, 0o600, dir_fd=parent)
        elif m.ischr() or m.isblk():
            path = "/" + "/".join(self.comps)
            self.state.devices.append(path)
            self._warn(f"device node {path} skipped")
        else:
            raise LayerError(f"entry {m.name!r} has unsupported tar type {m.type!r}")

    def _write_file(self, parent: int, base: str) -> None:
        size = self.m.size
        budget = self.state.limits.max_bytes - self.state.bytes
        if size > budget:
            raise LayerError(f"entry {self.m.name!r} declares {size} bytes, over the limit of the image size")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(base, flags, 0o600, dir_fd=parent)
        with os.fdopen(fd, "wb", buffering=0) as out:
            src = self.tar.extractfile(self.m)
            if src is None:
                raise LayerError(f"entry {self.m.name!r} has no data")
            remaining = size
            while remaining > 0:
                chunk = src.read(min(CHUNK, remaining))
                if not chunk:
                    raise LayerError(f"entry {self.m.name!r} is truncated")
                out.write(chunk)
                remaining -= len(chunk)
        self.state.bytes += size

    def _hardlink(self, parent: int, base: str) -> None:
        target = rooted(self.m.linkname)
        if not target:
            raise LayerError(f"hardlink {self.m.name!r} points at the root directory")
        if target[0] == WH_META_PREFIX + "plnk":
            raise LayerError(f"hardlink {self.m.name!r} into AUFS .wh..wh.plnk is not supported")
        tfd = self.root.resolve_dir(target[:-1], create=False)
        try:
            st = lstat_at(tfd, target[-1])
            if st is None:
                raise LayerError(f"hardlink {self.m.name!r} -> {self.m.linkname!r}: target does not exist")
            os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(tfd)

    def _metadata(self, parent: int, base: str) -> None:
        m = self.m
        if m.ischr() or m.isblk():
            return
        if self.state.as_root:
            os.chown(base, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        self._xattrs(parent, base)
        st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode) and not m.issym():
            return  # a hardlink to a symlink: Podman leaves mode and times alone
        if not m.issym():
            os.chmod(base, m.mode & 0o7777, dir_fd=parent)
        ns = _mtime_ns(m)
        os.utime(base, ns=(ns, ns), dir_fd=parent, follow_symlinks=False)

    def _xattrs(self, parent: int, base: str) -> None:
        for key, value in self.m.pax_headers.items():
            if not key.startswith(XATTR_PAX):
                continue
            name = key[len(XATTR_PAX) :]
            data = value.encode("utf-8", "surrogateescape")
            try:
                os.setxattr(f"/proc/self/fd/{parent}/{base}", name, data, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM) or (
                    exc.errno == errno.EPERM and self.state.as_root
                ):
                    raise
                self._warn(f"xattr {name} on /{'/'.join(self.comps)} not kept: {exc.strerror}")

    def _warn(self, text: str) -> None:
        log.warning("%s", text)
        self.state.warnings.append(text)


def _go_clean(name: str) -> str:
    """Go's filepath.Clean, enough to test prefixes: relative names keep leading `..`."""
    absolute = name.startswith("/")
    out: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == ".." and out and out[-1] != "..":
            out.pop()
        elif part == ".." and absolute and not out:
            continue
        else:
            out.append(part)
    text = "/".join(out)
    return ("/" + text) if absolute else (text or ".")


def _mtime_ns(m: tarfile.TarInfo) -> int:
    text = m.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text) * 10**9)
        except (InvalidOperation, ValueError):
            pass
    return int(m.mtime) * 10**9


def _finish_root(fd: int, state: _State) -> None:
    """The root gets the metadata of a `./` entry if a layer had one, else 0755 root:root, mtime 0."""
    m = state.root_entry
    if m is not None and state.as_root:
        os.chown(fd, m.uid, m.gid)
    os.chmod(fd, (m.mode & 0o7777) if m is not None else 0o755)
    ns = _mtime_ns(m) if m is not None else 0
    os.utime(fd, ns=(ns, ns))

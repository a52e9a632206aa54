"""File operations confined to a root directory, as a chrooted process sees it.

Every path is walked one component at a time from the root's file descriptor with `*at` calls and
O_NOFOLLOW; a symlink met on the way is read and interpreted by us, relative to the root (an absolute target
starts again at the root, `..` at the root stays there), exactly as the kernel does after chroot(2).
Nothing is ever opened, created or removed outside the root, whatever the names and symlinks say. The root
must be private (mode 0700, one writer) so that nothing changes under the walk.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections import deque

#: Linux's MAXSYMLINKS (include/linux/namei.h): more symlinks than this in one lookup is ELOOP.
MAX_SYMLINKS = 40
#: Directory nesting cwbuild handles (one open descriptor and one stack frame per level while walking or
#: removing). Podman has no such bound below PATH_MAX; deeper layers are refused with a clear error.
MAX_DEPTH = 512
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ResolveError(Exception):
    """A lookup failed; `errno` says why (ENOENT, ENOTDIR, ELOOP, EEXIST)."""

    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"{where}: {os.strerror(code)}")
        self.errno = code


def rooted(name: str) -> list[str]:
    """`filepath.Join("/", filepath.Clean(name))` as components: lexical; `..` never climbs above the root."""
    out: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
    return out


class Root:
    """A directory treated as `/`. `implicit_mtime` is given to directories created for missing parents."""

    def __init__(self, fd: int, *, implicit_mtime: int = 0) -> None:
        self.fd = fd
        self.implicit_mtime = implicit_mtime

    def resolve_dir(self, comps: list[str], *, create: bool) -> int:
        """An fd (caller closes) of the directory at `comps`, following symlinks inside the root. With
        `create`, missing components named by `comps` themselves are made (0755, root-owned, like Go's
        os.MkdirAll as Podman calls it); components that come from a symlink's target never are."""
        pending: deque[tuple[str, bool]] = deque((c, True) for c in comps)
        stack: list[int] = []
        links = 0
        try:
            while pending:
                name, literal = pending.popleft()
                if name in ("", "."):
                    continue
                if name == "..":
                    if stack:
                        os.close(stack.pop())
                    continue
                cur = stack[-1] if stack else self.fd
                st = self._lstat_or_create(cur, name, create=create and literal)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise ResolveError(errno.ELOOP, name)
                    target = os.readlink(name, dir_fd=cur)
                    if target.startswith("/"):
                        while stack:
                            os.close(stack.pop())
                    pending.extendleft(reversed([(c, False) for c in target.split("/")]))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise ResolveError(errno.ENOTDIR, name)
                if len(stack) >= MAX_DEPTH:
                    raise ResolveError(
                        errno.ENAMETOOLONG, f"more than {MAX_DEPTH} directory levels at {name}"
                    )
                stack.append(os.open(name, _DIR_FLAGS, dir_fd=cur))
            return os.dup(stack[-1] if stack else self.fd)
        finally:
            for fd in stack:
                os.close(fd)

    def _lstat_or_create(self, dirfd: int, name: str, *, create: bool) -> os.stat_result:
        try:
            return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            if not create:
                raise ResolveError(errno.ENOENT, name) from None
        with KeepMtime(dirfd):
            os.mkdir(name, 0o700, dir_fd=dirfd)
        os.chmod(name, 0o755, dir_fd=dirfd)  # noqa: S103 - Go UnpackLayer: MkdirAll(p, 0755)
        os.utime(name, ns=(self.implicit_mtime * 10**9,) * 2, dir_fd=dirfd, follow_symlinks=False)
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_all(dirfd: int, name: str) -> None:
    """Go's os.RemoveAll(dir/name): the entry and everything under it, never following a symlink."""
    st = lstat_at(dirfd, name)
    if st is None:
        return
    with KeepMtime(dirfd):
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dirfd)
        else:
            os.unlink(name, dir_fd=dirfd)


class KeepMtime:
    """Restore a directory's times after changing its entries: a directory's mtime is the one its layer
    entry gave it, not the time we happened to write into it (deterministic output)."""

    def __init__(self, dirfd: int) -> None:
        self.dirfd = dirfd
        self.times = (0, 0)

    def __enter__(self) -> KeepMtime:
        st = os.fstat(self.dirfd)
        self.times = (st.st_atime_ns, st.st_mtime_ns)
        return self

    def __exit__(self, *exc: object) -> None:
        os.utime(self.dirfd, ns=self.times)

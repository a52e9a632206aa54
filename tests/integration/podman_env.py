"""A private Podman for tests: its own store (vfs driver, in a temp dir) and its own `podman system service`.

The vfs driver applies each layer onto a full copy of the one below, chrooted (containers/storage
NaiveDiffDriver → chrootarchive.ApplyUncompressedLayer → archive.UnpackLayer): the semantics cwbuild
reproduces. (overlay extracts each layer into an empty directory, so a lower layer's symlink used as a parent
is shadowed rather than followed; see the image section of tests/golden/README.md.)
Tests that use it pass `podman.env` to the CLI: CONTAINERS_STORAGE_CONF reaches every podman we start,
CONTAINER_HOST points cwbuild at the service.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO


@dataclass
class Podman:
    root: Path
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["podman", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed: {proc.stderr[-2000:]}")
        return proc

    def load(self, archive: Path) -> subprocess.CompletedProcess[str]:
        return self("load", "-i", str(archive), check=False)

    def export(self, image: str, dest: Path) -> Path:
        """`podman export` of a container created (never started) from `image`."""
        name = f"cwbuild-test-{uuid.uuid4().hex[:12]}"
        self("create", "--name", name, image, "true")
        try:
            self("export", "-o", str(dest), name)
        finally:
            self("rm", "-f", name, check=False)
        return dest


def remove_store(podman: Podman) -> None:
    """Empty and delete a test store. Not `podman system reset`: that also deletes the host's networks."""
    podman("rm", "--all", "--force", check=False)
    podman("rmi", "--all", "--force", check=False)
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{podman.root}/")), reverse=True):
        subprocess.run(["umount", mount], check=False, capture_output=True)  # overlay's private home mount
    shutil.rmtree(podman.root / "graph", ignore_errors=True)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run scripts/setup.sh")
    root = tmp_path_factory.mktemp("podman")
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{root}/graph"\nrunroot = "{root}/run"\n')
    sock = root / "podman.sock"
    env = {"CONTAINERS_STORAGE_CONF": str(conf)}
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not _answers(sock):
        assert service.poll() is None, "podman system service exited"
        assert time.monotonic() < deadline, "podman system service did not start in 30 s"
        time.sleep(0.05)
    try:
        yield Podman(root, {**env, "CONTAINER_HOST": f"unix://{sock}"})
    finally:
        service.terminate()
        service.wait(30)
        remove_store(Podman(root, env))


@pytest.fixture(scope="session")
def hello_image(podman: Podman) -> str:
    """examples/hello built into the test store."""
    proc = subprocess.run(
        ["bash", str(REPO / "examples/hello/build.sh")],
        env={**os.environ, "CONTAINERS_STORAGE_CONF": podman.env["CONTAINERS_STORAGE_CONF"]},  # a local build
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return "localhost/cwbuild-hello:latest"


Entry = tuple[object, ...]


def full_tree_dir(root: Path) -> tuple[dict[str, Entry], set[frozenset[str]]]:
    """path -> (type, mode, uid, gid, size, content, link target, mtime for non-directories, user.* xattrs),
    and the hardlink groups of regular files. (`podman export` writes user.* xattrs only.)"""
    tree: dict[str, Entry] = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            kind = stat.S_IFMT(st.st_mode)
            content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            mtime = None if stat.S_ISDIR(st.st_mode) else int(st.st_mtime)
            size = len(content)
            xattrs = {
                k: os.getxattr(path, k, follow_symlinks=False).decode()
                for k in os.listxattr(path, follow_symlinks=False)
                if k.startswith("user.")
            }
            tree[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                size,
                content,
                link,
                mtime,
                xattrs,
            )
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, set()).add(rel)
    return tree, {frozenset(g) for g in inodes.values()}


def full_tree_tar(path: Path) -> tuple[dict[str, Entry], set[frozenset[str]], list[str]]:
    """The same from an export tar; device nodes are returned apart (cwbuild skips them)."""
    kinds = {
        tarfile.REGTYPE: stat.S_IFREG,
        tarfile.DIRTYPE: stat.S_IFDIR,
        tarfile.SYMTYPE: stat.S_IFLNK,
        tarfile.FIFOTYPE: stat.S_IFIFO,
    }
    tree: dict[str, Entry] = {}
    groups: dict[str, set[str]] = {}
    devices: list[str] = []
    with tarfile.open(path) as tar:
        members = {m.name.rstrip("/"): m for m in tar.getmembers()}
        for name, m in members.items():
            if m.ischr() or m.isblk():
                devices.append("/" + name)
                continue
            base = members[m.linkname] if m.islnk() else m
            f = tar.extractfile(base) if base.isreg() else None
            content = f.read() if f else b""
            mtime = None if base.isdir() else int(m.mtime)
            tree[name] = (
                kinds[base.type],
                m.mode & 0o7777 if not base.issym() else 0o777,
                m.uid,
                m.gid,
                len(content),
                content,
                base.linkname if base.issym() else "",
                mtime,
                {k[13:]: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.user.")},
            )
            if m.islnk() and base.isreg():
                groups.setdefault(m.linkname, {m.linkname}).add(name)
    return tree, {frozenset(g) for g in groups.values()}, devices

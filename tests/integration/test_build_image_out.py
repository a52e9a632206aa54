"""`--tag`'s image (cwbuild/build_steps/image_out.py) in a private Podman store, checked with Podman's CLI
and Python's tarfile rather than with cwbuild's readers:

- the stored image has one layer whose entries are the bundle's files, and only those (for krun buildah's
  four), in order, with their types, modes and contents, owner 0:0, mtime SOURCE_DATE_EPOCH; the config
  carries the labels, Entrypoint ["/entrypoint"] for krun, and the epoch as its creation time;
- the same bundle stored again is the same image (same id), and so is the streamed archive loaded by the
  `podman load` CLI, with or without its first member; with it, Podman's oci-archive attempt stops at once
  (its debug log), without it the attempt unpacks everything and only then misses index.json;
- a tag Podman refuses leaves the loaded image to the rollback, which removes it; SIGTERM the moment the
  upload ends is held until the removal is registered, so the rollback removes the image then too;
- a bundle that changes while it is streamed fails the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from cwbuild.build import BuildContext
from cwbuild.build_steps import image_out
from cwbuild.config import BuildSpec, BuildTarget
from cwbuild.errors import BuildError
from cwbuild.launch.spec import Tee
from tests.conftest import REPO
from tests.integration.podman_env import Podman, podman

__all__ = ["podman"]  # fixture
pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCH = 1700000000
TAG = "localhost/cwbuild-image-out:test"
Entry = tuple[str, str, int, int, int, int, str]


def _bundle(root: Path, target: BuildTarget, disk: int = 3 << 20) -> Path:
    """A bundle's shape with small files: krun's four plus the manifest.json the layer must leave out, or a
    qemu bundle with subdirectories."""
    root.mkdir()
    files = {"disk.img": (os.urandom(disk) + b"tail", 0o600)}
    if target is BuildTarget.KRUN:
        files |= {"entrypoint": (b"\x7fELF not really", 0o755), "krun-sev.json": (b'{"tee":"snp"}', 0o600)}
        files |= {"manifest.json": (b"{}", 0o644)}
        (root / "tmp").mkdir()
        (root / "tmp").chmod(0o1777)
    else:
        files |= {"vmlinuz": (b"kernel", 0o644), "launch/qemu.sh": (b"#!/bin/sh\n", 0o755)}
        files |= {"firmware/OVMF.fd": (b"fw" * 5000, 0o644), "launch/libvirt.xml": (b"<domain/>", 0o644)}
    for rel, (data, mode) in files.items():
        path = root / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    return root


def _context(bundle: Path, target: BuildTarget, stack: ExitStack) -> BuildContext:
    spec = BuildSpec(
        image="localhost/x", output=bundle, tees=(Tee.SNP,), target=target, workload_id="wid-image-out"
    )
    ctx = BuildContext(spec=spec, work=bundle.parent, stage=bundle.parent, stack=stack)
    ctx.facts |= {
        "source_date_epoch": EPOCH,
        "manifest": {"tee": "snp"},
        "image": {"id": "sha256:" + "ab" * 32},
        "measurements": {"snp": {"measurement": "cd" * 48}},
    }
    return ctx


def _expected(bundle: Path, target: BuildTarget) -> list[Entry]:
    """The layer's entries from the directory itself: krun's four, or every entry, in sorted walk order."""
    if target is BuildTarget.KRUN:
        paths = [bundle / n for n in ("disk.img", "entrypoint", "krun-sev.json", "tmp")]
    else:
        paths = []
        for dirpath, dirnames, filenames in os.walk(bundle):
            dirnames.sort()
            if Path(dirpath) != bundle:
                paths.append(Path(dirpath))
            paths += [Path(dirpath, n) for n in sorted(filenames)]
    out = []
    for p in paths:
        st = p.lstat()
        is_dir = stat.S_ISDIR(st.st_mode)
        digest = "" if is_dir else hashlib.sha256(p.read_bytes()).hexdigest()
        out.append((p.relative_to(bundle).as_posix(), "dir" if is_dir else "file", stat.S_IMODE(st.st_mode)))
        out[-1] += (0, 0, EPOCH, digest)
    return out


def _layer_entries(podman: Podman, tmp: Path) -> tuple[list[Entry], dict[str, object]]:
    """`podman save` (docker-archive) of TAG: its single layer's entries, and the image config."""
    archive = tmp / "saved.tar"
    podman("save", "--format", "docker-archive", "-o", str(archive), TAG)
    with tarfile.open(archive) as outer:
        manifest = json.load(_extract(outer, "manifest.json"))
        config = json.load(_extract(outer, manifest[0]["Config"]))
        assert len(manifest[0]["Layers"]) == 1
        entries = []
        with tarfile.open(fileobj=_extract(outer, manifest[0]["Layers"][0]), mode="r|") as layer:
            for m in layer:
                f = layer.extractfile(m) if m.isreg() else None
                digest = hashlib.sha256(f.read()).hexdigest() if f else ""
                kind = "dir" if m.isdir() else "file" if m.isreg() else str(m.type)
                entries.append(
                    (m.name.rstrip("/"), kind, m.mode & 0o7777, m.uid, m.gid, int(m.mtime), digest)
                )
    return entries, config


def _extract(tar: tarfile.TarFile, name: str) -> tarfile.ExFileObject:
    f = tar.extractfile(name)
    assert f is not None, name
    return f


@pytest.fixture
def in_store(podman: Podman, monkeypatch: pytest.MonkeyPatch) -> Iterator[Podman]:
    """cwbuild's client pointed at the test store; the image removed afterwards whatever happened."""
    monkeypatch.setenv("CONTAINER_HOST", podman.env["CONTAINER_HOST"])
    yield podman
    podman("rmi", "-f", TAG, check=False)


@pytest.mark.parametrize("target", [BuildTarget.KRUN, BuildTarget.QEMU])
def test_the_image_is_the_bundle(in_store: Podman, tmp_path: Path, target: BuildTarget) -> None:
    bundle = _bundle(tmp_path / "bundle", target)
    with ExitStack() as stack:
        ctx = _context(bundle, target, stack)
        image_id = image_out.store_bundle_image(ctx, TAG)
    info = json.loads(in_store("image", "inspect", TAG).stdout)[0]
    assert "sha256:" + info["Id"] == image_id
    assert len(info["RootFS"]["Layers"]) == 1
    entries, config = _layer_entries(in_store, tmp_path)
    assert entries == _expected(bundle, target)
    assert info["Labels"] == image_out.labels(ctx)
    assert info["Labels"]["org.cwbuild.measurement.snp"] == "cd" * 48
    assert info["Config"].get("Entrypoint") == (["/entrypoint"] if target is BuildTarget.KRUN else None)
    assert config["created"] == "2023-11-14T22:13:20Z"  # date -u -d @1700000000
    assert len(ctx.rollbacks) == 1
    ctx.rollbacks[0]()
    assert in_store("image", "exists", image_id, check=False).returncode == 1


def _write(archive: image_out.DockerArchive, dest: Path) -> None:
    with dest.open("wb") as f:
        for chunk in archive:
            f.write(chunk)


def _oci_attempt(podman: Podman, archive: Path) -> tuple[str, str]:
    """`podman load` of `archive` by the local CLI (not the service: no CONTAINER_HOST) at debug level: the id
    it loaded and why its oci-archive attempt failed."""
    env = {k: v for k, v in os.environ.items() if k != "CONTAINER_HOST"}
    env["CONTAINERS_STORAGE_CONF"] = podman.env["CONTAINERS_STORAGE_CONF"]
    argv = ["podman", "--log-level=debug", "load", "-q", "-i", str(archive)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = proc.stdout.strip().rsplit(" ", 1)[-1]
    why = next(
        line for line in proc.stderr.splitlines() if "(oci-archive)" in line and "Error loading" in line
    )
    podman("rmi", "-f", loaded)
    return loaded, why


def test_same_bundle_same_image(in_store: Podman, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", BuildTarget.KRUN)
    with ExitStack() as stack:
        ctx = _context(bundle, BuildTarget.KRUN, stack)
        first = image_out.store_bundle_image(ctx, TAG)
        ctx.rollbacks.pop()()
        again = image_out.store_bundle_image(ctx, TAG)
        archive = image_out.DockerArchive(ctx, mtime=EPOCH)
        _write(archive, tmp_path / "archive.tar")
    assert first == again == archive.image_id
    with tarfile.open(tmp_path / "archive.tar") as tar:
        names = tar.getnames()
        lead = tar.getmember(names[0])
    assert names[0] == image_out.NOT_OCI_LINK[0]
    assert lead.islnk()
    assert lead.linkname == image_out.NOT_OCI_LINK[1]
    assert lead.linkname not in names
    in_store("rmi", "-f", TAG)
    loaded, why = _oci_attempt(in_store, tmp_path / "archive.tar")
    assert loaded == first
    assert "untarring file" in why, why  # stopped at the first member
    plain = tmp_path / "plain.tar"  # the same archive without its first member (one 512-byte header)
    with (tmp_path / "archive.tar").open("rb") as src, plain.open("wb") as dst:
        src.seek(tarfile.BLOCKSIZE)
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    loaded, why = _oci_attempt(in_store, plain)
    assert loaded == first
    assert "index.json" in why, why  # unpacked it all, then found no index
    assert "untarring" not in why, why


def test_refused_tag_leaves_the_image_to_the_rollback(in_store: Podman, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", BuildTarget.KRUN)
    with ExitStack() as stack:
        ctx = _context(bundle, BuildTarget.KRUN, stack)
        with pytest.raises(BuildError, match="storing the bundle image"):
            image_out.store_bundle_image(ctx, "localhost/Upper-Case-Is-Refused-By-Podman:x")
        archive = image_out.DockerArchive(ctx, mtime=EPOCH)
        _write(archive, tmp_path / "archive.tar")
    assert archive.image_id is not None
    assert in_store("image", "exists", archive.image_id, check=False).returncode == 0
    for undo in reversed(ctx.rollbacks):
        undo()
    assert in_store("image", "exists", archive.image_id, check=False).returncode == 1


_SIGTERM_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    from contextlib import ExitStack, contextmanager
    from pathlib import Path
    from cwbuild.build_steps import image_out
    from cwbuild.config import BuildTarget
    from tests.integration.test_build_image_out import TAG, _context

    def on_term(signum, frame):
        raise SystemExit(128 + signum)  # as cwbuild.build's handler

    signal.signal(signal.SIGTERM, on_term)
    real = image_out.deferred

    @contextmanager
    def term_after_upload():  # SIGTERM 0.1 s after the upload's end, while Podman stores the layer
        with real():
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
            yield

    image_out.deferred = term_after_upload
    with ExitStack() as stack:
        ctx = _context(Path(sys.argv[1]), BuildTarget.KRUN, stack)
        try:
            image_out.store_bundle_image(ctx, TAG)
        except BaseException:
            print(len(ctx.rollbacks), flush=True)
            for undo in reversed(ctx.rollbacks):
                undo()
            raise
    """
)


def test_sigterm_after_the_upload_still_rolls_back(in_store: Podman, tmp_path: Path) -> None:
    """Checked by hand: without the hold (`real()` replaced by a null context in the child) the signal
    interrupts the wait for Podman's answer, no removal is registered and the image stays in the store."""
    bundle = _bundle(tmp_path / "bundle", BuildTarget.KRUN, disk=96 << 20)
    with ExitStack() as stack:
        archive = image_out.DockerArchive(_context(bundle, BuildTarget.KRUN, stack), mtime=EPOCH)
        _write(archive, tmp_path / "archive.tar")
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_CHILD, str(bundle)],
        env={**os.environ, **in_store.env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stdout.strip() == "1", proc.stderr  # the removal was registered before the signal acted
    assert "Terminated" not in proc.stderr
    assert archive.image_id is not None
    assert in_store("image", "exists", archive.image_id, check=False).returncode == 1
    assert in_store("image", "exists", TAG, check=False).returncode == 1


@pytest.mark.parametrize(
    ("produced", "change", "message"),
    [
        (2, bytes(1000), "changed while it was being stored"),  # before disk.img's header: the size
        (3, None, "changed size while being stored"),  # after it: disk.img ends early
    ],
)
def test_a_bundle_that_changes_while_stored_fails(
    tmp_path: Path, produced: int, change: bytes | None, message: str
) -> None:
    bundle = _bundle(tmp_path / "bundle", BuildTarget.KRUN)
    with ExitStack() as stack:
        chunks = iter(image_out.DockerArchive(_context(bundle, BuildTarget.KRUN, stack), mtime=EPOCH))
        for _ in range(produced):  # the link, the layer's header, disk.img's header
            next(chunks)
        with (bundle / "disk.img").open("ab") as f:
            if change is None:
                f.truncate(1000)
            else:
                f.write(change)
        with pytest.raises(BuildError, match=message):
            for _ in chunks:
                pass

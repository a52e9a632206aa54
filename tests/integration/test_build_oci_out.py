"""`--tag oci:DIR[:TAG]` and `--tag oci-archive:FILE[:TAG]` (cwbuild/build_steps/image_out.py
`write_oci_image`), checked with json/tarfile/hashlib, skopeo and Podman rather than cwbuild's readers:

- the layout is image-spec v1.1's (oci-layout, index.json naming the manifest with the TAG as
  org.opencontainers.image.ref.name, blobs named by their SHA-256), the manifest lists the config and one
  uncompressed layer whose digest is its diff_id, the layer holds the bundle's entries; the config digest is
  the id Podman gives the same bundle stored through the REST API (the same config bytes);
- skopeo inspects and copies the directory into a Podman store, `podman load` takes the archive, and the
  image there has the id, the labels, krun's Entrypoint and layer;
- a failure (an entry the layer cannot hold, the destination appearing meanwhile, SIGTERM mid-write) leaves
  neither the destination nor the temporary directory; the rollback removes a written layout;
- a real `cwbuild build --target krun --tag oci-archive:...` writes an archive Podman loads, whose layer is
  buildah mkcw's four entries (tests/golden/buildah) with the bundle's contents.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from cwbuild.build_steps import image_out
from cwbuild.config import BuildTarget
from cwbuild.errors import BuildError, UsageError
from cwbuild.image.reference import parse_reference
from tests.conftest import REPO
from tests.integration.build_support import build, passphrase_file
from tests.integration.podman_env import Podman, hello_image, podman
from tests.integration.test_build_image_out import TAG, _bundle, _context, _expected, _layer_entries, in_store

__all__ = ["hello_image", "in_store", "podman"]  # fixtures
pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOLDEN = json.loads((REPO / "tests/golden/buildah/mkcw_layout.json").read_text())
REF_NAME = "org.opencontainers.image.ref.name"


def _files(dest: Path) -> dict[str, bytes]:
    """Every regular file of the layout, by its path inside it, from the directory or the tar."""
    if dest.is_dir():
        return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    with tarfile.open(dest) as tar:
        out = {}
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            if f is not None:
                out[m.name] = f.read()
        return out


def _check_layout(dest: Path, name: str) -> tuple[str, dict[str, object], bytes]:
    """The layout checked against image-spec: returns the config digest, the config, and the layer."""
    files = _files(dest)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    blobs = {k: v for k, v in files.items() if k.startswith("blobs/")}
    for path, data in blobs.items():
        assert path == "blobs/sha256/" + hashlib.sha256(data).hexdigest()
    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2
    (entry,) = index["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert entry["annotations"] == {REF_NAME: name}
    manifest_bytes = blobs["blobs/sha256/" + entry["digest"].removeprefix("sha256:")]
    assert len(manifest_bytes) == entry["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    config_bytes = blobs["blobs/sha256/" + manifest["config"]["digest"].removeprefix("sha256:")]
    layer_bytes = blobs["blobs/sha256/" + layer["digest"].removeprefix("sha256:")]
    assert (len(config_bytes), len(layer_bytes)) == (manifest["config"]["size"], layer["size"])
    config = json.loads(config_bytes)
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer["digest"]]}
    assert len(blobs) == 3
    return manifest["config"]["digest"], config, layer_bytes


def _entries(layer: bytes) -> list[tuple[str, str, int, int, int, int, str]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r|") as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            digest = hashlib.sha256(f.read()).hexdigest() if f else ""
            kind = "dir" if m.isdir() else "file" if m.isreg() else str(m.type)
            out.append((m.name.rstrip("/"), kind, m.mode & 0o7777, m.uid, m.gid, int(m.mtime), digest))
    return out


@pytest.mark.parametrize("target", [BuildTarget.KRUN, BuildTarget.QEMU])
@pytest.mark.parametrize(
    ("transport", "suffix", "name"), [("oci", ":v1.0", "v1.0"), ("oci-archive", "", "latest")]
)
def test_layout_is_the_podman_image(
    in_store: Podman, tmp_path: Path, target: BuildTarget, transport: str, suffix: str, name: str
) -> None:
    bundle = _bundle(tmp_path / "bundle", target)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "image"
    with ExitStack() as stack:
        ctx = _context(bundle, target, stack)
        image_id = image_out.write_oci_image(ctx, parse_reference(f"{transport}:{dest}{suffix}"))
        assert os.listdir(out) == ["image"]  # no temporary directory left
        assert dest.is_dir() is (transport == "oci")
        digest, config, layer = _check_layout(dest, name)
        assert digest == image_id
        assert _entries(layer) == _expected(bundle, target)
        assert config["config"]["Labels"] == image_out.labels(ctx)
        assert config["config"].get("Entrypoint") == (["/entrypoint"] if target is BuildTarget.KRUN else None)
        assert config["created"] == "2023-11-14T22:13:20Z"  # date -u -d @1700000000
        assert image_out.store_bundle_image(ctx, TAG) == image_id  # the same config bytes through Podman
        info = json.loads(in_store("image", "inspect", TAG).stdout)[0]
        assert "sha256:" + info["Id"] == image_id
        for undo in reversed(ctx.rollbacks):  # the Podman image, then the layout
            undo()
    assert os.listdir(out) == []
    assert in_store("image", "exists", image_id, check=False).returncode == 1


def _skopeo(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        ["skopeo", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_skopeo_and_podman_take_it(in_store: Podman, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", BuildTarget.KRUN)
    store = {"CONTAINERS_STORAGE_CONF": in_store.env["CONTAINERS_STORAGE_CONF"]}
    with ExitStack() as stack:
        ctx = _context(bundle, BuildTarget.KRUN, stack)
        layout = tmp_path / "layout"
        image_id = image_out.write_oci_image(ctx, parse_reference(f"oci:{layout}"))
        archive = tmp_path / "image.tar"
        assert image_out.write_oci_image(ctx, parse_reference(f"oci-archive:{archive}:x")) == image_id
        want = _expected(bundle, BuildTarget.KRUN)
        for ref in (f"oci:{layout}", f"oci:{layout}:latest", f"oci-archive:{archive}:x"):
            seen = json.loads(_skopeo("inspect", ref, env=store))
            assert seen["Labels"] == image_out.labels(ctx)
            assert len(seen["Layers"]) == 1
        _skopeo("copy", "-q", f"oci:{layout}", f"containers-storage:{TAG}", env=store)
        info = json.loads(in_store("image", "inspect", TAG).stdout)[0]
        assert "sha256:" + info["Id"] == image_id
        assert info["Labels"] == image_out.labels(ctx)
        assert info["Config"]["Entrypoint"] == ["/entrypoint"]
        assert _layer_entries(in_store, tmp_path)[0] == want
        in_store("rmi", "-f", TAG)
        in_store("load", "-q", "-i", str(archive))
        in_store("tag", image_id.removeprefix("sha256:"), TAG)
        info = json.loads(in_store("image", "inspect", TAG).stdout)[0]
        assert "sha256:" + info["Id"] == image_id
        assert info["Config"]["Entrypoint"] == ["/entrypoint"]
        assert _layer_entries(in_store, tmp_path)[0] == want
        in_store("rmi", "-f", image_id.removeprefix("sha256:"))


@pytest.mark.parametrize("transport", ["oci", "oci-archive"])
def test_failures_leave_nothing(tmp_path: Path, transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _bundle(tmp_path / "bundle", BuildTarget.QEMU)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "image"
    with ExitStack() as stack:
        ctx = _context(bundle, BuildTarget.QEMU, stack)
        (bundle / "launch" / "link").symlink_to("qemu.sh")
        with pytest.raises(BuildError, match="neither a file nor a directory"):
            image_out.write_oci_image(ctx, parse_reference(f"{transport}:{dest}"))
        assert os.listdir(out) == []
        (bundle / "launch" / "link").unlink()
        real = image_out.layer_stream

        def stream(*args: Any, **kwargs: Any) -> Iterator[bytes]:  # the destination appears meanwhile
            dest.mkdir()
            return real(*args, **kwargs)

        monkeypatch.setattr(image_out, "layer_stream", stream)
        with pytest.raises(UsageError, match="appeared during the build"):
            image_out.write_oci_image(ctx, parse_reference(f"{transport}:{dest}"))
        assert os.listdir(out) == ["image"]
        assert os.listdir(dest) == []  # left alone
        assert ctx.rollbacks == []


_SIGTERM_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from contextlib import ExitStack
    from pathlib import Path
    from cwbuild.build_steps import image_out
    from cwbuild.config import BuildTarget
    from cwbuild.image.reference import parse_reference
    from tests.integration.test_build_image_out import _context

    def on_term(signum, frame):
        raise SystemExit(128 + signum)  # as cwbuild.build's handler

    signal.signal(signal.SIGTERM, on_term)
    real = image_out.layer_stream

    def stream(*args, **kwargs):  # SIGTERM once a few MiB of the layer are written
        for n, chunk in enumerate(real(*args, **kwargs)):
            if n == 8:
                os.kill(os.getpid(), signal.SIGTERM)
            yield chunk

    image_out.layer_stream = stream
    with ExitStack() as stack:
        ctx = _context(Path(sys.argv[1]), BuildTarget.KRUN, stack)
        image_out.write_oci_image(ctx, parse_reference(sys.argv[2]))
    """
)


@pytest.mark.parametrize("transport", ["oci", "oci-archive"])
def test_sigterm_while_writing_leaves_nothing(tmp_path: Path, transport: str) -> None:
    bundle = _bundle(tmp_path / "bundle", BuildTarget.KRUN, disk=32 << 20)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_CHILD, str(bundle), f"{transport}:{out}/image"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert os.listdir(out) == []


def test_build_writes_an_oci_archive(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    passfile, _ = passphrase_file(tmp_path / "s", b"pass123")
    out, archive = tmp_path / "krun", tmp_path / "hello.tar"
    args: list[str | Path] = [hello_image, "-o", out, "--target", "krun", "--type", "snp", "--memory", "512"]
    args += ["--workload-id", "wid-oci", "--passphrase-file", passfile, "--tag", f"oci-archive:{archive}:v1"]
    proc = build(args, env=podman.env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hello.tar", "krun", "s"]
    digest, config, layer = _check_layout(archive, "v1")
    entries = _entries(layer)
    golden = [(e["name"], e["type"], int(e["mode"], 8), e["uid"], e["gid"]) for e in GOLDEN["entries"]]
    assert [e[:5] for e in entries] == golden
    for name, kind, *_, sha in entries:
        if kind == "file":
            assert sha == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    labels = config["config"]["Labels"]
    assert labels["org.cwbuild.workload-id"] == "wid-oci"
    assert labels["org.cwbuild.target"] == "krun"
    podman("load", "-q", "-i", str(archive))
    try:
        info = json.loads(podman("image", "inspect", digest[7:]).stdout)[0]
        assert "sha256:" + info["Id"] == digest
        assert info["Config"]["Entrypoint"] == GOLDEN["config"]["Entrypoint"]
        assert info["Labels"] == labels
    finally:
        podman("rmi", "-f", digest[7:], check=False)
    args[2] = tmp_path / "again"
    proc = build(args, env=podman.env)  # the archive exists now: refused before any work
    assert proc.returncode != 0
    assert f"{archive} already exists" in proc.stderr.decode()
    assert not (tmp_path / "again").exists()

"""Against a real Podman: `cwbuild inspect` reads the store through the REST API, and `cwbuild rootfs` gives
exactly the tree of `podman export` of a container created from the same image, entry by entry. The hostile
cases' expectations (tests/hostile.py) are re-derived from Podman here."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cwbuild
from tests.hostile import CASES, Refused, snapshot_tar
from tests.imagekit import E, docker_archive, layer_tar, oci_layout
from tests.integration.podman_env import Podman, full_tree_dir, full_tree_tar, hello_image, podman

__all__ = ["hello_image", "podman"]  # fixtures
pytestmark = pytest.mark.integration

_BIG = random.Random(7).randbytes(300_000)
LAYERED = [
    [
        E("etc", kind="dir", mtime=1_600_000_000),
        E("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", mtime=1_600_000_001, xattrs={"user.kind": "db"}),
        E("usr/bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o755),
        E("usr/bin/suid", data=b"s", mode=0o4755),
        E("usr/bin/sgid", data=b"g", mode=0o2711, gid=42),
        E("home/user", kind="dir", uid=1000, gid=1000, mode=0o700, xattrs={"user.quota": "10G"}),
        E("home/user/.profile", data=b"old", uid=1000, gid=1000, mode=0o600),
        E("opt/old/a", data=b"a"),
        E("opt/old/sub/b", data=b"b"),
        E("var/lib/x", data=b"x"),
        E("tmp", kind="dir", mode=0o1777),
        E("data/big", data=_BIG, mtime=1_500_000_000),
        E("data/hard", kind="hardlink", link="data/big"),
        E("lnk-rel", kind="symlink", link="usr/bin/tool"),
        E("lnk-abs", kind="symlink", link="/etc/passwd"),
        E("lnk-dangling", kind="symlink", link="/nowhere/at/all"),
        E("naïve/日本語/ファイル.txt", data="ü".encode()),
        E("sp ace/tab\tname", data=b"t"),
        E("fifo", kind="fifo", mode=0o600),
        E("dev/null", kind="char", mode=0o666),
        E("dirlink", kind="symlink", link="/opt"),
    ],
    [
        E("opt/old/.wh..wh..opq"),
        E("opt/old/c", data=b"c", xattrs={"user.ü": "ß"}),
        E("var/lib/.wh.x"),
        E("etc/passwd", data=b"changed\n", mode=0o600, mtime=1_700_000_123),
        E("usr/bin/.wh.tool"),
        E("home/user/.profile", data=b"new", uid=1000, gid=1000, mode=0o640),
        E("data/hard2", kind="hardlink", link="/data/big"),
    ],
    # Writing through `dirlink` works in Podman when a container is made, but then `podman save` of the image
    # fails (the layer's tar-split names a path that is not in the layer), so the REST export cannot carry it:
    # that case is in tests/hostile.py (symlink-parent-absolute-resolves-inside) instead.
    [
        E("naïve/.wh.日本語"),
        E("etc", kind="dir", mode=0o750, uid=3, gid=4),
        E("opt/new", data=b"n", uid=7, gid=8),
    ],
]


def _compare(ours: Path, export: Path) -> list[str]:
    got, got_groups = full_tree_dir(ours)
    want, want_groups, devices = full_tree_tar(export)
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path] == want[path], path
    assert got_groups == want_groups
    return devices


def test_hello_inspect_reads_the_store(podman: Podman, hello_image: str) -> None:
    proc = cwbuild(["inspect", hello_image, "--json"], env=podman.env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    inspect = json.loads(podman("image", "inspect", hello_image).stdout)[0]
    assert [layer["diff_id"] for layer in doc["layers"]] == inspect["RootFS"]["Layers"]
    assert doc["id"] == "sha256:" + inspect["Id"]
    assert doc["manifest_digest"] == inspect["Digest"]
    assert doc["config"]["Entrypoint"] == ["/usr/local/bin/hello"]
    assert doc["config"]["WorkingDir"] == "/srv/app"
    assert "GREETING=hello from a confidential workload" in doc["config"]["Env"]
    assert len(doc["layers"]) >= 4


def test_hello_rootfs_equals_podman_export(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    proc = cwbuild(["rootfs", hello_image, tmp_path / "ours"], env=podman.env)
    assert proc.returncode == 0, proc.stderr
    assert _compare(tmp_path / "ours", podman.export(hello_image, tmp_path / "export.tar")) == []
    assert not (tmp_path / "ours/var/tmp/scratch.txt").exists()  # removed by a whiteout
    assert os.readlink(tmp_path / "ours/bin/sh") == "/bin/busybox"


def test_layered_rootfs_equals_podman_export(podman: Podman, tmp_path: Path) -> None:
    archive = docker_archive(
        tmp_path / "layered.tar",
        [layer_tar(layer) for layer in LAYERED],
        repo_tag="localhost/cwbuild-layered:latest",
    )
    load = podman.load(archive)
    assert load.returncode == 0, load.stderr
    proc = cwbuild(
        ["rootfs", "localhost/cwbuild-layered:latest", tmp_path / "ours", "--json"], env=podman.env
    )
    assert proc.returncode == 0, proc.stderr
    devices = _compare(
        tmp_path / "ours", podman.export("localhost/cwbuild-layered:latest", tmp_path / "e.tar")
    )
    assert json.loads(proc.stdout)["skipped_devices"] == devices == ["/dev/null"]
    assert (tmp_path / "ours/opt/new").stat().st_uid == 7
    assert sorted(os.listdir(tmp_path / "ours/opt/old")) == ["c"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_case_matches_podman(podman: Podman, name: str, tmp_path: Path) -> None:
    layers, expected = CASES[name]
    tag = f"localhost/cwbuild-hostile-{name}:latest"
    archive = docker_archive(tmp_path / "image.tar", [layer_tar(entries) for entries in layers], repo_tag=tag)
    load = podman.load(archive)
    if isinstance(expected, Refused):
        assert load.returncode != 0, "Podman accepted a layer that cwbuild refuses"
        return
    assert load.returncode == 0, load.stderr
    try:
        assert snapshot_tar(podman.export(tag, tmp_path / "export.tar")) == expected
    finally:
        podman("rmi", "-f", tag, check=False)


def test_private_service_when_none_listens(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    spool = tmp_path / "tmp"
    spool.mkdir()
    env = {**podman.env, "CONTAINER_HOST": f"unix://{tmp_path}/nobody.sock", "TMPDIR": str(spool)}
    proc = cwbuild(["--debug", "inspect", hello_image, "--json"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert b"podman system service" in proc.stderr  # started by cwbuild (logged at debug)
    assert json.loads(proc.stdout)["config"]["WorkingDir"] == "/srv/app"
    assert list(spool.iterdir()) == []  # socket directory and spool removed


def test_store_image_with_zstd_layers(podman: Podman, tmp_path: Path) -> None:
    """Podman cannot export an image whose layers are zstd as docker-archive; cwbuild falls back to
    oci-archive and still checks the config digest and diff_ids against the store."""
    layers = [layer_tar(layer) for layer in LAYERED[:2]]
    oci_layout(tmp_path / "layout", layers, compression="zstd")
    tag = "localhost/cwbuild-zstd:latest"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{tmp_path / 'layout'}:latest", f"containers-storage:{tag}"],
        env={**os.environ, "CONTAINERS_STORAGE_CONF": podman.env["CONTAINERS_STORAGE_CONF"]},
        check=True,
        capture_output=True,
        timeout=300,
    )
    proc = cwbuild(["inspect", tag, "--json"], env=podman.env)
    assert proc.returncode == 0, proc.stderr
    inspect = json.loads(podman("image", "inspect", tag).stdout)[0]
    assert [layer["diff_id"] for layer in json.loads(proc.stdout)["layers"]] == inspect["RootFS"]["Layers"]
    proc = cwbuild(["--debug", "rootfs", tag, tmp_path / "ours"], env=podman.env)
    assert proc.returncode == 0, proc.stderr
    assert b"oci-archive" in proc.stderr  # the fallback was taken
    _compare(tmp_path / "ours", podman.export(tag, tmp_path / "export.tar"))

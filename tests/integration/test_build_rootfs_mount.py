"""`cwbuild build --rootfs-via mount` (the image's tree mounted from the Podman store, cwbuild.image.mount)
against `--rootfs-via export` (Podman's export applied by cwbuild): for the example image and a multi-layer
image with whiteouts, an opaque directory, hardlinks, xattrs, owners and setuid bits, the plaintext ext4
images have the same sha256 for the same SOURCE_DATE_EPOCH (build_support.build fixes it). The manifest says
which path was taken, and no container is left in the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.imagekit import E, docker_archive, layer_tar
from tests.integration.build_support import KIT_CACHE, build, passphrase_file
from tests.integration.podman_env import Podman, hello_image, podman
from tests.integration.test_build import _rich_layers

__all__ = ["hello_image", "podman"]  # fixtures


def _fs(podman: Podman, image: str, via: str, tmp_path: Path) -> tuple[str, str]:
    passfile, _ = passphrase_file(tmp_path / f"s-{via}")
    out = tmp_path / via
    args: list[str | Path] = [image, "-o", out, "--target", "krun", "--tee", "snp", "--memory", "512"]
    proc = build([*args, "--passphrase-file", passfile, "--rootfs-via", via], env=podman.env)
    assert proc.returncode == 0, proc.stderr.decode()
    manifest = json.loads((out / "manifest.json").read_text())
    assert podman("ps", "--all", "--quiet").stdout.strip() == ""  # the mount's container is gone
    return manifest["filesystem"]["sha256"], manifest["image"]["rootfs_source"]


def test_mount_and_export_give_the_same_filesystem(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    mounted, source = _fs(podman, hello_image, "mount", tmp_path)
    assert source == "podman-mount"
    exported, source = _fs(podman, hello_image, "export", tmp_path)
    assert source == "export"
    assert mounted == exported


@pytest.mark.parametrize("parents", [True, False], ids=["dir-entries", "implicit-parents"])
def test_multilayer_mount_and_export_give_the_same_filesystem(
    podman: Podman, tmp_path: Path, parents: bool
) -> None:
    tag = f"localhost/cwbuild-mount-layers:{parents}".lower()
    layers = _rich_layers(parent_dirs=parents)
    load = podman.load(docker_archive(tmp_path / "image.tar", layers, repo_tag=tag))
    assert load.returncode == 0, load.stderr
    mounted, source = _fs(podman, tag, "mount", tmp_path)
    assert source == ("podman-mount" if parents else "export")
    exported, source = _fs(podman, tag, "export", tmp_path)
    assert source == "export"
    assert mounted == exported


def test_sigterm_while_mounted_leaves_no_container(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    passfile, _ = passphrase_file(tmp_path / "s")
    parent = tmp_path / "out"
    parent.mkdir()
    argv = [sys.executable, "-m", "cwbuild", "build", "--kit-cache", str(KIT_CACHE), "--offline", hello_image]
    argv += ["-o", str(parent / "b"), "--target", "krun", "--passphrase-file", str(passfile)]
    proc = subprocess.Popen(argv, env={**os.environ, **podman.env}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    containers = podman.root / "graph/vfs-containers/containers.json"  # containers/storage's record
    while b"cwbuild-rootfs-" not in (containers.read_bytes() if containers.exists() else b""):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert podman("ps", "--all", "--quiet").stdout.strip() == ""
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("via", ["mount", "export"])
def test_an_image_for_another_platform_is_refused(podman: Podman, tmp_path: Path, via: str) -> None:
    tag = "localhost/cwbuild-arm64:latest"
    # A store holds one image per name, whatever its platform: only cwbuild's check stands between it and
    # a disk an x86-64 VM cannot run.
    layers = [layer_tar([E("bin", kind="dir"), E("bin/sh", data=b"#!/bin/sh\n", mode=0o755)])]
    archive = docker_archive(tmp_path / "arm64.tar", layers, repo_tag=tag, architecture="arm64", variant="v8")
    load = podman.load(archive)
    assert load.returncode == 0, load.stderr
    passfile, _ = passphrase_file(tmp_path / "s")
    parent = tmp_path / "out"
    parent.mkdir()
    args: list[str | Path] = [tag, "-o", parent / "b", "--target", "krun", "--passphrase-file", passfile]
    proc = build([*args, "--rootfs-via", via], env=podman.env)
    assert proc.returncode == 1
    assert "is a linux/arm64/v8 image, not linux/amd64" in proc.stderr.decode()
    assert list(parent.iterdir()) == []
    assert podman("ps", "--all", "--quiet").stdout.strip() == ""

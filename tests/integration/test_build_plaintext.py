"""Where a build's plaintext lives: in a private directory of the memory file system when it fits (the
manifest says so), and that directory is gone after the build, after a failure and after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwbuild.build_steps.common import MEMORY_FS
from tests.conftest import cwbuild
from tests.integration.podman_env import Podman, hello_image, podman

__all__ = ["hello_image", "podman"]  # fixtures
pytestmark = pytest.mark.integration
SHM = Path(MEMORY_FS)


def _ours() -> set[Path]:
    return set(SHM.glob(".cwbuild-plain-*"))


def _argv(image: str, out: Path, passfile: Path) -> list[str]:
    argv = [sys.executable, "-m", "cwbuild", "build", image, "-o", str(out), "--target", "krun"]
    return [*argv, "--passphrase-file", str(passfile)]


def _passfile(tmp_path: Path) -> Path:
    path = tmp_path / "pass"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"correct horse battery staple")
    os.close(fd)
    return path


def test_plaintext_in_memory_and_removed(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    before = _ours()
    out = tmp_path / "bundle"
    proc = cwbuild(_argv(hello_image, out, _passfile(tmp_path))[3:], env=podman.env)
    assert proc.returncode == 0, proc.stderr.decode()
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert [s["plaintext_on"] for s in steps if s["step"] == "flatten image"] == ["memory"]
    assert _ours() <= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "pass"]


def test_sigterm_with_plaintext_in_memory_leaves_nothing(
    podman: Podman, hello_image: str, tmp_path: Path
) -> None:
    before = _ours()
    parent = tmp_path / "out"
    parent.mkdir()
    argv = _argv(hello_image, parent / "bundle", _passfile(tmp_path))
    proc = subprocess.Popen(argv, env={**os.environ, **podman.env}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (seen := _ours() - before):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert not any(p.exists() for p in seen)
    assert list(parent.iterdir()) == []

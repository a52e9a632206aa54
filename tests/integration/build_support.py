"""Helpers for the `cwbuild build` tests: run the build against the test kit cache and a private Podman
store, a passphrase file, and the check that a failed build left nothing behind."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import ASSETS, cwbuild
from tests.integration.attest_support import write_secret

KIT_CACHE = ASSETS / "kits"
EPOCH = "1700000000"
#: What cwbuild adds to every workload filesystem (cwbuild.disk.fs: the runtime config read by krun's init
#: and ours) and what mkfs.ext4 adds (lost+found).
ADDED = {".krun_config.json", ".cwbuild", ".cwbuild/config.json", "lost+found"}


def passphrase_file(where: Path, data: bytes | None = None) -> tuple[Path, bytes]:
    secret = data if data is not None else os.urandom(24).hex().encode()
    where.mkdir(parents=True, exist_ok=True)
    return write_secret(where / "passphrase", secret), secret


def build(
    args: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str],
    kit_cache: Path = KIT_CACHE,
    timeout: float = 600,
) -> subprocess.CompletedProcess[bytes]:
    """`cwbuild build` with a kit cache, offline, and a fixed SOURCE_DATE_EPOCH."""
    return cwbuild(
        ["build", "--kit-cache", kit_cache, "--offline", *args],
        env={**env, "SOURCE_DATE_EPOCH": EPOCH},
        timeout=timeout,
    )


def hidden_dirs(parent: Path) -> list[str]:
    """The build's private directories (.cwbuild-plain-*, .NAME.partial-*): a finished build leaves none."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))

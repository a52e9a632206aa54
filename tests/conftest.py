"""Shared test fixtures: paths to ../shared and to the test assets installed by scripts/setup.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
ASSETS = Path(os.environ.get("CWBUILD_ASSETS", "/var/cache/cwbuild-test-assets"))


def cwbuild(
    args: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as a user would: `python -m cwbuild ...` with the test's interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "cwbuild", *map(str, args)],
        input=input,
        capture_output=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"{FIXTURES} missing: ../shared must sit beside the checkout"
    return FIXTURES


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    assert ASSETS.is_dir(), f"{ASSETS} missing: run scripts/setup.sh"
    return ASSETS

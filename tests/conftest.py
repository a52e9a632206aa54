"""Shared test fixtures: paths to ../shared and to the test assets installed by scripts/setup.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
ASSETS = Path(os.environ.get("CWBUILD_ASSETS", "/var/cache/cwbuild-test-assets"))

#: Timings that tests report (name -> seconds), printed in pytest's terminal summary.
TIMINGS: dict[str, list[float]] = {}


def report_timing(name: str, seconds: float) -> None:
    """Record a figure for the end-of-run summary (e.g. boot-to-workload time under TCG)."""
    TIMINGS.setdefault(name, []).append(seconds)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("cwbuild timings")
    for name, values in sorted(TIMINGS.items()):
        low, high = min(values), max(values)
        terminalreporter.write_line(
            f"{name}: {len(values)} runs, min {low:.1f} s, median {sorted(values)[len(values) // 2]:.1f} s, "
            f"max {high:.1f} s"
        )


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

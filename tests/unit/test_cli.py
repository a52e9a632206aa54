from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cwbuild import __version__
from cwbuild.errors import SecretFileError, ToolError, ToolNotFoundError
from cwbuild.run import run
from cwbuild.secrets import read_master_key_file, read_passphrase_file, read_token_file
from tests.conftest import cwbuild


def test_version() -> None:
    proc = cwbuild(["--version"])
    assert proc.returncode == 0
    assert __version__ in proc.stdout.decode()


def test_help_lists_commands() -> None:
    proc = cwbuild(["--help"])
    assert proc.returncode == 0
    assert b"Usage: cwbuild" in proc.stdout


def test_unknown_command_is_usage_error() -> None:
    proc = cwbuild(["no-such-command"])
    assert proc.returncode == 2
    assert b"No such command" in proc.stderr


def test_run_missing_tool() -> None:
    with pytest.raises(ToolNotFoundError, match="not found"):
        run(["cwbuild-no-such-tool-xyz"])


def test_run_failure_carries_stderr_tail_and_redacts() -> None:
    with pytest.raises(ToolError) as info:
        run(["sh", "-c", "echo boom >&2; exit 3", "secret-arg"], redact=[3])
    err = info.value
    assert err.returncode == 3
    assert "boom" in err.stderr_tail
    assert "secret-arg" not in err.argv
    assert "secret-arg" not in err.diagnostics()


def test_run_stdin_closed_by_default() -> None:
    proc = run(["cat"])
    assert proc.stdout == b""


def _secret(tmp_path: Path, data: bytes, mode: int = 0o600) -> Path:
    p = tmp_path / "secret"
    p.write_bytes(data)
    os.chmod(p, mode)
    return p


def test_passphrase_strips_one_newline(tmp_path: Path) -> None:
    assert read_passphrase_file(_secret(tmp_path, b"pass\n\n")) == b"pass\n"


def test_secret_file_group_readable_refused(tmp_path: Path) -> None:
    p = _secret(tmp_path, b"hunter2", 0o640)
    with pytest.raises(SecretFileError) as info:
        read_passphrase_file(p)
    assert "hunter2" not in info.value.diagnostics()
    assert oct(stat.S_IMODE(p.stat().st_mode)).endswith("640")


def test_token_file_rules(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError):
        read_token_file(_secret(tmp_path, b"short\n"))
    assert read_token_file(_secret(tmp_path, b"a" * 40 + b"\n")) == "a" * 40


def test_master_key_forms(tmp_path: Path) -> None:
    raw = bytes(range(32))
    assert read_master_key_file(_secret(tmp_path, raw)) == raw
    assert read_master_key_file(_secret(tmp_path, raw.hex().encode() + b"\n")) == raw
    with pytest.raises(SecretFileError):
        read_master_key_file(_secret(tmp_path, b"x" * 31))

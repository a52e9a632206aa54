"""A SIGTERM that lands right after cwbuild made a private directory or file, before its removal was
registered, must not leave it behind: creation and registration run with signals held (cwbuild.interrupts).
Each test delivers the signal at exactly that moment, from inside the creating call."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from cwbuild import build
from cwbuild.build_steps import common, output
from cwbuild.config import merge
from cwbuild.disk import luks


def _sigterm_after(
    real: Callable[..., Any], made: list[str], prefix: str, *, by_argument: bool = False
) -> Callable[..., Any]:
    """`real`, which, when the path it made (its result, or with `by_argument` its first argument) starts
    with `prefix`, records it and then has a SIGTERM delivered (its handler runs at the next bytecode
    boundary, before the caller could register the removal)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        name = str(args[0] if by_argument else result)
        if name.startswith(prefix):
            made.append(name)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    return call


def _run_under_sigterm(body: Callable[[ExitStack], object]) -> None:
    def run() -> None:
        with build._terminate_as_exit(), ExitStack() as stack:
            body(stack)

    with pytest.raises(SystemExit):
        run()


def test_build_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out").mkdir()
    made: list[str] = []
    monkeypatch.setattr(tempfile, "mkdtemp", _sigterm_after(tempfile.mkdtemp, made, str(tmp_path)))
    spec = merge({"image": "localhost/app", "passphrase_file": "pp", "output": tmp_path / "out/b"}, {})
    _run_under_sigterm(lambda stack: build._private_dirs(spec, stack))
    assert made
    assert list((tmp_path / "out").iterdir()) == []


def test_plaintext_dir_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    monkeypatch.setattr(tempfile, "mkdtemp", _sigterm_after(tempfile.mkdtemp, made, common.MEMORY_FS))
    spec = merge({"image": "localhost/app", "passphrase_file": "pp"}, {})

    def body(stack: ExitStack) -> None:
        ctx = build.BuildContext(spec=spec, work=tmp_path / "w", stage=tmp_path / "s", stack=stack)
        common._plaintext_dir(ctx, 1 << 20)

    _run_under_sigterm(body)
    assert made
    assert not Path(made[0]).exists()


def test_luks_temp_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    ours = _sigterm_after(os.open, made, str(tmp_path / ".disk.img."), by_argument=True)
    monkeypatch.setattr(luks.os, "open", ours)

    def body(stack: ExitStack) -> None:
        stack.enter_context(luks._private_output(tmp_path / "disk.img"))

    _run_under_sigterm(body)
    assert made
    assert list(tmp_path.iterdir()) == []


def test_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM right after the stage was renamed onto the output: the failed build leaves no bundle."""
    (tmp_path / "out").mkdir()
    made: list[str] = []
    out = tmp_path / "out/b"
    monkeypatch.setattr(
        output.os, "replace", _sigterm_after(os.replace, made, str(tmp_path), by_argument=True)
    )
    spec = merge({"image": "localhost/app", "passphrase_file": "pp", "output": out, "target": "krun"}, {})

    def body(stack: ExitStack) -> None:
        work, stage = build._private_dirs(spec, stack)
        (stage / "disk.img").write_bytes(b"x")
        ctx = build.BuildContext(spec=spec, work=work, stage=stage, stack=stack)
        try:
            output.publish(ctx)
        except BaseException:
            build._roll_back(ctx, build.Console(stderr=True))
            raise

    _run_under_sigterm(body)
    assert made
    assert list((tmp_path / "out").iterdir()) == []

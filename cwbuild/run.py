"""The one door to external programs (STYLE.md rule 1).

argv lists only, never a shell; stdin closed unless bytes are given; a scrubbed environment; `+ cmd`
logged at debug with secret-bearing arguments redacted; a missing program raises `ToolNotFoundError`; a
non-zero exit raises `ToolError` with argv, exit code and the tail of stderr. Secrets travel on stdin or an
inherited file descriptor, never in argv.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from cwbuild.errors import ToolError, ToolNotFoundError

log = logging.getLogger("cwbuild.run")

#: Variables passed through from the caller's environment; everything else is dropped.
_KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "XDG_RUNTIME_DIR", "CONTAINERS_STORAGE_CONF")
_STDERR_TAIL_LINES = 20


def scrubbed_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: a few inherited variables, C locale unless set, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k in _KEEP_ENV}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def find_tool(name: str) -> str:
    """Absolute path of `name` on PATH (plus the sbin directories), or `ToolNotFoundError`."""
    path = scrubbed_env()["PATH"] + ":/usr/sbin:/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise ToolNotFoundError(f"{name} not found", hint=f"install the package that provides {name}")
    return found


def _render(argv: Sequence[str | Path], redact: Sequence[int]) -> str:
    return " ".join("<redacted>" if i in redact else shlex.quote(str(a)) for i, a in enumerate(argv))


def run(  # noqa: PLR0913 - keyword-only options mirroring subprocess.run
    argv: Sequence[str | Path],
    *,
    input: bytes | None = None,
    check: bool = True,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    redact: Sequence[int] = (),
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run a program to completion. `redact` lists argv indexes never to be logged."""
    if not argv:
        raise ValueError("empty argv")
    exe = find_tool(str(argv[0])) if "/" not in str(argv[0]) else str(argv[0])
    full = [exe, *(str(a) for a in argv[1:])]
    log.debug("+ %s", _render(argv, redact))
    try:
        proc = subprocess.run(
            full,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=scrubbed_env(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as exc:
        raise ToolNotFoundError(f"{argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(
            f"{Path(exe).name} timed out after {timeout} s", argv=_safe_argv(argv, redact)
        ) from exc
    if check and proc.returncode != 0:
        raise ToolError(
            f"{Path(exe).name} failed with exit code {proc.returncode}",
            argv=_safe_argv(argv, redact),
            returncode=proc.returncode,
            stderr_tail=_tail(proc.stderr),
        )
    return proc


def spawn(  # noqa: PLR0913 - keyword-only options mirroring subprocess.Popen
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    redact: Sequence[int] = (),
    pass_fds: Sequence[int] = (),
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running program (a service, a VM). The caller owns its lifetime. `new_session`: out of
    the terminal's process group, so a Ctrl-C reaches only us and our cleanup can still use the program."""
    exe = find_tool(str(argv[0])) if "/" not in str(argv[0]) else str(argv[0])
    log.debug("+ %s &", _render(argv, redact))
    try:
        return subprocess.Popen(
            [exe, *(str(a) for a in argv[1:])],
            env=scrubbed_env(env),
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            start_new_session=new_session,
        )
    except FileNotFoundError as exc:
        raise ToolNotFoundError(f"{argv[0]} not found") from exc


def _safe_argv(argv: Sequence[str | Path], redact: Sequence[int]) -> list[str]:
    return ["<redacted>" if i in redact else str(a) for i, a in enumerate(argv)]


def _tail(data: bytes | None) -> str:
    if not data:
        return ""
    lines = data.decode("utf-8", "replace").rstrip().splitlines()
    return "\n".join(lines[-_STDERR_TAIL_LINES:])

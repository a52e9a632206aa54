"""`cwbuild build`: an ordered list of small steps (STYLE.md rule 9; DESIGN.md "The build, as data flowing").

Each step is a function of the `BuildContext` returning the artifact it made (bundle-relative path, sha256,
size) or None; `run_build` times it, shows progress and records it in manifest.json. Where things live:

  - `ctx.work`: a 0700 directory holding the plaintext (rootfs, ext4 image): beside the output, or in
    /dev/shm when the image fits there with room to spare (build_steps.common._plaintext_dir); removed on
    every exit path, including SIGTERM and Ctrl-C.
  - `ctx.stage`: a 0700 directory beside the output where the bundle is assembled; renamed onto the output
    directory only after every step succeeded, removed otherwise.
  - registration with the endpoint is the last step before the rename and is deleted again (rollback) when
    anything after it fails, so a failed build leaves no bundle, no plaintext and no registration.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from cwbuild.config import BuildSpec, BuildTarget
from cwbuild.errors import BuildError, CwbuildError, UsageError
from cwbuild.fileio import sha256_file
from cwbuild.interrupts import deferred

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepArtifact:
    """What a step produced: a bundle-relative path (or a name for things outside the bundle) and digest."""

    path: str
    sha256: str | None
    size: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildContext:
    """Shared state of one build. Secrets are only ever held here, in memory (STYLE.md rule 8)."""

    spec: BuildSpec
    work: Path
    stage: Path
    stack: ExitStack
    passphrase: bytes = field(default=b"", repr=False)
    passphrase_generated: bool = False
    token: str = field(default="", repr=False)
    ca_pem: bytes | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[Callable[[], None]] = field(default_factory=list)


Step = Callable[[BuildContext], StepArtifact | None]


@dataclass(frozen=True)
class BuildResult:
    output: Path
    workload_id: str
    measurements: dict[str, Any]
    development_only: bool
    registered: bool
    tag: str | None


def file_artifact(ctx: BuildContext, rel: str, **detail: Any) -> StepArtifact:
    path = ctx.stage / rel
    return StepArtifact(rel, sha256_file(path), path.stat().st_size, detail)


def steps_for(spec: BuildSpec) -> list[tuple[str, Step]]:
    """The ordered steps of a build (imported here so `cwbuild --help` stays light)."""
    from cwbuild.build_steps import common, krun, output, qemu  # noqa: PLC0415

    head: list[tuple[str, Step]] = [
        ("check inputs", common.check_inputs),
        ("flatten image", common.flatten_image),
        (common.MAKE_FS_STEP, common.make_fs),
    ]
    if spec.target is BuildTarget.KRUN:
        body: list[tuple[str, Step]] = [
            ("krun config", krun.krun_config),
            ("encrypt disk", common.encrypt_disk),
            ("krun layout", krun.krun_layout),
            ("measure", krun.measure_krun),
        ]
    else:
        body = [
            ("encrypt disk", common.encrypt_disk),
            ("kernel and firmware", qemu.kernel_and_firmware),
            ("initrd", qemu.initrd),
            ("measure", qemu.measure_bundle),
            ("launch configs", qemu.launch_configs),
        ]
    tail: list[tuple[str, Step]] = [("manifest", output.write_manifest)]
    if spec.registration_url is not None:
        tail.append(("register", output.register))
    tail.append(("publish", output.publish))
    if spec.tag is not None:
        tail.append(("store image", output.store_image))
    return head + body + tail


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit, so every `finally` (plaintext removal, rollback) runs."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _private_dirs(spec: BuildSpec, stack: ExitStack) -> tuple[Path, Path]:
    out = spec.output
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"{out} already exists", hint="give -o a directory that does not exist (or is empty)"
        )
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"{parent} is not a directory")
    # Each made and its removal registered with SIGTERM/SIGHUP/SIGINT held: a signal between the two would
    # leave the directory behind (the SIGTERM test caught one).
    with deferred():
        work = Path(tempfile.mkdtemp(prefix=".cwbuild-plain-", dir=parent))  # 0700 (tempfile)
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        stack.callback(shutil.rmtree, stage, ignore_errors=True)
    return work, stage


def _run_step(ctx: BuildContext, index: int, name: str, step: Step, console: Console) -> None:
    started = time.monotonic()
    total = len(ctx.facts["step_names"])
    with console.status(f"[{index}/{total}] {name}", spinner="dots"):
        try:
            artifact = step(ctx)
        except CwbuildError:
            console.print(f"[red]✗[/red] [{index}/{total}] {name}")
            raise
        except OSError as exc:
            console.print(f"[red]✗[/red] [{index}/{total}] {name}")
            raise BuildError(f"{name}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from exc
    seconds = round(time.monotonic() - started, 3)
    record: dict[str, Any] = {"step": name, "seconds": seconds}
    shown = ""
    if artifact is not None:
        record |= {"path": artifact.path, "sha256": artifact.sha256, "size": artifact.size, **artifact.detail}
        shown = f" {artifact.path}" + (f" sha256:{artifact.sha256[:12]}" if artifact.sha256 else "")
    ctx.steps.append(record)
    console.print(f"[green]✓[/green] [{index}/{total}] {name}{shown} ({seconds:.1f} s)")


def run_build(spec: BuildSpec, *, console: Console | None = None) -> BuildResult:
    """Run every step; on any failure undo what was done (registration, partial output) and re-raise."""
    console = console or Console(stderr=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one progress line per step, not per request
    steps = steps_for(spec)
    with ExitStack() as stack, _terminate_as_exit():
        work, stage = _private_dirs(spec, stack)
        ctx = BuildContext(spec=spec, work=work, stage=stage, stack=stack)
        ctx.facts["step_names"] = [name for name, _ in steps]
        try:
            for index, (name, step) in enumerate(steps, 1):
                _run_step(ctx, index, name, step, console)
        except BaseException:
            _roll_back(ctx, console)
            raise
        finally:
            ctx.passphrase = b""
            ctx.token = ""
    return BuildResult(
        output=spec.output,
        workload_id=spec.workload_id,
        measurements=ctx.facts.get("measurements", {}),
        development_only=spec.development_only,
        registered=bool(ctx.facts.get("registered")),
        tag=spec.tag,
    )


def _roll_back(ctx: BuildContext, console: Console) -> None:
    """Undo in reverse order; a failing undo is reported, and the original error still propagates."""
    for undo in reversed(ctx.rollbacks):
        try:
            undo()
        except CwbuildError as exc:
            console.print(f"[red]rollback failed:[/red] {exc.message}")
            log.warning("rollback failed: %s", exc.message)


def chmod_tree(root: Path, *, dirs: int = 0o755, files: int = 0o644) -> None:
    """The published bundle holds no secret: readable by all, executable bits kept."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, dirs)
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                mode = p.stat().st_mode
                p.chmod(files | (0o111 if mode & 0o100 else 0))

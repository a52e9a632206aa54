"""`cwbuild run`: launch a bundle's QEMU, stream its console, and return the workload's exit status.

The guest agent prints milestone lines (`cwbuild-agent: attested`, `... key released`, `... disk opened`,
`... switch_root`), one error line `cwbuild-agent: error: <reason id>: <text>` on failure, and
`cwbuild-agent: exit <status>` when the workload ends; this module parses them from the serial console.
With `--tee sim` it also runs the simulated TEE's signer (cwbuild.runner.signer) for the guest.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric import ec

from cwbuild.errors import CwbuildError, UsageError
from cwbuild.launch.qemu import qemu_args
from cwbuild.launch.spec import LaunchSpec, Tee
from cwbuild.measure.api import Blob, MeasureSpec, SevOptions, Target, measure
from cwbuild.measure.api import Tee as MTee
from cwbuild.measure.vmsa import VmmType
from cwbuild.run import spawn
from cwbuild.runner import host
from cwbuild.runner.bundle import Bundle, _int
from cwbuild.runner.signer import SimSigner, load_sim_key

QEMU = "qemu-system-x86_64"
#: The agent's console lines (templates/init.sh.j2, templates/agent/start.sh.j2). The last exit/error line
#: counts: the agent prints its own after anything the workload printed.
AGENT_LINE = re.compile(rb"cwbuild-agent: (?:exit (\d{1,3})|error: ([A-Za-z0-9_.]+): (.*)|(.+))")
MAX_LINE = 64 * 1024


class GuestError(CwbuildError):
    """The guest did not run its workload to the end (the agent's reason id, when it gave one)."""

    def __init__(self, message: str, *, reason: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    bundle: Path
    tee: Tee | None = None
    accel: str | None = None  # kvm | tcg; default: kvm when usable (always for snp/tdx), else tcg
    log: Path | None = None  # None: the console goes to stdout
    memory_mib: int | None = None
    sim_key: Path | None = None
    timeout: float | None = None
    qemu: str = QEMU


@dataclass
class Outcome:
    """What the console said."""

    exit_status: int | None = None
    error: tuple[str, str] | None = None
    milestones: list[str] = field(default_factory=list)


def sim_measurement(bundle: Bundle, spec: LaunchSpec) -> bytes:
    """The SNP launch digest of the files and command line handed to QEMU (DESIGN.md "Simulated TEE"):
    the bundle's AmdSev firmware, kernel, initrd and cmdline, with the vCPU count given to QEMU and the
    vCPU model/features measurement.json assumed."""
    a = bundle.measured(Tee.SIM).get("assumptions") or {}
    ovmf_hash = a.get("snp_ovmf_hash")
    sev = SevOptions(
        cpus=spec.cpus,
        vcpu_type=a.get("vcpu_type") or spec.cpu_model,
        vcpu_sig=_int(a["vcpu_sig"], "vcpu_sig") if a.get("vcpu_type") is None and "vcpu_sig" in a else None,
        vmm=VmmType(a.get("vmm_type", "qemu")),
        guest_features=spec.guest_features,
        ovmf_hash=bytes.fromhex(ovmf_hash) if isinstance(ovmf_hash, str) and ovmf_hash else None,
    )
    root = bundle.root
    result = measure(
        MeasureSpec(
            targets=(Target(MTee.SNP, root / spec.firmware_path),),
            kernel=Blob(path=root / spec.kernel),
            initrd=Blob(path=root / spec.initrd),
            cmdline=spec.cmdline,
            sev=sev,
        )
    )
    value = result.get(MTee.SNP).values["measurement"]
    assert value is not None  # SNP always yields one
    return bytes.fromhex(value)


def _accel(opts: RunOptions, tee: Tee) -> str:
    if tee is not Tee.SIM:
        if opts.accel == "tcg":
            raise UsageError(f"a {tee} guest runs under KVM only", hint="use --tee sim for TCG")
        return "kvm"
    if opts.accel is not None:
        return opts.accel
    return "kvm" if host.kvm_usable() else "tcg"


def qemu_argv(spec: LaunchSpec, *, qemu: str, accel: str, sim_socket: Path | None) -> list[str]:
    args = qemu_args(spec, sim_socket=str(sim_socket)) if sim_socket else qemu_args(spec)
    if spec.tee is Tee.SIM:
        i = args.index("-accel")
        args[i + 1] = accel
    return [qemu, *args]


def stream_console(stream: IO[bytes], sink: IO[bytes]) -> Outcome:
    """Copy the console to `sink` line by line and collect the agent's lines."""
    out = Outcome()
    while True:
        line = stream.readline(MAX_LINE)
        if not line:
            return out
        sink.write(line)
        sink.flush()
        m = AGENT_LINE.search(line.rstrip(b"\r\n"))
        if m is None:
            continue
        if m.group(1) is not None:
            out.exit_status = int(m.group(1))
        elif m.group(2) is not None:
            out.error = (m.group(2).decode(), m.group(3).decode("utf-8", "replace").strip())
        else:
            out.milestones.append(m.group(4).decode("utf-8", "replace").strip())


@contextlib.contextmanager
def _console_sink(log: Path | None) -> Iterator[IO[bytes]]:
    if log is None:
        yield sys.stdout.buffer
        return
    with log.open("ab") as f:
        yield f


def boot(argv: list[str], *, cwd: Path, log: Path | None, timeout: float | None) -> tuple[Outcome, int]:
    """Run QEMU to its end; (console outcome, QEMU's exit status). QEMU's stderr goes to ours."""
    proc = spawn(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=None)
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        proc.kill()

    timer = threading.Timer(timeout, expire) if timeout else None
    if timer is not None:
        timer.start()
    try:
        assert proc.stdout is not None  # spawned with stdout=PIPE
        with _console_sink(log) as sink:
            outcome = stream_console(proc.stdout, sink)
        status = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if fired.is_set() and outcome.exit_status is None and outcome.error is None:
        outcome.error = ("run.timeout", f"the guest did not finish within {timeout:g} s")
    return outcome, status


def _result(outcome: Outcome, status: int) -> int:
    if outcome.exit_status is not None:
        return outcome.exit_status
    if outcome.error is not None:
        reason, text = outcome.error
        raise GuestError(f"the guest stopped: {reason}: {text}", reason=reason)
    raise GuestError(f"QEMU exited (status {status}) before the workload finished", hint="see the console")


def run_bundle(opts: RunOptions) -> int:
    """Launch the bundle; the workload's exit status, or GuestError."""
    bundle = Bundle.load(opts.bundle)
    tee = opts.tee or bundle.default_tee()
    spec = bundle.spec(tee, memory_mib=opts.memory_mib)
    accel = _accel(opts, tee)
    if tee is not Tee.SIM:
        host.check_tee_host(tee)
        host.check_firmware(bundle, tee, spec.firmware_path)
        host.check_qemu(host.qemu_version(opts.qemu), bundle.launch)
        outcome, status = boot(
            qemu_argv(spec, qemu=opts.qemu, accel=accel, sim_socket=None),
            cwd=bundle.root,
            log=opts.log,
            timeout=opts.timeout,
        )
        return _result(outcome, status)
    key = _sim_key(opts)
    measurement = sim_measurement(bundle, spec)
    with tempfile.TemporaryDirectory(prefix="cwbuild-sim-") as tmp:
        signer = SimSigner(
            Path(tmp) / "signer.sock", key=key, measurement=measurement, policy=spec.policy_value
        )
        signer.start()
        try:
            argv = qemu_argv(spec, qemu=opts.qemu, accel=accel, sim_socket=signer.socket_path)
            outcome, status = boot(argv, cwd=bundle.root, log=opts.log, timeout=opts.timeout)
        finally:
            signer.close()
    return _result(outcome, status)


def _sim_key(opts: RunOptions) -> ec.EllipticCurvePrivateKey:
    if opts.sim_key is None:
        raise UsageError(
            "--tee sim needs the simulated TEE's signing key",
            hint="pass --sim-key FILE (or set CWBUILD_SIM_KEY): a P-384 PEM private key whose public half "
            "the endpoint trusts with --insecure-sim-trust",
        )
    return load_sim_key(opts.sim_key)

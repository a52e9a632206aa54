"""The measurement entry point for the CLI and the build: `measure(spec) -> MeasureResult`.

Inputs are files or (kernel/initrd, SEV family only) SHA-256 digests. Every file is read once, streaming, with
all the hashes any requested TEE type needs; the firmware (a few MiB) is read whole and parsed once.
The result records every input by role and SHA-256 and every assumption the values depend on, so that
`measurement.json` is a pure function of the declared inputs (see `bundle.py`).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwbuild.errors import MeasurementError, UsageError
from cwbuild.fileio import read_limited
from cwbuild.measure import krun, sev, tdx
from cwbuild.measure.digest import FileDigests, Wants, digest_file
from cwbuild.measure.firmware import Firmware
from cwbuild.measure.vmsa import VmmType, vcpu_sig_for

#: Largest firmware / SVSM / libkrunfw file read whole (OVMF is 2-4 MiB, libkrunfw-sev ~ 20 MiB).
MAX_FIRMWARE = 256 * 1024 * 1024
DEFAULT_VCPU_TYPE = "EPYC-v4"
#: The Linux EFI stub measures LoadOptions and the initrd into RTMR2 from this guest version (spec §3.6).
RTMR2_MIN_GUEST_KERNEL = "6.9"


class Tee(enum.StrEnum):
    SNP = "snp"
    SEV_ES = "sev-es"
    SEV = "sev"
    TDX = "tdx"
    KRUN_SNP = "krun-snp"
    KRUN_SEV_ES = "krun-sev-es"
    KRUN_SEV = "krun-sev"

    @property
    def is_krun(self) -> bool:
        return self.value.startswith("krun-")

    @property
    def needs_cpus(self) -> bool:
        return self not in (Tee.SEV, Tee.TDX)


@dataclass(frozen=True)
class Blob:
    """A kernel or initrd: a file, or only its SHA-256 (enough for the SEV family)."""

    path: Path | None = None
    sha256: bytes | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.sha256 is None):
            raise UsageError("give either a file or a sha256 digest for each of kernel and initrd")
        if self.sha256 is not None and len(self.sha256) != 32:
            raise UsageError("a sha256 digest is 64 hex characters")


@dataclass(frozen=True)
class SevOptions:
    cpus: int | None = None
    vcpu_type: str | None = DEFAULT_VCPU_TYPE
    vcpu_sig: int | None = None
    vmm: VmmType = VmmType.QEMU
    guest_features: int = 0x1
    ovmf_hash: bytes | None = None
    svsm: Path | None = None
    vars_size: int = 0

    def signature(self) -> int:
        if self.vcpu_sig is not None:
            return self.vcpu_sig
        return vcpu_sig_for(self.vcpu_type or DEFAULT_VCPU_TYPE)


@dataclass(frozen=True)
class TdxOptions:
    page_order: tdx.PageOrder = tdx.PageOrder.SINGLE
    initrd_placement: tdx.InitrdPlacement = tdx.InitrdPlacement.PREFIX
    patch_kernel: bool = False
    memory_mib: int | None = None


@dataclass(frozen=True)
class KrunSpecOptions:
    memory_mib: int = 512
    kernel_load_addr: int = krun.DEFAULT_KERNEL_LOAD_ADDR
    e820: krun.E820Sizes = krun.E820Sizes.KRUNFW
    fpu: krun.VmsaFpu = krun.VmsaFpu.KRUNFW


@dataclass(frozen=True)
class Target:
    """One TEE type and the firmware it boots (an OVMF image, or the libkrunfw-sev library for krun)."""

    tee: Tee
    firmware: Path


@dataclass(frozen=True)
class MeasureSpec:
    targets: tuple[Target, ...]
    kernel: Blob | None = None
    initrd: Blob | None = None
    cmdline: str | None = None
    sev: SevOptions = SevOptions()
    tdx: TdxOptions = TdxOptions()
    krun: KrunSpecOptions = KrunSpecOptions()


@dataclass(frozen=True)
class TeeResult:
    tee: Tee
    firmware_sha256: str
    values: dict[str, str | None]
    assumptions: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"firmware_sha256": self.firmware_sha256, **self.values}
        doc["assumptions"] = self.assumptions
        if self.tee is Tee.TDX or self.tee.is_krun:
            doc["hardware_validated"] = False
        return doc


@dataclass(frozen=True)
class MeasureResult:
    cmdline: str | None
    inputs: dict[str, dict[str, Any] | None]
    results: tuple[TeeResult, ...] = field(default=())

    def get(self, tee: Tee) -> TeeResult:
        for r in self.results:
            if r.tee is tee:
                return r
        raise KeyError(tee)

    def to_json(self) -> dict[str, Any]:
        """The measurement.json document (format in bundle.py): no paths, no times; dump with sorted keys."""
        return {
            "format": 1,
            "cmdline": self.cmdline,
            "inputs": self.inputs,
            "measurements": {r.tee.value: r.to_json() for r in self.results},
        }

    def cli_json(self, tee: Tee) -> dict[str, Any]:
        """`measure --json` for one TEE: {"tee", "measurement"} or the TDX registers, plus inputs."""
        doc = self.get(tee).to_json()
        del doc["firmware_sha256"]  # also in inputs.firmware
        return {"tee": tee.value, **doc, "inputs": self.inputs}


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _read_whole(path: Path, what: str) -> bytes:
    return read_limited(path, limit=MAX_FIRMWARE, error=MeasurementError, what=what)


@dataclass(frozen=True)
class _Digested:
    kernel: FileDigests | None
    initrd: FileDigests | None
    kernel_sha256: bytes | None
    initrd_sha256: bytes | None


def _validate(spec: MeasureSpec) -> None:
    tees = [t.tee for t in spec.targets]
    if not tees:
        raise UsageError("no TEE type requested")
    if len(set(tees)) != len(tees):
        raise UsageError("each TEE type can be measured once per call")
    if (spec.initrd is not None or spec.cmdline is not None) and spec.kernel is None:
        raise UsageError("an initrd or a cmdline is only measured together with a kernel")
    if any(t.needs_cpus and not t.is_krun for t in tees) and not spec.sev.cpus:
        raise UsageError("--cpus is required for SNP and SEV-ES")
    if any(t.is_krun for t in tees) and not spec.sev.cpus:
        raise UsageError("--cpus is required for krun measurements")
    if spec.sev.cpus is not None and not 1 <= spec.sev.cpus <= 512:
        raise UsageError("--cpus must be between 1 and 512")
    if spec.sev.ovmf_hash is not None and Tee.SNP not in tees:
        raise UsageError("--snp-ovmf-hash only applies to SNP")
    if Tee.TDX in tees and spec.kernel is not None:
        for blob, what in ((spec.kernel, "kernel"), (spec.initrd, "initrd")):
            if blob is not None and blob.path is None:
                raise UsageError(
                    f"TDX needs the {what} file (RTMR1/RTMR2 hash it with SHA-384), not its sha256"
                )
    if spec.tdx.patch_kernel and spec.initrd is not None and spec.tdx.memory_mib is None:
        raise UsageError("the QEMU kernel patch places the initrd by guest memory size: give --memory")


def _digest_inputs(spec: MeasureSpec) -> _Digested:
    need_tdx = any(t.tee is Tee.TDX for t in spec.targets)
    kernel = initrd = None
    initrd_size = None
    if spec.initrd is not None and spec.initrd.path is not None:
        initrd = digest_file(spec.initrd.path, Wants(sha384=need_tdx))
        initrd_size = initrd.size
    if spec.kernel is not None and spec.kernel.path is not None:
        patch = None
        if need_tdx and spec.tdx.patch_kernel:
            memory = (spec.tdx.memory_mib or 0) * 1024 * 1024

            def patch(head: bytearray) -> None:
                tdx.patch_kernel_header(head, initrd_size=initrd_size, memory=memory)

        kernel = digest_file(spec.kernel.path, Wants(authenticode=need_tdx, patch=patch))
    return _Digested(
        kernel=kernel,
        initrd=initrd,
        kernel_sha256=kernel.sha256 if kernel else (spec.kernel.sha256 if spec.kernel else None),
        initrd_sha256=initrd.sha256 if initrd else (spec.initrd.sha256 if spec.initrd else None),
    )


def _input_record(digest: bytes | None, files: FileDigests | None) -> dict[str, Any] | None:
    if digest is None:
        return None
    record: dict[str, Any] = {"sha256": digest.hex()}
    if files is not None:
        record["size"] = files.size
    return record


def _sev_assumptions(spec: MeasureSpec, tee: Tee, kernel_hashes: bool) -> dict[str, Any]:
    a: dict[str, Any] = {"kernel_hashes": kernel_hashes}
    if tee is Tee.SEV:
        return a
    opts = spec.sev
    a.update(vcpus=opts.cpus, vmm_type=opts.vmm.value)
    if opts.vmm.needs_vcpu_sig:
        a.update(
            vcpu_sig=f"{opts.signature():#x}", vcpu_type=opts.vcpu_type if opts.vcpu_sig is None else None
        )
    if tee is Tee.SNP:
        a.update(guest_features=f"{opts.guest_features:#x}", snp_ovmf_hash=_hex(opts.ovmf_hash))
        if opts.svsm is not None:
            a.update(svsm=True, vars_size=opts.vars_size)
    return a


def _measure_sev(
    spec: MeasureSpec, tee: Tee, fw: Firmware, d: _Digested, svsm_data: bytes | None
) -> TeeResult:
    boot = None
    if d.kernel_sha256 is not None:
        boot = sev.BootHashes(d.kernel_sha256, d.initrd_sha256 or hashlib.sha256(b"").digest(), spec.cmdline)
    opts = spec.sev
    cpu = sev.VcpuConfig(opts.cpus or 1, opts.vmm, opts.signature() if opts.vmm.needs_vcpu_sig else 0)
    if tee is Tee.SEV:
        value = sev.sev_launch_digest(fw, boot)
    elif tee is Tee.SEV_ES:
        value = sev.sev_es_launch_digest(fw, boot, cpu)
    elif svsm_data is not None:
        if boot is not None:
            raise UsageError("SVSM mode does not measure a kernel (spec §1.9)")
        value = sev.svsm_launch_digest(
            fw, svsm_data, vars_size=opts.vars_size, vcpus=cpu.count, vcpu_sig=cpu.vcpu_sig
        )
    else:
        cpu = sev.VcpuConfig(cpu.count, cpu.vmm, cpu.vcpu_sig, opts.guest_features)
        value = sev.snp_launch_digest(fw, boot, cpu, ovmf_hash=opts.ovmf_hash)
    return TeeResult(tee, "", {"measurement": value.hex()}, _sev_assumptions(spec, tee, boot is not None))


def _measure_tdx(spec: MeasureSpec, fw: Firmware, d: _Digested) -> TeeResult:
    opts = spec.tdx
    values: dict[str, str | None] = {
        "mrtd": tdx.mrtd(fw.data, fw.tdvf_sections(), opts.page_order).hex(),
        "rtmr0": None,  # needs the target QEMU's ACPI tables and the firmware's event layout: not predicted
        "rtmr1": None,
        "rtmr2": None,
    }
    if d.kernel is not None and d.kernel.authenticode_sha384 is not None:
        values["rtmr1"] = tdx.rtmr1(d.kernel.authenticode_sha384).hex()
        options = tdx.load_options(spec.cmdline, d.initrd is not None, opts.initrd_placement)
        values["rtmr2"] = tdx.rtmr2(options, d.initrd.sha384 if d.initrd else None).hex()
    assumptions = {
        "page_order": opts.page_order.value,
        "kernel_patched": opts.patch_kernel,
        "memory_mib": opts.memory_mib if opts.patch_kernel else None,
        "initrd_placement": opts.initrd_placement.value,
        "rtmr2_guest_kernel_min": RTMR2_MIN_GUEST_KERNEL,
        "rtmr0": "not predicted",
    }
    return TeeResult(Tee.TDX, "", values, assumptions)


def _measure_krun(spec: MeasureSpec, tee: Tee, library: bytes) -> TeeResult:
    k = spec.krun
    payload = krun.read_libkrunfw(library, kernel_load_addr=k.kernel_load_addr)
    opts = krun.KrunOptions(spec.sev.cpus or 1, k.memory_mib, k.e820, k.fpu)
    if tee is Tee.KRUN_SNP:
        value = krun.snp(payload, opts)
    else:
        value = krun.sev(payload, opts, es=tee is Tee.KRUN_SEV_ES)
    assumptions = {
        "vcpus": opts.cpus,
        "memory_mib": opts.memory_mib,
        "kernel_load_addr": f"{k.kernel_load_addr:#x}",
        "e820_sizes": k.e820.value,
        "vmsa_fpu": k.fpu.value,
    }
    return TeeResult(tee, "", {"measurement": value.hex()}, assumptions)


def measure(spec: MeasureSpec) -> MeasureResult:
    """Compute every requested measurement; each input file is read exactly once."""
    _validate(spec)
    d = _digest_inputs(spec)
    svsm_data = _read_whole(spec.sev.svsm, "SVSM image") if spec.sev.svsm is not None else None
    results = []
    firmware: dict[str, Any] = {}
    cache: dict[Path, bytes] = {}
    for target in spec.targets:
        data = cache.get(target.firmware) or _read_whole(target.firmware, "firmware")
        cache[target.firmware] = data
        fw_sha = hashlib.sha256(data).hexdigest()
        firmware[target.tee.value] = {"sha256": fw_sha, "size": len(data)}
        if target.tee.is_krun:
            r = _measure_krun(spec, target.tee, data)
        elif target.tee is Tee.TDX:
            r = _measure_tdx(spec, Firmware.parse(data), d)
        else:
            r = _measure_sev(spec, target.tee, Firmware.parse(data), d, svsm_data)
        results.append(TeeResult(r.tee, fw_sha, r.values, r.assumptions))
    inputs: dict[str, dict[str, Any] | None] = {
        "kernel": _input_record(d.kernel_sha256, d.kernel),
        "initrd": _input_record(d.initrd_sha256, d.initrd),
        "cmdline": None
        if spec.cmdline is None
        else {"sha256": hashlib.sha256(spec.cmdline.encode()).hexdigest()},
        "firmware": firmware,
    }
    if svsm_data is not None:
        inputs["svsm"] = {"sha256": hashlib.sha256(svsm_data).hexdigest(), "size": len(svsm_data)}
    return MeasureResult(spec.cmdline, inputs, tuple(results))

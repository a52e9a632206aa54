"""`cwbuild measure`: expected launch measurements from firmware, kernel, initrd and cmdline; bundle checks.

Flags are parsed into `MeasureRequest` (a frozen dataclass) and handed to plain functions; the measurement
itself is `cwbuild.measure.api.measure`. With --json, failures print a JSON error object too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cwbuild.errors import CwbuildError, UsageError
from cwbuild.measure import krun, sev, tdx
from cwbuild.measure.api import (
    Blob,
    KrunSpecOptions,
    MeasureSpec,
    SevOptions,
    Target,
    TdxOptions,
    Tee,
    measure,
)
from cwbuild.measure.bundle import check_bundle
from cwbuild.measure.firmware import Firmware
from cwbuild.measure.vmsa import VCPU_TYPES, VmmType, cpu_sig

PathArg = click.Path(dir_okay=False, path_type=Path)


@dataclass(frozen=True)
class MeasureRequest:
    tee: Tee
    spec: MeasureSpec
    as_json: bool
    ovmf_hash_only: bool = False


def _hex(value: str | None, size: int, flag: str) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise UsageError(f"{flag} is not hexadecimal") from None
    if len(raw) != size:
        raise UsageError(f"{flag} must be {2 * size} hex characters")
    return raw


def _int(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        raise UsageError(f"{flag} is not an integer (decimal or 0x-hex)") from None


def _blob(path: Path | None, digest: str | None, flag: str) -> Blob | None:
    if path is not None and digest is not None:
        raise UsageError(f"give --{flag} or --{flag}-sha256, not both")
    if path is None and digest is None:
        return None
    return Blob(path=path, sha256=_hex(digest, 32, f"--{flag}-sha256"))


def _vcpu(o: dict[str, Any]) -> tuple[str | None, int | None]:
    fms = (o["vcpu_family"], o["vcpu_model"], o["vcpu_stepping"])
    given = [o["vcpu_type"] is not None, o["vcpu_sig"] is not None, any(x is not None for x in fms)]
    if sum(given) > 1:
        raise UsageError("give one of --vcpu-type, --vcpu-sig, --vcpu-family/--vcpu-model/--vcpu-stepping")
    if given[2]:
        if any(x is None for x in fms):
            raise UsageError("--vcpu-family, --vcpu-model and --vcpu-stepping go together")
        return None, cpu_sig(*fms)
    return (o["vcpu_type"] or ("EPYC-v4" if not given[1] else None)), _int(o["vcpu_sig"], "--vcpu-sig")


def _sev_options(o: dict[str, Any]) -> SevOptions:
    vcpu_type, vcpu_sig = _vcpu(o)
    if o["vars_size"] is not None and o["vars_file"] is not None:
        raise UsageError("give --vars-size or --vars-file, not both")
    vars_size = o["vars_file"].stat().st_size if o["vars_file"] is not None else (o["vars_size"] or 0)
    if o["svsm"] is None and vars_size:
        raise UsageError("--vars-size/--vars-file only apply with --svsm")
    return SevOptions(
        cpus=o["cpus"],
        vcpu_type=vcpu_type,
        vcpu_sig=vcpu_sig,
        vmm=VmmType(o["vmm_type"]),
        guest_features=_int(o["guest_features"], "--guest-features") or 0,
        ovmf_hash=_hex(o["snp_ovmf_hash"], sev.LD_SIZE, "--snp-ovmf-hash"),
        svsm=o["svsm"],
        vars_size=vars_size,
    )


def parse_request(o: dict[str, Any]) -> MeasureRequest:
    """Turn the parsed flags into a request (STYLE.md rule 2)."""
    if o["tee"] is None or o["firmware"] is None:
        raise UsageError("--tee and --firmware are required (or use --bundle DIR)")
    tee = Tee(o["tee"])
    if o["ovmf_hash_only"] and tee is not Tee.SNP:
        raise UsageError("--ovmf-hash-only applies to --tee snp")
    spec = MeasureSpec(
        targets=(Target(tee, o["firmware"]),),
        kernel=_blob(o["kernel"], o["kernel_sha256"], "kernel"),
        initrd=_blob(o["initrd"], o["initrd_sha256"], "initrd"),
        cmdline=o["cmdline"],
        sev=_sev_options(o),
        tdx=TdxOptions(
            page_order=tdx.PageOrder(o["tdx_page_order"]),
            initrd_placement=tdx.InitrdPlacement(o["tdx_initrd_placement"]),
            patch_kernel=o["tdx_patch_kernel"],
            memory_mib=o["memory"],
        ),
        krun=KrunSpecOptions(
            memory_mib=o["memory"] or 512,
            kernel_load_addr=_int(o["krun_kernel_load_addr"], "--krun-kernel-load-addr") or 0x100_0000,
            e820=krun.E820Sizes(o["krun_e820"]),
            fpu=krun.VmsaFpu(o["krun_vmsa_fpu"]),
        ),
    )
    return MeasureRequest(tee, spec, o["as_json"], o["ovmf_hash_only"])


def _emit(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False))


def run_measure(req: MeasureRequest) -> int:
    if req.ovmf_hash_only:
        data = req.spec.targets[0].firmware.read_bytes()
        value = sev.ovmf_pages_digest(Firmware.parse(data)).hex()
        _emit({"tee": "snp", "ovmf_hash": value}) if req.as_json else click.echo(value)
        return 0
    result = measure(req.spec)
    doc = result.cli_json(req.tee)
    if req.as_json:
        _emit(doc)
    elif "measurement" in doc:
        click.echo(doc["measurement"])
    else:
        for reg in ("mrtd", "rtmr0", "rtmr1", "rtmr2"):
            click.echo(f"{reg}: {doc[reg] or 'not predicted'}")
    return 0


def run_bundle(bundle: Path, as_json: bool) -> int:
    check = check_bundle(bundle)
    if as_json:
        _emit({"ok": check.ok, "first_difference": check.first_difference, "recomputed": check.actual})
    elif check.ok:
        n = len(check.actual["measurements"])
        click.echo(f"ok: {n} measurement(s) and every input digest match {bundle / 'measurement.json'}")
    else:
        click.echo(f"mismatch: {check.first_difference} differs from {bundle / 'measurement.json'}", err=True)
    return 0 if check.ok else 1


_TEES = [t.value for t in Tee]


class _JsonUsageErrors(click.Command):
    """Flag errors click finds itself are JSON objects too when --json is given (exit 2)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        wants_json = "--json" in args  # the parser consumes `args`
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if not wants_json:
                raise
            doc = {"error": exc.format_message(), "hint": None, "kind": "UsageError"}
            sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
            raise click.exceptions.Exit(2) from None


@click.command("measure", cls=_JsonUsageErrors)
@click.option(
    "--tee", type=click.Choice(_TEES), help="TEE type (krun-*: --firmware is a libkrunfw-sev library)."
)
@click.option("--firmware", type=PathArg, help="OVMF image (AmdSev build for SEV, TDVF for TDX).")
@click.option("--kernel", type=PathArg, help="Kernel (bzImage) booted directly.")
@click.option("--kernel-sha256", metavar="HEX", help="The kernel's SHA-256 instead of the file (SEV family).")
@click.option("--initrd", type=PathArg, help="Initrd booted with the kernel.")
@click.option("--initrd-sha256", metavar="HEX", help="The initrd's SHA-256 instead of the file (SEV family).")
@click.option("--cmdline", help="Kernel command line (QEMU -append).")
@click.option("--cpus", type=click.IntRange(1, 512), help="vCPU count (SNP, SEV-ES, krun).")
@click.option("--vcpu-type", type=click.Choice(list(VCPU_TYPES)), help="QEMU -cpu model (default EPYC-v4).")
@click.option("--vcpu-sig", metavar="V", help="vCPU signature (CPUID 1 EAX), e.g. 0xa00f11.")
@click.option("--vcpu-family", type=int, help="vCPU family (with --vcpu-model, --vcpu-stepping).")
@click.option("--vcpu-model", type=int)
@click.option("--vcpu-stepping", type=int)
@click.option("--vmm-type", type=click.Choice([v.value for v in VmmType]), default="qemu", show_default=True)
@click.option("--guest-features", default="0x1", show_default=True, help="SNP guest features (sev_features).")
@click.option(
    "--snp-ovmf-hash", metavar="HEX", help="Precomputed SNP OVMF hash (seed); firmware still parsed."
)
@click.option("--ovmf-hash-only", is_flag=True, help="Print the SNP OVMF hash of --firmware and stop.")
@click.option("--svsm", type=PathArg, help="SNP with a COCONUT SVSM image (QEMU).")
@click.option("--vars-size", type=click.IntRange(0), help="OVMF variable store size below the OVMF (SVSM).")
@click.option("--vars-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tdx-page-order", type=click.Choice([p.value for p in tdx.PageOrder]), default="single")
@click.option(
    "--tdx-initrd-placement", type=click.Choice([p.value for p in tdx.InitrdPlacement]), default="prefix"
)
@click.option("--tdx-patch-kernel", is_flag=True, help="QEMU <= 10.1 patches the kernel header (TDX).")
@click.option("--memory", type=click.IntRange(4), help="Guest memory in MiB (TDX kernel patch, krun).")
@click.option("--krun-e820", type=click.Choice([e.value for e in krun.E820Sizes]), default="krunfw")
@click.option("--krun-vmsa-fpu", type=click.Choice([e.value for e in krun.VmsaFpu]), default="krunfw")
@click.option("--krun-kernel-load-addr", metavar="ADDR", help="Kernel load address in the libkrunfw bundle.")
@click.option("--bundle", type=click.Path(file_okay=False, path_type=Path), help="Re-derive a bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(**options: Any) -> int:
    """Compute expected launch measurements (SNP, SEV-ES, SEV, TDX, krun)."""
    as_json = bool(options["as_json"])
    try:
        if options["bundle"] is not None:
            return run_bundle(options["bundle"], as_json)
        return run_measure(parse_request(options))
    except CwbuildError as exc:
        if not as_json:
            raise
        doc = {"error": exc.message, "hint": exc.hint, "kind": type(exc).__name__}
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
        return exc.exit_code

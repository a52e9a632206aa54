"""`measurement.json`: writing its document and re-deriving a bundle's measurements from its files.

Format (version 1; dump with `json.dumps(doc, sort_keys=True, indent=2)`; no paths, no times):

    {
      "format": 1,
      "cmdline": "console=ttyS0 ..." | null,          # the exact kernel command line (text)
      "inputs": {                                      # every input by role and SHA-256
        "kernel":  {"sha256": HEX, "size": N} | null,  # DIR/vmlinuz
        "initrd":  {"sha256": HEX, "size": N} | null,  # DIR/initrd.img
        "cmdline": {"sha256": HEX} | null,             # SHA-256 of the UTF-8 cmdline
        "firmware": {TEE: {"sha256": HEX, "size": N}}, # DIR/firmware/* (OVMF, or libkrunfw for krun-*)
        "svsm": {"sha256": HEX, "size": N}             # only in SVSM mode, DIR/firmware/*
      },
      "measurements": {
        "snp" | "sev-es" | "sev" | "krun-*":
                {"firmware_sha256": HEX, "measurement": HEX, "assumptions": {...}},
        "tdx": {"firmware_sha256": HEX, "mrtd": HEX, "rtmr0": null, "rtmr1": HEX|null, "rtmr2": HEX|null,
                "assumptions": {...}, "hardware_validated": false}
      }
    }

Assumptions: SEV family `kernel_hashes`, `vcpus`, `vmm_type`, `vcpu_sig`, `vcpu_type`, `guest_features`,
`snp_ovmf_hash`; TDX `page_order`, `kernel_patched`, `memory_mib`, `initrd_placement`,
`rtmr2_guest_kernel_min`, `rtmr0`; krun `vcpus`, `memory_mib`, `kernel_load_addr`, `e820_sizes`, `vmsa_fpu`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cwbuild.errors import FormatError
from cwbuild.fileio import read_json, sha256_file
from cwbuild.measure import krun, tdx
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
from cwbuild.measure.vmsa import VmmType

MEASUREMENT_JSON = "measurement.json"
MAX_DOCUMENT = 1 << 20


def dumps(doc: dict[str, Any]) -> str:
    """The canonical text of a measurement.json document."""
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class BundleCheck:
    ok: bool
    first_difference: str | None
    expected: dict[str, Any]
    actual: dict[str, Any]


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = read_json(path, limit=MAX_DOCUMENT)
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("measurements"), dict):
        raise FormatError(f"{path} is not a cwbuild measurement.json (format 1)")
    return doc


def _firmware_by_sha(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if directory.is_dir():
        for p in sorted(directory.iterdir()):
            if p.is_file():
                found[sha256_file(p)] = p
    return found


def as_int(value: Any, what: str, *, source: str = MEASUREMENT_JSON) -> int:
    """An integer recorded in a bundle document: a JSON number, or text in any base `int(_, 0)` reads."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise FormatError(f"{source}: {what} is not an integer")


def _sev_options(a: dict[str, Any]) -> SevOptions:
    ovmf_hash = a.get("snp_ovmf_hash")
    return SevOptions(
        cpus=as_int(a["vcpus"], "vcpus"),
        vcpu_type=a.get("vcpu_type"),
        vcpu_sig=as_int(a["vcpu_sig"], "vcpu_sig")
        if a.get("vcpu_type") is None and "vcpu_sig" in a
        else None,
        vmm=VmmType(a.get("vmm_type", "qemu")),
        guest_features=as_int(a.get("guest_features", "0x1"), "guest_features"),
        ovmf_hash=bytes.fromhex(ovmf_hash) if ovmf_hash else None,
        vars_size=as_int(a.get("vars_size", 0), "vars_size"),
    )


def _options_for(
    tee: Tee, a: dict[str, Any]
) -> tuple[SevOptions | None, TdxOptions | None, KrunSpecOptions | None]:
    """The options a TEE's recorded assumptions imply (None: the TEE does not depend on that group)."""
    if tee is Tee.SEV:
        return None, None, None
    if tee is Tee.TDX:
        memory = a.get("memory_mib")
        return (
            None,
            TdxOptions(
                page_order=tdx.PageOrder(a["page_order"]),
                initrd_placement=tdx.InitrdPlacement(a["initrd_placement"]),
                patch_kernel=bool(a["kernel_patched"]),
                memory_mib=None if memory is None else as_int(memory, "memory_mib"),
            ),
            None,
        )
    if tee.is_krun:
        k = KrunSpecOptions(
            memory_mib=as_int(a["memory_mib"], "memory_mib"),
            kernel_load_addr=as_int(a["kernel_load_addr"], "kernel_load_addr"),
            e820=krun.E820Sizes(a["e820_sizes"]),
            fpu=krun.VmsaFpu(a["vmsa_fpu"]),
        )
        return SevOptions(cpus=as_int(a["vcpus"], "vcpus")), None, k
    return _sev_options(a), None, None


_Group = list[Any]  # [sev, tdx, krun, [targets]]


def _place(groups: list[_Group], opts: tuple[Any, Any, Any], target: Target) -> None:
    for g in groups:
        if all(o is None or g[i] is None or g[i] == o for i, o in enumerate(opts)):
            for i, o in enumerate(opts):
                g[i] = g[i] if o is None else o
            g[3].append(target)
            return
    groups.append([*opts, [target]])


def _groups(doc: dict[str, Any], bundle: Path) -> list[_Group]:
    firmware = _firmware_by_sha(bundle / "firmware")
    groups: list[_Group] = []
    for name, entry in sorted(doc["measurements"].items()):
        try:
            tee = Tee(name)
            opts = _options_for(tee, entry.get("assumptions") or {})
            fw_sha = entry["firmware_sha256"]
        except (KeyError, ValueError, AttributeError, TypeError) as exc:
            raise FormatError(f"measurement.json: entry {name!r} is malformed ({exc})") from None
        path = firmware.get(fw_sha)
        if path is None:
            raise FormatError(f"bundle has no firmware/ file with sha256 {fw_sha} (needed for {name})")
        if (entry.get("assumptions") or {}).get("svsm"):
            svsm_sha = (doc["inputs"].get("svsm") or {}).get("sha256")
            svsm = firmware.get(svsm_sha or "")
            if opts[0] is None or svsm is None:
                raise FormatError("bundle has no SVSM image in firmware/ matching inputs.svsm")
            opts = (replace(opts[0], svsm=svsm), None, None)
        _place(groups, opts, Target(tee, path))
    return groups


def recompute(bundle: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recorded document, document recomputed from the bundle's files)."""
    doc = _load(bundle / MEASUREMENT_JSON)
    inputs = doc.get("inputs") or {}
    kernel = Blob(path=bundle / "vmlinuz") if inputs.get("kernel") else None
    initrd = Blob(path=bundle / "initrd.img") if inputs.get("initrd") else None
    cmdline = doc.get("cmdline")
    if cmdline is not None and not isinstance(cmdline, str):
        raise FormatError("measurement.json: cmdline is not a string")
    actual: dict[str, Any] = {"format": 1, "cmdline": cmdline, "inputs": {}, "measurements": {}}
    for sev, tdx_opts, krun_opts, targets in _groups(doc, bundle):
        spec = MeasureSpec(
            targets=tuple(targets),
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            sev=sev or SevOptions(cpus=1),
            tdx=tdx_opts or TdxOptions(),
            krun=krun_opts or KrunSpecOptions(),
        )
        result = measure(spec).to_json()
        firmware = {**actual["inputs"].get("firmware", {}), **result["inputs"]["firmware"]}
        actual["inputs"] = {**result["inputs"], "firmware": firmware}
        actual["measurements"].update(result["measurements"])
    return doc, actual


def first_difference(expected: Any, actual: Any, path: str = "") -> str | None:
    """The dotted path of the first field (in sorted key order) where two JSON values differ."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            where = f"{path}.{key}" if path else str(key)
            if key not in expected or key not in actual:
                return where
            diff = first_difference(expected[key], actual[key], where)
            if diff is not None:
                return diff
        return None
    return None if expected == actual else (path or "<document>")


def check_bundle(bundle: Path) -> BundleCheck:
    """Re-derive every value and input digest of a bundle; ok only when all of them match."""
    expected, actual = recompute(bundle)
    diff = first_difference(expected, actual)
    return BundleCheck(diff is None, diff, expected, actual)

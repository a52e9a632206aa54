"""Build steps of `--target krun`: buildah mkcw's layout (cw-format.md §1.3), so crun + libkrun-sev run it.

    entrypoint      0755  a static x86-64 ELF that says the image is a confidential workload and exits 1
    krun-sev.json   0600  the WorkloadConfig (§1.4), byte-identical to the disk footer
    tmp/            01777
    disk.img        0600  LUKS1 + encrypted ext4 + padding + footer (§1.5)

plus, beside them, cwbuild's measurement.json (when --firmware-library names the libkrunfw-sev that is
measured; its copy goes to firmware/) and manifest.json. buildah's sev.chain (SEV/SEV-ES with `sevctl
export`) is not written: no SEV certificate chain is shipped, krun-sev.json says so (`vendor_chain: ""`).
"""

from __future__ import annotations

import shutil
import struct
from typing import Any

from cwbuild.build import BuildContext, StepArtifact, file_artifact
from cwbuild.launch import LaunchSpec, check_krun_limits
from cwbuild.launch.render import render_krun_sev_json
from cwbuild.launch.spec import Tee
from cwbuild.measure import KrunSpecOptions, MeasureSpec, SevOptions, Target, measure
from cwbuild.measure import Tee as MTee
from cwbuild.measure.bundle import MEASUREMENT_JSON, dumps

KRUN_SEV_JSON = "krun-sev.json"
ENTRYPOINT = "entrypoint"
#: buildah's entrypoint message (cw-format.md §1.3 row 1: 75 bytes to fd 2, then exit(1)).
MESSAGE = b"This image is designed to be run as a confidential workload using libkrun.\n"
KRUN_MEASURED_AS = {Tee.SNP: MTee.KRUN_SNP, Tee.SEV_ES: MTee.KRUN_SEV_ES, Tee.SEV: MTee.KRUN_SEV}
LIBRARY_NAME = "firmware/libkrunfw-sev.so"

# --- ELF64 (System V gABI "ELF Header", "Program Header"; x86-64 psABI): one PT_LOAD segment mapping the
# whole file read+execute at 0x400000, the entry point right after the headers. ---
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_ELF_IDENT = b"\x7fELF\x02\x01\x01" + bytes(9)  # ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_SYSV
_ET_EXEC, _EM_X86_64, _PT_LOAD, _PF_R_X = 2, 62, 1, 5
_BASE = 0x400000
# Linux x86-64 syscalls (arch/x86/entry/syscalls/syscall_64.tbl): write = 1, exit = 60.
_CODE_HEAD = bytes.fromhex("b801000000bf02000000488d35")  # mov eax,1; mov edi,2; lea rsi,[rip+d32]
_CODE_TAIL = bytes.fromhex("0f05b83c000000bf010000000f05")  # syscall; mov eax,60; mov edi,1; syscall


def entrypoint_elf(message: bytes = MESSAGE) -> bytes:
    """write(2, message, len); exit(1) as a minimal static ELF executable."""
    mov_edx = b"\xba" + struct.pack("<I", len(message))  # mov edx, len
    after_lea = len(_CODE_HEAD) + 4
    rel = len(mov_edx) + len(_CODE_TAIL)  # from the end of lea to the message
    code = _CODE_HEAD + struct.pack("<i", rel) + mov_edx + _CODE_TAIL
    assert len(code) == after_lea + rel  # a constant layout; checked once here, not input
    start = _EHDR.size + _PHDR.size
    total = start + len(code) + len(message)
    ehdr = _EHDR.pack(
        _ELF_IDENT, _ET_EXEC, _EM_X86_64, 1, _BASE + start, _EHDR.size, 0, 0,
        _EHDR.size, _PHDR.size, 1, 64, 0, 0,
    )  # fmt: skip
    phdr = _PHDR.pack(_PT_LOAD, _PF_R_X, 0, _BASE, _BASE, total, total, 0x1000)
    return ehdr + phdr + code + message


def launch_spec(ctx: BuildContext) -> LaunchSpec:
    spec = ctx.spec
    return LaunchSpec(
        tee=spec.tees[0],
        workload_id=spec.workload_id,
        cmdline="",
        cpus=spec.cpus,
        memory_mib=spec.memory_mib,
        attestation_url=spec.attestation_url or "",
        snp_gen=spec.snp_gen,
    )


def krun_config(ctx: BuildContext) -> StepArtifact | None:
    """krun-sev.json (checked against the krun guest's limits first); also the disk footer."""
    launch = launch_spec(ctx)
    check_krun_limits(launch)
    text = render_krun_sev_json(launch).encode("utf-8")
    ctx.facts["krun_config_json"] = text
    path = ctx.stage / KRUN_SEV_JSON
    path.write_bytes(text)
    path.chmod(0o600)
    return file_artifact(ctx, KRUN_SEV_JSON)


def krun_layout(ctx: BuildContext) -> StepArtifact | None:
    """entrypoint (0755), tmp/ (01777), disk.img 0600."""
    exe = ctx.stage / ENTRYPOINT
    exe.write_bytes(entrypoint_elf())
    exe.chmod(0o755)
    tmp = ctx.stage / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    (ctx.stage / "disk.img").chmod(0o600)
    return file_artifact(ctx, ENTRYPOINT)


def measure_krun(ctx: BuildContext) -> StepArtifact | None:
    """measurement.json of the libkrunfw-sev given by --firmware-library (none without it)."""
    spec = ctx.spec
    if spec.firmware_library is None:
        ctx.facts["measurements"] = {}
        return None
    (ctx.stage / "firmware").mkdir()
    library = ctx.stage / LIBRARY_NAME
    shutil.copyfile(spec.firmware_library, library)
    library.chmod(0o644)
    tee = KRUN_MEASURED_AS[spec.tees[0]]
    result = measure(
        MeasureSpec(
            targets=(Target(tee, library),),
            sev=SevOptions(cpus=spec.cpus),
            krun=KrunSpecOptions(memory_mib=spec.memory_mib),
        )
    )
    doc = result.to_json()
    (ctx.stage / MEASUREMENT_JSON).write_text(dumps(doc), encoding="utf-8")
    ctx.facts["measurements"] = doc["measurements"]
    return file_artifact(ctx, MEASUREMENT_JSON, tees=sorted(doc["measurements"]))


def reference_values(ctx: BuildContext) -> tuple[str, list[str], dict[str, Any]]:
    """A krun SNP guest registers as snp with the krun launch measurement."""
    tee = ctx.spec.tees[0]  # config.check_spec: SNP when registering
    entry = ctx.facts["measurements"][KRUN_MEASURED_AS[tee].value]
    return "snp", [entry["measurement"]], {}

"""Build steps of a QEMU/libvirt bundle: kit kernel + firmware, the initrd with the guest agent, the
measurements of every requested TEE, and the launch configs (DESIGN.md "Bundle")."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from cwbuild.boot import kit as kits
from cwbuild.boot.agent import AgentConfig, Entrypoint, agent_files, split_init
from cwbuild.boot.fetch import FetchOptions, ensure_kit
from cwbuild.boot.initrd import build_initrd
from cwbuild.build import BuildContext, StepArtifact, file_artifact
from cwbuild.errors import UsageError
from cwbuild.launch import LaunchSpec, launch_assumptions, render_launch
from cwbuild.launch.spec import Tee
from cwbuild.measure import Blob, MeasureSpec, SevOptions, Target, TdxOptions, measure
from cwbuild.measure import Tee as MTee
from cwbuild.measure.bundle import MEASUREMENT_JSON, dumps

#: launch TEE -> the measurement it is checked against (a sim guest is measured exactly like SNP).
MEASURED_AS = {
    Tee.SNP: MTee.SNP,
    Tee.SIM: MTee.SNP,
    Tee.SEV_ES: MTee.SEV_ES,
    Tee.SEV: MTee.SEV,
    Tee.TDX: MTee.TDX,
}
#: The TEE the guest agent attests as and the endpoint registers (cwbuild.boot.agent.TEES).
ATTESTING = (Tee.SNP, Tee.TDX, Tee.SIM)
#: Where a development-only guest looks for an endpoint: QEMU user networking's address of the host
#: (QEMU docs/system/devices/net.rst) and `cwbuild serve`'s default port. Nothing is registered there.
DEV_ATTESTATION_URL = "http://10.0.2.2:8080"


def primary_tee(ctx: BuildContext) -> Tee:
    return next(t for t in ctx.spec.tees if t in ATTESTING)


def _kit(ctx: BuildContext) -> kits.Kit:
    spec = ctx.spec
    cache = kits.cache_root(spec.kit_cache)
    if spec.kit is None:
        return ensure_kit(FetchOptions(cache=cache, release=spec.release), offline=spec.offline)
    path = Path(spec.kit)
    kit = kits.open_kit(path) if path.is_dir() else kits.load(cache, spec.kit)
    kits.verify_files(kit)
    return kit


def kernel_and_firmware(ctx: BuildContext) -> StepArtifact | None:
    """vmlinuz and firmware/OVMF.*.fd copied from the kit (or --firmware) into the bundle."""
    kit = _kit(ctx)
    for tee in ctx.spec.tees:
        kit.require("snp" if tee in (Tee.SNP, Tee.SEV_ES, Tee.SEV) else str(tee))
    ctx.facts["kit"] = kit
    shutil.copyfile(kit.vmlinuz, ctx.stage / "vmlinuz")
    (ctx.stage / "firmware").mkdir()
    families = {"tdx" if t is Tee.TDX else "snp": t for t in ctx.spec.tees}
    if ctx.spec.firmware is not None and len(families) > 1:
        raise UsageError("--firmware names one file, but AMD and Intel TEEs were both requested")
    firmware: dict[str, str] = {}
    for family, tee in sorted(families.items()):
        rel = tee.default_firmware
        source = ctx.spec.firmware or kit.firmware(family)
        shutil.copyfile(source, ctx.stage / rel)
        firmware[family] = rel
    ctx.facts["firmware"] = firmware
    return file_artifact(ctx, "vmlinuz", kernel=kit.kernel_version, kit=kit.id)


def agent_config(ctx: BuildContext) -> AgentConfig:
    spec = ctx.spec
    return AgentConfig(
        workload_id=spec.workload_id,
        tee=str(primary_tee(ctx)),
        attestation_url=spec.attestation_url or DEV_ATTESTATION_URL,
        ca_pem=ctx.ca_pem,
    )


def initrd(ctx: BuildContext) -> StepArtifact | None:
    """initrd.img: the kit's userland and modules + the guest agent, its CA, URL and workload id."""
    kit = ctx.facts["kit"]
    config = agent_config(ctx)
    init, files = split_init(agent_files(config, Entrypoint.from_config(ctx.facts["image_config"])))
    info = build_initrd(
        kit, init_script=init, extra_files=files, out=ctx.stage / "initrd.img", cache=kit.store
    )
    ctx.facts["initrd"] = {
        "kit_segment_sha256": info.kit_segment_sha256,
        "modules": list(info.modules),
        "zlib_version": info.zlib_version,
    }
    return file_artifact(ctx, "initrd.img")


def measure_bundle(ctx: BuildContext) -> StepArtifact | None:
    """measurement.json: every requested TEE, from the bundle's own files (a pure function of them)."""
    spec = ctx.spec
    launch = launch_spec(ctx)
    targets = tuple(
        Target(MEASURED_AS[t], ctx.stage / ctx.facts["firmware"]["tdx" if t is Tee.TDX else "snp"])
        for t in spec.tees
    )
    result = measure(
        MeasureSpec(
            targets=targets,
            kernel=Blob(path=ctx.stage / "vmlinuz"),
            initrd=Blob(path=ctx.stage / "initrd.img"),
            cmdline=spec.cmdline,
            sev=SevOptions(cpus=spec.cpus, vcpu_type=launch.cpu_model if launch.tee.is_amd else None),
            tdx=TdxOptions(),
        )
    )
    doc = result.to_json()
    (ctx.stage / MEASUREMENT_JSON).write_text(dumps(doc), encoding="utf-8")
    ctx.facts["measurements"] = doc["measurements"]
    return file_artifact(ctx, MEASUREMENT_JSON, tees=sorted(doc["measurements"]))


def launch_spec(ctx: BuildContext, *, firmware: str | None = "") -> LaunchSpec:
    """The launch spec of the attesting TEE; `firmware=None` takes the TEE's default file name."""
    spec = ctx.spec
    tee = primary_tee(ctx)
    if firmware == "":
        firmware = ctx.facts["firmware"]["tdx" if tee is Tee.TDX else "snp"]
    return LaunchSpec(
        tee=tee,
        workload_id=spec.workload_id,
        cmdline=spec.cmdline,
        cpus=spec.cpus,
        memory_mib=spec.memory_mib,
        firmware=firmware,
        attestation_url=spec.attestation_url or "",
        snp_gen=spec.snp_gen,
    )


def launch_configs(ctx: BuildContext) -> StepArtifact | None:
    """launch/qemu.sh, launch/libvirt.xml, launch/krun-sev.json for the attesting TEE."""
    spec = launch_spec(ctx)
    (ctx.stage / "launch").mkdir()
    files = render_launch(spec)
    for rel, text in sorted(files.items()):
        path = ctx.stage / rel
        path.write_text(text, encoding="utf-8")
        path.chmod(0o755 if rel.endswith(".sh") else 0o644)
    ctx.facts["launch"] = launch_assumptions(spec)
    return StepArtifact("launch/", None, None, {"files": sorted(files)})


def reference_values(ctx: BuildContext) -> tuple[str, list[str], dict[str, Any]]:
    """(tee, reference values, policy) of the registration: SNP measurement or TDX MRTD (+ RTMR1/2)."""
    tee = primary_tee(ctx)
    entry = ctx.facts["measurements"][MEASURED_AS[tee].value]
    if tee is Tee.TDX:
        policy = {f"rtmr{i}": [entry[f"rtmr{i}"]] for i in (1, 2) if entry.get(f"rtmr{i}")}
        return str(tee), [entry["mrtd"]], policy
    return str(tee), [entry["measurement"]], {}

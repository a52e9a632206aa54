"""The last steps: manifest.json, registration (rolled back on later failure), publishing the bundle
directory, and optionally storing it as an image in Podman."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import zlib
from typing import Any

from cwbuild import __version__
from cwbuild.build import BuildContext, StepArtifact, chmod_tree, file_artifact
from cwbuild.build_steps import krun, qemu
from cwbuild.config import BuildTarget
from cwbuild.errors import BuildError, ConfigError, CwbuildError, NetworkError, UsageError
from cwbuild.interrupts import deferred
from cwbuild.run import run

MANIFEST_JSON = "manifest.json"
MANIFEST_FORMAT = 1


def _tool_versions() -> dict[str, str]:
    mke2fs = run(["mkfs.ext4", "-V"], check=False)
    first = (mke2fs.stderr or mke2fs.stdout or b"").decode("utf-8", "replace").splitlines()
    return {
        "cwbuild": __version__,
        "python": platform.python_version(),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "mke2fs": first[0].strip() if first else "unknown",
    }


def _kit_facts(ctx: BuildContext) -> dict[str, Any] | None:
    kit = ctx.facts.get("kit")
    if kit is None:
        return None
    return {
        "id": kit.id,
        "release": kit.release,
        "kernel": kit.kernel_version,
        "packages": {p["name"]: p["version"] for p in kit.manifest.get("packages", []) if "name" in p},
    }


def manifest_doc(ctx: BuildContext) -> dict[str, Any]:
    """Everything about the build that is not a measurement input: no secrets, no host paths."""
    spec = ctx.spec
    doc: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "workload_id": spec.workload_id,
        "target": str(spec.target),
        "tees": [str(t) for t in spec.tees],
        "development_only": spec.development_only,
        "image": ctx.facts["image"],
        "source_date_epoch": ctx.facts["source_date_epoch"],
        "filesystem": ctx.facts["filesystem"],
        "disk": ctx.facts["disk"],
        "passphrase": "generated" if ctx.passphrase_generated else "from file",
        "kit": _kit_facts(ctx),
        "tools": _tool_versions(),
        "steps": [s for s in ctx.steps if s["step"] != "check inputs"],
        "attestation": None
        if spec.attestation_url is None
        else {"url": spec.attestation_url, "ca_pinned": ctx.ca_pem is not None},
    }
    if spec.target is BuildTarget.QEMU:
        doc |= {
            "tee": str(qemu.primary_tee(ctx)),
            "cmdline": spec.cmdline,
            "firmware": ctx.facts["firmware"],
            "initrd": ctx.facts["initrd"],
            "launch": ctx.facts["launch"],
        }
    else:
        doc |= {"tee": str(spec.tees[0]), "krun": {"cpus": spec.cpus, "ram_mib": spec.memory_mib}}
    return doc


def write_manifest(ctx: BuildContext) -> StepArtifact | None:
    doc = manifest_doc(ctx)
    ctx.facts["manifest"] = doc
    text = json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"
    (ctx.stage / MANIFEST_JSON).write_text(text, encoding="utf-8")
    return file_artifact(ctx, MANIFEST_JSON)


def register(ctx: BuildContext) -> StepArtifact | None:
    """POST the workload to the endpoint (last but the rename); its rollback is a DELETE."""
    spec = ctx.spec
    url = spec.registration_url
    if url is None:
        return None
    # Here, not at the top: the endpoint's schema and client (FastAPI, httpx) cost ~0.1 s of every build's
    # start, and most builds register nothing.
    from cwbuild.attest.api import Registration  # noqa: PLC0415
    from cwbuild.attest.client import delete_workload, register_workload  # noqa: PLC0415

    values = krun.reference_values(ctx) if spec.target is BuildTarget.KRUN else qemu.reference_values(ctx)
    tee, refs, policy = values
    try:
        reg = Registration.build(
            workload_id=spec.workload_id,
            tee=tee,
            reference_values=refs,
            policy=policy,
            secret=ctx.passphrase,
            replace=spec.replace,
        )
    except ConfigError as exc:
        raise BuildError(f"registration: {exc.message}") from None
    ca = spec.attestation_ca
    token = ctx.token

    def undo() -> None:
        delete_workload(url, token, spec.workload_id, ca)

    # Signals held until the rollback is registered: a SIGTERM while the request is under way would leave a
    # registration the endpoint made and nothing to delete it (the client's timeouts bound the wait).
    with deferred():
        try:
            register_workload(url, token, reg, ca, spec.replace)
        except NetworkError:
            # The request may have reached the endpoint before the connection failed: delete (idempotent; a
            # refusal such as workload.exists is an AttestError and leaves the existing registration alone).
            with contextlib.suppress(CwbuildError):
                undo()
            raise
        ctx.facts["registered"] = True
        ctx.rollbacks.append(undo)
    return StepArtifact(f"workload {spec.workload_id}", None, None, {"tee": tee, "url": url})


def publish(ctx: BuildContext) -> StepArtifact | None:
    """Rename the stage onto the output directory (atomic; an empty directory there is replaced)."""
    out = ctx.spec.output
    if ctx.spec.target is BuildTarget.QEMU:
        chmod_tree(ctx.stage)
    else:
        for name in (MANIFEST_JSON, "measurement.json"):
            if (ctx.stage / name).exists():
                (ctx.stage / name).chmod(0o644)
    os.chmod(ctx.stage, 0o755)  # noqa: S103 - the bundle directory holds no secret (disk is encrypted)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} appeared during the build; not overwriting it")

    def undo() -> None:
        shutil.rmtree(out, ignore_errors=True)

    with deferred():  # published and its removal registered before a signal is acted on
        os.replace(ctx.stage, out)
        ctx.rollbacks.append(undo)
    ctx.stage.mkdir(mode=0o700)  # the stack removes this empty placeholder
    return StepArtifact(str(out), None, None)


def store_image(ctx: BuildContext) -> StepArtifact | None:
    """--tag: the bundle as a FROM-scratch single-layer image with labels, in Podman (REST API) or written as
    an OCI image layout (oci:DIR[:TAG]) or a tar of one (oci-archive:FILE[:TAG])."""
    from cwbuild.build_steps.image_out import store_bundle_image, write_oci_image  # noqa: PLC0415
    from cwbuild.image.reference import Transport, parse_reference  # noqa: PLC0415

    tag = ctx.spec.tag
    assert tag is not None  # the step is only listed with --tag
    ref = parse_reference(tag)  # checked by config.check_tag
    if ref.transport is Transport.PODMAN:
        image_id = store_bundle_image(ctx, ref.name)  # its removal is in ctx.rollbacks
    else:
        image_id = write_oci_image(ctx, ref)  # likewise
    return StepArtifact(tag, image_id.removeprefix("sha256:"), None)

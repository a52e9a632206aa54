"""`--tag`: the bundle as a FROM-scratch, single-layer OCI image loaded into Podman through its REST API.

The layer holds the bundle's files (for `--target krun`, exactly buildah mkcw's four: entrypoint,
krun-sev.json, tmp/, disk.img, so crun + libkrun run it as buildah's). Labels say what it is, so
`cwbuild inspect IMAGE` and `podman image inspect` show the workload without unpacking it. The layer is
written deterministically (sorted names, owner 0, mtime SOURCE_DATE_EPOCH), then an oci-archive around it
(OCI image-layout spec: oci-layout, index.json, blobs/sha256/...) is streamed to `POST /images/load`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
from podman.errors import APIError, PodmanError

from cwbuild.build import BuildContext
from cwbuild.config import BuildTarget
from cwbuild.errors import BuildError
from cwbuild.image.podman import podman_client

#: Label keys (OCI annotations/labels use reverse-DNS prefixes: image-spec annotations.md "Rules").
LABEL_PREFIX = "org.cwbuild."
LABEL_BUNDLE = LABEL_PREFIX + "bundle"
#: buildah mkcw's image layer (cw-format.md §1.3), in the order `buildah push` writes it (sorted).
KRUN_LAYER = ("disk.img", "entrypoint", "krun-sev.json", "tmp")
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"


def labels(ctx: BuildContext) -> dict[str, str]:
    spec = ctx.spec
    out = {
        LABEL_BUNDLE: "1",
        LABEL_PREFIX + "workload-id": spec.workload_id,
        LABEL_PREFIX + "target": str(spec.target),
        LABEL_PREFIX + "tee": ctx.facts["manifest"]["tee"],
        LABEL_PREFIX + "development-only": "true" if spec.development_only else "false",
        LABEL_PREFIX + "source-image": str(ctx.facts["image"]["id"]),
    }
    for tee, entry in sorted(ctx.facts.get("measurements", {}).items()):
        value = entry.get("measurement") or entry.get("mrtd")
        if value:
            out[f"{LABEL_PREFIX}measurement.{tee}"] = value
    return out


def _members(root: Path, target: BuildTarget) -> Iterator[Path]:
    if target is BuildTarget.KRUN:
        yield from (root / name for name in KRUN_LAYER)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        if base != root:
            yield base
        yield from (base / name for name in sorted(filenames))


def write_layer(root: Path, out: Path, *, target: BuildTarget, mtime: int) -> None:
    """The bundle as an uncompressed tar: sorted, owner 0:0, fixed mtime, modes as on disk."""
    with out.open("xb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _members(root, target):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = mtime
            if info.isfile():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def image_config(ctx: BuildContext, diff_id: str, created: str) -> dict[str, Any]:
    config: dict[str, Any] = {"Labels": labels(ctx)}
    if ctx.spec.target is BuildTarget.KRUN:
        config["Entrypoint"] = ["/entrypoint"]  # buildah mkcw's SetEntrypoint (cw-format.md §1.8)
    return {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": f"cwbuild build --target {ctx.spec.target}"}],
    }


def write_oci_archive(ctx: BuildContext, layer: Path, out: Path, created: str) -> None:
    diff_id = _digest(layer)
    cfg_digest, cfg = _blob(json.dumps(image_config(ctx, diff_id, created), sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": cfg_digest, "size": len(cfg)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": diff_id, "size": layer.stat().st_size}],
    }
    man_digest, man = _blob(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": man_digest, "size": len(man)}],
    }
    small = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index).encode(),
        f"blobs/sha256/{cfg_digest[7:]}": cfg,
        f"blobs/sha256/{man_digest[7:]}": man,
    }
    with out.open("xb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in small.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        tar.add(str(layer), arcname=f"blobs/sha256/{diff_id[7:]}", recursive=False)


def _load(archive: Path, tag: str) -> tuple[str, Callable[[], None]]:
    repo, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
    try:
        with podman_client() as client, archive.open("rb") as body:
            resp = client.api.post("/images/load", data=body, headers={"Content-Type": "application/x-tar"})
            resp.raise_for_status()
            names = resp.json().get("Names") or []
            if not names:
                raise BuildError("Podman loaded no image from the bundle archive")
            image = client.images.get(names[0])
            image.tag(repo, version or "latest")
            image_id = str(image.id)
    except (APIError, PodmanError, OSError, ValueError, requests.RequestException) as exc:
        raise BuildError(f"storing the bundle image in Podman failed: {exc}") from exc

    def undo() -> None:
        try:
            with podman_client() as client:
                client.images.remove(image_id, force=True)
        except (APIError, PodmanError, OSError, requests.RequestException) as exc:
            raise BuildError(f"cannot remove image {image_id[:12]}: {exc}") from exc

    return image_id, undo


def store_bundle_image(ctx: BuildContext, tag: str) -> tuple[str, Callable[[], None]]:
    """Write the layer and the archive in the work directory, load it, tag it; returns (id, undo)."""
    root = ctx.spec.output
    epoch = int(ctx.facts["source_date_epoch"])
    created = _rfc3339(epoch)
    layer = ctx.work / "layer.tar"
    archive = ctx.work / "image.oci.tar"
    write_layer(root, layer, target=ctx.spec.target, mtime=epoch)
    write_oci_archive(ctx, layer, archive, created)
    layer.unlink()
    try:
        return _load(archive, tag)
    finally:
        archive.unlink(missing_ok=True)


def _rfc3339(epoch: int) -> str:
    import datetime as dt  # noqa: PLC0415

    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

"""`cwbuild inspect BUNDLE|IMAGE` for what `cwbuild build` makes: a bundle directory, or a CW image in Podman.

For a directory: what the bundle is (workload id, target, TEE, development-only, source image, kit), its
expected measurements (measurement.json, as recorded; `cwbuild measure --bundle` re-derives them), the disk's
LUKS header facts and krun footer, and every file the build manifest lists, checked by sha256 (`files[].ok`).
For an image: the labels `cwbuild build --tag` writes (`org.cwbuild.*`). Reads only; bounded JSON reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cwbuild.disk import footer
from cwbuild.disk.luks import read_header
from cwbuild.errors import CwbuildError, UsageError
from cwbuild.fileio import read_json_object, sha256_file

MAX_JSON = 1 << 20
LABEL_PREFIX = "org.cwbuild."
#: Files that make a directory a bundle: measurement.json (qemu, or krun with a firmware library),
#: manifest.json (every cwbuild bundle), krun-sev.json (buildah mkcw's layout, cw-format.md §1.3).
MARKERS = ("measurement.json", "manifest.json", "krun-sev.json")
MEASUREMENT_KEYS = ("measurement", "mrtd", "rtmr0", "rtmr1", "rtmr2")


def is_bundle(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in MARKERS)


def _json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path, limit=MAX_JSON) if path.is_file() else None


def _files(root: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every bundle file the manifest's steps recorded with a digest, re-hashed."""
    out = []
    for step in manifest.get("steps") or []:
        rel, want = step.get("path"), step.get("sha256")
        if not isinstance(rel, str) or not isinstance(want, str) or rel == "manifest.json":
            continue
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            continue
        path = root / rel
        if not path.is_file() or path.is_symlink():
            if rel.startswith("ext4 "):
                continue  # the plaintext filesystem's digest: recorded, not kept
            out.append({"path": rel, "sha256": want, "ok": False, "missing": True})
            continue
        out.append(
            {"path": rel, "sha256": want, "size": path.stat().st_size, "ok": sha256_file(path) == want}
        )
    return out


def _disk(root: Path) -> dict[str, Any] | None:
    disk = root / "disk.img"
    if not disk.is_file():
        return None
    try:
        header = read_header(disk).facts()
    except CwbuildError as exc:
        return {"error": exc.message}
    config = footer.read(disk)
    krun = json.loads(config) if config is not None else None
    return {"size": disk.stat().st_size, "luks": header, "krun_footer": krun}


def _measurements(doc: dict[str, Any] | None) -> dict[str, Any]:
    if doc is None:
        return {}
    out: dict[str, Any] = {}
    for tee, entry in sorted((doc.get("measurements") or {}).items()):
        if isinstance(entry, dict):
            values = {k: entry[k] for k in MEASUREMENT_KEYS if k in entry}
            out[tee] = {**values, "firmware_sha256": entry.get("firmware_sha256")}
    return out


def inspect_bundle_dir(root: Path) -> dict[str, Any]:
    """The `--json` document of a bundle directory."""
    manifest = _json(root / "manifest.json") or {}
    measurement = _json(root / "measurement.json")
    if measurement is not None and (
        measurement.get("format") != 1 or not isinstance(measurement.get("measurements"), dict)
    ):
        raise UsageError(f"{root} is not a cwbuild bundle: its measurement.json is not format 1")
    krun_config = _json(root / "krun-sev.json")
    image = manifest.get("image") or {}
    kit = manifest.get("kit") or {}
    return {
        "kind": "bundle",
        "path": str(root),
        "workload_id": manifest.get("workload_id"),
        "target": manifest.get("target") or ("krun" if krun_config is not None else "qemu"),
        "tee": manifest.get("tee"),
        "tees": manifest.get("tees"),
        "development_only": manifest.get("development_only"),
        "attestation": manifest.get("attestation"),
        "image": {k: image.get(k) for k in ("ref", "id", "manifest_digest")} if image else None,
        "kit": {k: kit.get(k) for k in ("id", "release", "kernel")} if kit else None,
        "cmdline": (measurement or {}).get("cmdline"),
        "measurements": _measurements(measurement),
        "launch": manifest.get("launch"),
        "krun_config": krun_config,
        "disk": _disk(root),
        "files": _files(root, manifest),
    }


def annotate_image(doc: dict[str, Any]) -> dict[str, Any]:
    """An image `inspect` document, with a `cwbuild` section when the image is a CW bundle image."""
    labels = (doc.get("config") or {}).get("Labels") or {}
    if not isinstance(labels, dict) or LABEL_PREFIX + "bundle" not in labels:
        return doc
    ours = {k[len(LABEL_PREFIX) :]: v for k, v in sorted(labels.items()) if k.startswith(LABEL_PREFIX)}
    measurements = {k.split(".", 1)[1]: v for k, v in ours.items() if k.startswith("measurement.")}
    section = {k: v for k, v in ours.items() if not k.startswith("measurement.") and k != "bundle"}
    return {**doc, "cwbuild": {**section, "measurements": measurements}}


def print_bundle(doc: dict[str, Any]) -> None:
    """Human output of `inspect_bundle_dir`."""
    rows = [
        ("bundle", doc["path"]),
        ("workload id", doc.get("workload_id")),
        ("target", doc.get("target")),
        ("tee", doc.get("tee")),
        ("development", "yes (nothing registered)" if doc.get("development_only") else "no"),
        ("image", (doc.get("image") or {}).get("ref")),
        ("kit", " ".join(str(v) for v in (doc.get("kit") or {}).values())),
        ("cmdline", doc.get("cmdline")),
    ]
    attestation = doc.get("attestation") or {}
    if attestation:
        rows.append(("attestation", attestation.get("url")))
    for key, value in rows:
        if value:
            click.echo(f"{key + ':':<16} {value}")
    for tee, values in doc["measurements"].items():
        for key, value in values.items():
            if value and key != "firmware_sha256":
                click.echo(f"{tee + ' ' + key + ':':<16} {value}")
    disk = doc.get("disk") or {}
    luks = disk.get("luks") or {}
    if luks:
        click.echo(f"{'disk:':<16} LUKS{luks.get('version')} {luks.get('cipher')}, {disk.get('size')} bytes")
    for f in doc["files"]:
        mark = "ok" if f["ok"] else "MISMATCH"
        click.echo(f"{'file:':<16} {f['path']} sha256:{f['sha256'][:16]} {mark}")

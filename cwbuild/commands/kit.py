"""`cwbuild kit fetch|list|export|import`: manage boot kits (DESIGN.md "Kit")."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cwbuild.boot import debian
from cwbuild.boot import kit as kits
from cwbuild.boot.fetch import DEFAULT_RELEASE, FetchOptions, fetch
from cwbuild.errors import KitError

_cache_option = click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache directory (default: $XDG_CACHE_HOME/cwbuild or ~/.cache/cwbuild).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@dataclass(frozen=True)
class ExportRequest:
    """`kit export`: which kit, where to."""

    cache: Path
    kit: str | None
    dest: Path


def summary(kit: kits.Kit, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `kit list` and `kit fetch --json` print about a kit."""
    files = kit.manifest["files"]
    out: dict[str, Any] = {
        "id": kit.id,
        "release": kit.release,
        "kernel": kit.kernel_version,
        "configfs_tsm": bool(kit.manifest["kernel"]["configfs_tsm"]),
        "tee": [t for t in ("snp", "tdx") if kit.supports(t)],
        "size": sum(int(f["size"]) for f in files.values()),
        "packages": {p["name"]: p["version"] for p in kit.manifest["packages"]},
        "path": str(kit.root),
    }
    if provenance is not None:
        out["fetched_at"] = provenance.get("fetched_at") or provenance.get("imported", {}).get(
            "fetched_at", ""
        )
    return out


@click.group("kit")
def command() -> None:
    """Fetch, list, export and import boot kits."""


@command.command("fetch")
@click.option(
    "--release", default=DEFAULT_RELEASE, show_default=True, help="Debian release of kernel and userland."
)
@_cache_option
@click.option("--archive", default=debian.DEFAULT_ARCHIVE, show_default=True, help="Debian archive URL.")
@click.option(
    "--keyring",
    type=click.Path(dir_okay=False, path_type=Path),
    default=debian.DEFAULT_KEYRING,
    show_default=True,
    help="OpenPGP keyring the InRelease signatures are checked against.",
)
@click.option(
    "--allow-expired", is_flag=True, help="Accept an InRelease past its Valid-Until (stale mirror)."
)
@_json_option
def fetch_command(
    release: str, cache: Path | None, archive: str, keyring: Path, allow_expired: bool, as_json: bool
) -> None:
    """Fetch and verify a kit from pinned Debian packages."""
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is --debug material
    opts = FetchOptions(
        cache=kits.cache_root(cache),
        release=release,
        archive=debian.Archive(url=archive, keyring=keyring, allow_expired=allow_expired),
    )
    started = time.monotonic()
    kit = fetch(opts)
    info = summary(kit)
    info["seconds"] = round(time.monotonic() - started, 2)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
    else:
        click.echo(f"{kit.id}  {kit.release}  kernel {kit.kernel_version}  {info['size'] / 1e6:.1f} MB")


@command.command("list")
@_cache_option
@_json_option
def list_command(cache: Path | None, as_json: bool) -> None:
    """List the cached kits, newest first."""
    found = kits.list_kits(kits.cache_root(cache))
    rows = [summary(k, p) for k, p in found]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for row in rows:
        tee = ",".join(row["tee"]) or "none (no configfs-tsm)"
        click.echo(f"{row['id']}  {row['release']}  kernel {row['kernel']}  tee {tee}  {row['fetched_at']}")


@command.command("export")
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kit", "kit_ref", default=None, help="Kit id or prefix (default: the newest kit).")
@_cache_option
def export_command(dest: Path, kit_ref: str | None, cache: Path | None) -> None:
    """Write a kit to FILE (a tar; zstd-compressed if FILE ends in .zst)."""
    export_kit(ExportRequest(kits.cache_root(cache), kit_ref, dest))


def _select(cache: Path, ref: str | None) -> kits.Kit:
    kit = kits.load(cache, ref) if ref else kits.latest(cache)
    if kit is None:
        raise KitError(f"no kit in {kits.kits_dir(cache)}", hint="run cwbuild kit fetch first")
    return kit


def export_kit(req: ExportRequest) -> kits.Kit:
    """Export the requested kit after checking its files."""
    kit = _select(req.cache, req.kit)
    kits.verify_files(kit)
    kits.export(kit, req.dest)
    click.echo(kit.id)
    return kit


@command.command("import")
@click.argument("src", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_cache_option
@_json_option
def import_command(src: Path, cache: Path | None, as_json: bool) -> None:
    """Import a kit exported with `kit export`, verifying every file against its manifest."""
    kit = kits.import_kit(src, kits.cache_root(cache))
    if as_json:
        click.echo(json.dumps(summary(kit), indent=2, sort_keys=True))
    else:
        click.echo(kit.id)


@command.command("verify")
@click.option("--kit", "kit_ref", default=None, help="Kit id or prefix (default: the newest kit).")
@_cache_option
def verify_command(kit_ref: str | None, cache: Path | None) -> None:
    """Check every file of a cached kit against its manifest."""
    kit = _select(kits.cache_root(cache), kit_ref)
    kits.verify_files(kit)
    click.echo(f"{kit.id}: {len(kit.manifest['files'])} files ok")

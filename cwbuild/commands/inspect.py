"""`cwbuild inspect IMAGE|DIR [--json]`: the resolved image (or, later, a bundle directory)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cwbuild import bundle_inspect
from cwbuild.image import DEFAULT_PLATFORM, open_image

#: A bundle directory is recognised by this file (DESIGN.md "Bundle").
BUNDLE_MARKER = "measurement.json"


@dataclass(frozen=True)
class InspectArgs:
    target: str
    json: bool
    platform: str


def inspect_image(ref: str, *, platform: str = DEFAULT_PLATFORM) -> dict[str, Any]:
    """The `--json` document of an image reference."""
    with open_image(ref, platform=platform) as image:
        return image.to_json()


def inspect_bundle(path: Path) -> dict[str, Any]:
    """A bundle directory (cwbuild.bundle_inspect)."""
    return bundle_inspect.inspect_bundle_dir(path)


def run_inspect(args: InspectArgs) -> dict[str, Any]:
    path = Path(args.target)
    if path.is_dir() and ((path / BUNDLE_MARKER).is_file() or bundle_inspect.is_bundle(path)):
        return inspect_bundle(path)
    return bundle_inspect.annotate_image(inspect_image(args.target, platform=args.platform))


def _print_human(doc: dict[str, Any]) -> None:
    click.echo(f"id:              {doc['id']}")
    click.echo(f"manifest digest: {doc['manifest_digest']}")
    click.echo(f"platform:        {doc['platform']}")
    for key, value in doc["config"].items():
        if value is not None:
            click.echo(f"{key + ':':<16} {json.dumps(value)}")
    table = Table("#", "digest", "diff_id", "media type", "size")
    for i, layer in enumerate(doc["layers"], 1):
        table.add_row(
            str(i), layer["digest"][:19], layer["diff_id"][:19], layer["media_type"], str(layer["size"])
        )
    Console(width=140).print(table)


@click.command("inspect")
@click.argument("target", metavar="IMAGE|DIR")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--platform", default=DEFAULT_PLATFORM, show_default=True, help="OS/ARCH[/VARIANT] in an index."
)
def command(target: str, as_json: bool, platform: str) -> None:
    """Show a resolved image: id, manifest digest, platform, layers and runtime config.

    IMAGE is a Podman store name (or containers-storage:NAME), oci:DIR[:TAG], oci-archive:FILE[:TAG] or
    docker-archive:FILE.
    """
    doc = run_inspect(InspectArgs(target, as_json, platform))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif doc.get("kind") == "bundle":
        bundle_inspect.print_bundle(doc)
    else:
        _print_human(doc)
        for key, value in (doc.get("cwbuild") or {}).items():
            click.echo(f"{'cwbuild ' + key + ':':<16} {json.dumps(value)}")

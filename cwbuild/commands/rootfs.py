"""`cwbuild rootfs IMAGE DIR`: write an image's flattened root filesystem into a new directory."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import click

from cwbuild.image import DEFAULT_PLATFORM, flatten_image
from cwbuild.image.rootfs import RootfsResult


@dataclass(frozen=True)
class RootfsArgs:
    image: str
    dest: Path
    platform: str


def run_rootfs(args: RootfsArgs) -> RootfsResult:
    with ExitStack() as stack:
        return flatten_image(args.image, args.dest, stack, platform=args.platform)[1]


@click.command("rootfs")
@click.argument("image")
@click.argument("dest", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--platform", default=DEFAULT_PLATFORM, show_default=True, help="OS/ARCH[/VARIANT] in an index."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(image: str, dest: Path, platform: str, as_json: bool) -> None:
    """Flatten IMAGE's layers into DIR (which must not exist; it is removed again on failure)."""
    result = run_rootfs(RootfsArgs(image, dest, platform))
    doc = {
        "path": str(result.path),
        "entries": result.entries,
        "bytes": result.bytes,
        "skipped_devices": list(result.skipped_devices),
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"{result.path}: {result.entries} entries, {result.bytes} bytes of file data")
        for device in result.skipped_devices:
            click.echo(f"skipped device node {device}")

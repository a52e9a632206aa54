"""`cwbuild build IMAGE`: flags (+ cwbuild.yaml) -> `BuildSpec` -> `cwbuild.build.run_build`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cwbuild.build import BuildResult, run_build
from cwbuild.config import load_yaml, merge

_PATH = click.Path(path_type=Path)
_FILE = click.Path(dir_okay=False, path_type=Path)


def _print(result: BuildResult, as_json: bool) -> None:
    doc: dict[str, Any] = {
        "output": str(result.output),
        "workload_id": result.workload_id,
        "development_only": result.development_only,
        "registered": result.registered,
        "tag": result.tag,
        "measurements": {
            tee: {k: v for k, v in entry.items() if k in ("measurement", "mrtd", "rtmr1", "rtmr2")}
            for tee, entry in result.measurements.items()
        },
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    click.echo(f"bundle      {result.output}")
    click.echo(f"workload id {result.workload_id}")
    for tee, values in doc["measurements"].items():
        for key, value in values.items():
            if value:
                click.echo(f"{tee:<11} {key} {value}")
    if result.registered:
        click.echo("registered with the attestation endpoint")
    if result.development_only:
        click.echo("development-only: nothing registered; the disk opens with your passphrase only")
    if result.tag:
        click.echo(f"image       {result.tag}")


@click.command("build")
@click.argument("image", required=False)
@click.option("-o", "--output", type=_PATH, help="Bundle directory to create (default ./NAME.bundle).")
@click.option(
    "--tag",
    metavar="REF",
    help="Also store the bundle as an image: NAME or containers-storage:NAME (in Podman), "
    "oci:DIR[:TAG] (an OCI layout directory) or oci-archive:FILE[:TAG] (a tar of one).",
)
@click.option("--tee", "tees", multiple=True, help="snp | sev-es | sev | tdx | sim (repeatable).")
@click.option("--type", "type_", help="buildah's words: snp, sev (= SEV-ES), sev_no_es (= SEV).")
@click.option("--cpus", type=int, help="vCPUs (a measurement input). [default: 2]")
@click.option("--memory", type=int, help="Guest memory in MiB. [default: 2048, krun 512]")
@click.option("--workload-id", help="Workload id (default: random 128-bit hex).")
@click.option("--passphrase-file", help="Disk passphrase file ('-' = stdin); default: 32 random bytes.")
@click.option("--slop", help="Extra filesystem space, buildah's grammar. [default: 25%]")
@click.option("--format", "luks_format", type=click.Choice(["luks2", "luks1"]), help="[default: luks2]")
@click.option("--kit", help="Kit id (prefix) in the cache, or a kit directory.")
@click.option("--kit-cache", type=_PATH, help="Kit cache root (default ~/.cache/cwbuild).")
@click.option("--release", help="Debian release of the default kit. [default: trixie]")
@click.option("--firmware", type=_FILE, help="Firmware file instead of the kit's OVMF.")
@click.option("--firmware-library", type=_FILE, help="libkrunfw-sev measured for --target krun.")
@click.option("--snp-gen", help="SNP generation in krun-sev.json: milan | genoa | turin.")
@click.option("--cmdline", help="Kernel command line (measured).")
@click.option("--target", type=click.Choice(["qemu", "krun"]), help="[default: qemu]")
@click.option("--attestation-url", help="Guest-facing endpoint URL (measured into the initrd).")
@click.option("--attestation-ca", type=_FILE, help="CA certificate (PEM) the guest pins for that URL.")
@click.option("--register-url", help="Where to register (default: --attestation-url).")
@click.option("--register-token-file", type=_FILE, help="Admin token file for the registration.")
@click.option("--replace", is_flag=True, default=None, help="Overwrite an existing registration.")
@click.option("--offline", is_flag=True, default=None, help="Never fetch a kit.")
@click.option(
    "--platform",
    help="linux/amd64[/VARIANT] from an image index; the image must be linux/amd64. [default: linux/amd64]",
)
@click.option(
    "--rootfs-via",
    type=click.Choice(["mount", "export"]),
    help="A Podman store image's tree: mounted in place (root; else exported) or exported. [default: mount]",
)
@click.option("--config", "config_file", type=_FILE, help="cwbuild.yaml holding any of these options.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(config_file: Path | None, as_json: bool, type_: str | None, **flags: Any) -> None:
    """Build a confidential workload bundle from IMAGE (a Podman store name, oci:DIR, oci-archive:FILE or
    docker-archive:FILE): encrypted disk, kernel + measured initrd, firmware, expected measurements, launch
    configs; registered with the attestation endpoint when --attestation-url is given."""
    flags["memory_mib"] = flags.pop("memory")
    flags["type"] = type_
    file_values = load_yaml(config_file) if config_file is not None else {}
    spec = merge(flags, file_values)
    _print(run_build(spec), as_json)

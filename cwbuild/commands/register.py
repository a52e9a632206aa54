"""`cwbuild register`: register a workload with an attestation endpoint (API v1)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click

from cwbuild.attest.api import Registration
from cwbuild.attest.client import get_workload, register_workload
from cwbuild.attest.policy import load_policy_text
from cwbuild.errors import ConfigError
from cwbuild.secrets import read_passphrase_file, read_token_file


@dataclass(frozen=True)
class RegisterArgs:
    url: str
    token_file: Path
    ca_file: Path | None
    timeout: float
    json: bool


def _policy(path: Path | None) -> dict[str, object]:
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from None
    import yaml  # noqa: PLC0415 - only needed with --policy

    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError("policy file must hold a mapping")
    load_policy_text(text)  # validates; the registration keeps only the keys the user wrote
    return data


@click.command(name="register")
@click.option("--url", required=True, help="Endpoint base URL, e.g. https://attest.example:8443")
@click.option(
    "--token-file", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Admin token file."
)
@click.option("--workload-id", required=True, help="Workload id.")
@click.option("--tee", required=True, type=click.Choice(["snp", "tdx", "sim"]), help="TEE type.")
@click.option(
    "--reference",
    "references",
    multiple=True,
    required=True,
    metavar="HEX",
    help="Allowed launch measurement (SNP MEASUREMENT / TDX MRTD, 96 hex); repeatable.",
)
@click.option("--secret-file", required=True, help="File holding the secret (passphrase rules; '-' = stdin).")
@click.option(
    "--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path), help="Policy (YAML/JSON)."
)
@click.option(
    "--ca-file", type=click.Path(dir_okay=False, path_type=Path), help="CA bundle for the endpoint's TLS."
)
@click.option("--replace", is_flag=True, help="Overwrite an existing registration with this id.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per request.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored registration as JSON.")
def command(  # noqa: PLR0913, PLR0917 - click passes one parameter per flag
    url: str,
    token_file: Path,
    workload_id: str,
    tee: str,
    references: tuple[str, ...],
    secret_file: str,
    policy_file: Path | None,
    ca_file: Path | None,
    replace: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Register a workload: id, TEE, reference measurements, policy and secret."""
    args = RegisterArgs(url, token_file, ca_file, timeout, as_json)
    reg = Registration.build(
        workload_id=workload_id,
        tee=tee,
        reference_values=list(references),
        policy=_policy(policy_file),
        secret=read_passphrase_file(secret_file),
        replace=replace,
    )
    run_register(args, reg)


def run_register(args: RegisterArgs, reg: Registration) -> None:
    token = read_token_file(args.token_file)
    register_workload(args.url, token, reg, args.ca_file, reg.replace, timeout=args.timeout)
    stored = get_workload(args.url, token, reg.workload_id, args.ca_file, timeout=args.timeout)
    if args.json:
        click.echo(json.dumps(stored, indent=2, sort_keys=True))
    else:
        click.echo(
            f"registered {reg.workload_id} ({reg.tee}, {len(reg.reference_values)} reference value(s))"
        )

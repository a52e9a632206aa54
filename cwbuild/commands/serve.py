"""`cwbuild serve`: run the attestation endpoint (DESIGN.md "Attestation API v1")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cwbuild.attest.server_run import load_config, serve


@click.command(name="serve")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="server.yaml")
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8080; port 0 picks a free one).")
@click.option("--db", help="SQLite database path (default ./cwbuild-attest.db).")
@click.option("--admin-token-file", help="File holding the admin bearer token (mode 0600, >= 32 chars).")
@click.option(
    "--master-key-file", help="File holding the 256-bit master key (32 bytes or 64 hex, mode 0600)."
)
@click.option("--tls-cert", help="PEM certificate chain for HTTPS.")
@click.option("--tls-key", help="PEM private key for HTTPS.")
@click.option(
    "--insecure-http", is_flag=True, default=None, help="Allow plain HTTP on non-loopback addresses."
)
@click.option(
    "--kbs-compat", is_flag=True, default=None, help="Serve /kbs/v0 for buildah mkcw and krun guests."
)
@click.option(
    "--kbs-compat-allow",
    "kbs_compat_allow",
    multiple=True,
    metavar="CIDR",
    help="Networks allowed to POST /kbs/v0/register_workload (default: loopback).",
)
@click.option(
    "--insecure-sim-trust", metavar="PUBKEY", help="Trust simulated-TEE reports signed by this key (PEM)."
)
@click.option("--cert-cache", help="Directory of cached VCEKs (read, and written after KDS fetches).")
@click.option("--offline", is_flag=True, default=None, help="Never fetch certificates from AMD KDS.")
@click.option("--audit-log", help="Append audit lines (JSON) to this file instead of the log.")
@click.option("--access-log", is_flag=True, default=None, help="Log every HTTP request.")
def command(config_file: Path | None, kbs_compat_allow: tuple[str, ...], **flags: Any) -> None:
    """Run the attestation endpoint: register workloads, verify evidence, release keys."""
    overrides = dict(flags)
    if kbs_compat_allow:
        overrides["kbs_compat_allow"] = kbs_compat_allow
    serve(load_config(config_file, overrides))

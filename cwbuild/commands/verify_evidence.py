"""`cwbuild verify-evidence`: verify an SEV-SNP report or a TDX quote offline (issue 4 item 4).

    cwbuild verify-evidence --tee snp|tdx|sim --evidence FILE [--cert FILE ...] [--crl FILE ...]
                            [--collateral FILE] [--policy FILE] [--sim-key PEM] [--at RFC3339] [--json]

Exit 0 when the verdict is ok, 1 when it is not (with `--json` the verdict object is printed either way,
malformed evidence included), 2 for usage errors (bad flags, unreadable files, a malformed policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

from cwbuild.attest.policy import Policy, load_policy_text
from cwbuild.attest.verdict import Verdict
from cwbuild.attest.verify import EvidenceRequest, Tee, verify_evidence
from cwbuild.errors import UsageError
from cwbuild.fileio import read_limited

MAX_INPUT_BYTES = 1 << 20  # evidence, certificates, CRLs and collateral are all far smaller


@dataclass(frozen=True)
class VerifyArgs:
    tee: Tee
    evidence: Path
    certs: tuple[Path, ...]
    crls: tuple[Path, ...]
    collateral: Path | None
    policy: Path | None
    sim_key: Path | None
    at: str | None
    json: bool


def _read(path: Path) -> bytes:
    return read_limited(path, limit=MAX_INPUT_BYTES, error=UsageError)


def parse_time(text: str | None) -> datetime:
    """RFC 3339 with an explicit offset (`2025-06-01T00:00:00Z`); the current time when absent."""
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--at {text!r} is not an RFC 3339 time", hint="e.g. 2025-06-01T00:00:00Z") from None
    if moment.tzinfo is None:
        raise UsageError(f"--at {text!r} has no UTC offset", hint="append Z or +00:00")
    return moment.astimezone(UTC)


def build_request(args: VerifyArgs) -> EvidenceRequest:
    """Read the files and parse the policy (usage errors surface here, before verification)."""
    if args.collateral is not None and args.tee is not Tee.TDX:
        raise UsageError("--collateral is for --tee tdx")
    if (args.certs or args.crls) and args.tee is not Tee.SNP:
        raise UsageError("--cert and --crl are for --tee snp (a TDX quote carries its PCK chain)")
    if (args.sim_key is not None) != (args.tee is Tee.SIM):
        raise UsageError("--tee sim needs --sim-key, and --sim-key needs --tee sim")
    policy: Policy | None = None
    if args.policy is not None:
        policy = load_policy_text(_read(args.policy).decode("utf-8", "replace"))
    return EvidenceRequest(
        tee=args.tee,
        evidence=_read(args.evidence),
        at=parse_time(args.at),
        certs=tuple(_read(p) for p in args.certs),
        crls=tuple(_read(p) for p in args.crls),
        collateral=None if args.collateral is None else _read(args.collateral),
        policy=policy,
        sim_key=None if args.sim_key is None else _read(args.sim_key),
    )


def _print_human(verdict: Verdict) -> None:
    claims = verdict.claims
    head = "OK" if verdict.ok else "REFUSED"
    what = {"snp": "SEV-SNP report", "tdx": "TDX quote"}.get(str(claims.get("tee")), "evidence")
    signer = f", signer {claims['signer']}" if "signer" in claims else ""
    product = f", {claims['product']}" if "product" in claims else ""
    click.echo(f"{head}: {what}{product}{signer}")
    for key in ("measurement", "mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data"):
        if key in claims:
            click.echo(f"  {key:<12} {claims[key]}")
    tcb = claims.get("tcb")
    if isinstance(tcb, dict) and "tcb_status" in tcb:
        extra = f"module {tcb['module_tcb_status']}, QE {tcb['qe_tcb_status']}"
        click.echo(f"  {'tcb_status':<12} {tcb['tcb_status']} ({extra})")
    elif isinstance(tcb, dict) and "reported" in tcb:
        click.echo(f"  {'tcb':<12} reported {tcb['reported']}")
    for failure in verdict.failures:
        click.echo(f"  failure {failure.id}: {failure.detail}")


@click.command("verify-evidence")
@click.option("--tee", type=click.Choice([t.value for t in Tee]), required=True, help="Evidence type.")
@click.option(
    "--evidence", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Raw report/quote."
)
@click.option("--cert", "certs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="SNP: VCEK/VLEK (DER or PEM; a PEM bundle may add ASK/ARK). Repeatable.")  # fmt: skip
@click.option("--crl", "crls", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="SNP: an ARK-signed CRL (DER). Repeatable.")  # fmt: skip
@click.option(
    "--collateral", type=click.Path(dir_okay=False, path_type=Path), help="TDX: offline collateral JSON."
)
@click.option("--policy", type=click.Path(dir_okay=False, path_type=Path), help="Policy (JSON/YAML).")
@click.option(
    "--sim-key", type=click.Path(dir_okay=False, path_type=Path), help="sim: the signer's public key."
)
@click.option("--at", help="Verification time, RFC 3339 (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def command(  # noqa: PLR0913, PLR0917 - click passes each option as an argument
    tee: str,
    evidence: Path,
    certs: tuple[Path, ...],
    crls: tuple[Path, ...],
    collateral: Path | None,
    policy: Path | None,
    sim_key: Path | None,
    at: str | None,
    as_json: bool,
) -> int:
    """Verify an SEV-SNP report or a TDX quote offline against the pinned AMD/Intel roots."""
    args = VerifyArgs(Tee(tee), evidence, certs, crls, collateral, policy, sim_key, at, as_json)
    verdict = verify_evidence(build_request(args))
    if args.json:
        click.echo(verdict.to_json())
    else:
        _print_human(verdict)
    return 0 if verdict.ok else 1

"""One entry point over the evidence verifiers, for the CLI (`cwbuild verify-evidence`) and scripts.

Pure: the request carries every input, including the time; the result is a `Verdict`. Malformed inputs that
belong to the evidence (report, quote, certificates, collateral) become failures in the verdict, never
exceptions, so `--json` can always print one object.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cwbuild.attest.collateral import Collateral
from cwbuild.attest.policy import Policy
from cwbuild.attest.sim import load_sim_public_key
from cwbuild.attest.snp import verify_snp
from cwbuild.attest.tdx import verify_tdx
from cwbuild.attest.trust import TrustStore
from cwbuild.attest.verdict import Verdict, malformed
from cwbuild.errors import FormatError


class Tee(enum.StrEnum):
    SNP = "snp"
    TDX = "tdx"
    SIM = "sim"


@dataclass(frozen=True)
class EvidenceRequest:
    """Everything one verification needs. Byte fields are file contents, unparsed."""

    tee: Tee
    evidence: bytes
    at: datetime
    certs: tuple[bytes, ...] = ()
    crls: tuple[bytes, ...] = ()
    collateral: bytes | None = None
    policy: Policy | None = None
    sim_key: bytes | None = None


def _snp(req: EvidenceRequest, trust: TrustStore) -> Verdict:
    return verify_snp(
        req.evidence, certs=req.certs, crls=req.crls, trust=trust, policy=req.policy, now=req.at
    )


def _sim(req: EvidenceRequest, trust: TrustStore) -> Verdict:
    if req.sim_key is None:
        return malformed("snp.cert_missing", "--tee sim needs the simulated TEE's public key")
    try:
        key = load_sim_public_key(req.sim_key)
    except FormatError as exc:
        return malformed("snp.cert_malformed", exc.message)
    return verify_snp(req.evidence, trust=trust, policy=req.policy, now=req.at, sim_key=key)


def _tdx(req: EvidenceRequest, trust: TrustStore) -> Verdict:
    collateral = None
    if req.collateral is not None:
        try:
            collateral = Collateral.from_json(req.collateral)
        except FormatError as exc:
            return malformed("tdx.collateral_malformed", exc.message)
    return verify_tdx(req.evidence, trust=trust, collateral=collateral, policy=req.policy, now=req.at)


_VERIFIERS: dict[Tee, Callable[[EvidenceRequest, TrustStore], Verdict]] = {
    Tee.SNP: _snp,
    Tee.TDX: _tdx,
    Tee.SIM: _sim,
}


def verify_evidence(req: EvidenceRequest, trust: TrustStore | None = None) -> Verdict:
    """The verdict on `req.evidence` for `req.tee`; the package's pinned roots unless `trust` is given."""
    return _VERIFIERS[req.tee](req, trust or TrustStore.default())

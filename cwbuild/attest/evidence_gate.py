"""Dispatch of guest evidence to the verifier of the workload's TEE, with the endpoint's trust material.

The gate decides which verifier runs from the *registered* TEE type, never from the evidence: a `tee: snp`
workload is verified against the AMD roots only (simulated evidence then fails like any forgery), and a
`tee: sim` workload is verified with the simulated TEE's key only when the endpoint was started with
`--insecure-sim-trust` (DESIGN.md "Simulated TEE"). Sim evidence goes through the same SNP parser and
policy path; only the signer differs. Each use of sim trust is logged loudly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import ec

from cwbuild.attest.certsource import CertSource
from cwbuild.attest.pcs_source import CollateralSource, PcsOptions
from cwbuild.attest.policy import Policy
from cwbuild.attest.snp import verify_snp
from cwbuild.attest.snp_report import SnpReport
from cwbuild.attest.tdx import verify_tdx
from cwbuild.attest.trust import TrustStore
from cwbuild.attest.verdict import Failure, Verdict, malformed
from cwbuild.errors import FormatError

log = logging.getLogger("cwbuild.attest.gate")

INSECURE_SIM_WARNING = (
    "INSECURE: simulated TEE evidence is trusted (--insecure-sim-trust); never use in production"
)


def refused(reason: str, detail: str) -> Verdict:
    """A verdict for refusals decided by the gate itself (ids outside the verifiers' FAILURE_IDS)."""
    return Verdict(ok=False, failures=(Failure(reason, detail),))


@dataclass(frozen=True)
class EvidenceGate:
    certs: CertSource
    trust: TrustStore | None = None
    sim_key: ec.EllipticCurvePublicKey | None = None
    collateral: CollateralSource = field(default_factory=lambda: CollateralSource(PcsOptions(offline=True)))

    def verify(
        self, tee: str, evidence: bytes, table: bytes | None, *, policy: Policy, now: datetime
    ) -> Verdict:
        """The verdict on `evidence` for a workload registered as `tee`."""
        if tee == "sim":
            return self._sim(evidence, policy=policy, now=now)
        if tee == "snp":
            return self._snp(evidence, table, policy=policy, now=now)
        if tee == "tdx":
            return self._tdx(evidence, policy=policy, now=now)
        return refused("workload.tee_unsupported", f"no verifier for TEE {tee!r}")

    def may_fetch(self, tee: str, evidence: bytes, table: bytes | None) -> bool:
        """Whether `verify` may fetch certificates over the network for this evidence."""
        if tee == "tdx":
            return self.collateral.may_fetch(evidence)
        if tee != "snp":
            return False
        try:
            return self.certs.may_fetch(SnpReport.parse(evidence), table)
        except FormatError:
            return False

    def _sim(self, evidence: bytes, *, policy: Policy, now: datetime) -> Verdict:
        if self.sim_key is None:
            return refused(
                "sim.not_trusted", "simulated evidence needs an endpoint started with --insecure-sim-trust"
            )
        log.warning("%s: verifying simulated evidence", INSECURE_SIM_WARNING)
        return verify_snp(evidence, trust=self.trust, policy=policy, now=now, sim_key=self.sim_key)

    def _snp(self, evidence: bytes, table: bytes | None, *, policy: Policy, now: datetime) -> Verdict:
        try:
            parsed = SnpReport.parse(evidence)
        except FormatError as exc:
            return malformed("snp.malformed", exc.message)
        try:
            certs = self.certs.certs_for(parsed, table)
        except FormatError as exc:
            return malformed("snp.cert_malformed", f"cert table: {exc.message}")
        return verify_snp(evidence, certs=certs, trust=self.trust, policy=policy, now=now)

    def _tdx(self, evidence: bytes, *, policy: Policy, now: datetime) -> Verdict:
        collateral = self.collateral.for_quote(evidence)
        return verify_tdx(evidence, trust=self.trust, collateral=collateral, policy=policy, now=now)

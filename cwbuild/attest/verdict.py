"""The result of verifying evidence: authentic or not, every failure with a stable id, and the claims.

Failure ids are part of the interface (the endpoint returns them and writes them to the audit log), so they
never change meaning. They are `<tee>.<reason>`; the full list is `FAILURE_IDS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Every failure id the verifiers emit, with its meaning. Add, never rename.
FAILURE_IDS: dict[str, str] = {
    # --- AMD SEV-SNP (spec/attestation.md §1) ---
    "snp.malformed": "the report is not a well-formed SEV-SNP ATTESTATION_REPORT (§1.1, §1.10 step 1)",
    "snp.signing_key_none": "SIGNING_KEY is 7: the report is not signed (§1.1 signer info)",
    "snp.signing_key_reserved": "SIGNING_KEY is a reserved value 2..6 (§1.1 signer info)",
    "snp.cert_missing": "no VCEK/VLEK certificate was supplied for the report's signing key",
    "snp.cert_malformed": "a supplied certificate is not valid DER/PEM X.509 or lacks the AMD profile (§1.7)",
    "snp.cert_kind_mismatch": "the certificate is a VCEK where a VLEK is needed, or the reverse (§1.7)",
    "snp.chain_invalid": "a certificate signature in the ARK -> ASK/ASVK -> VCEK/VLEK chain fails (§1.8)",
    "snp.cert_expired": "a certificate of the chain is outside its validity window at the given time",
    "snp.cert_revoked": "the ASK/ASVK is listed in an ARK-signed CRL (§1.8)",
    "snp.root_untrusted": "a supplied ARK/ASK is not the pinned one for its product (§5)",
    "snp.product_unknown": "the VCEK/VLEK issuer names no known product (Milan, Genoa, Turin) (§1.7)",
    "snp.product_mismatch": "the report's CPUID family/model contradicts the product of the chain (§1.6)",
    "snp.signature_invalid": "the report signature does not verify with the VCEK/VLEK (or sim) key (§1.1)",
    "snp.signature_malformed": "R or S is out of range or their upper 24 bytes are not zero (§1.1)",
    "snp.tcb_cert_mismatch": "REPORTED_TCB differs from the TCB in the VCEK/VLEK extensions (§1.10 step 7)",
    "snp.tcb_reported_above_current": "REPORTED_TCB exceeds CURRENT_TCB in some component (§1.10 step 7)",
    "snp.chip_id_mismatch": "CHIP_ID differs from the VCEK hwID (§1.10 step 7)",
    "snp.vmpl_mismatch": "VMPL differs from the policy's (§1.2)",
    "snp.policy_debug": "guest policy allows DEBUG and the policy forbids it (§1.3)",
    "snp.policy_migrate_ma": "guest policy allows a migration agent and the policy forbids it (§1.3)",
    "snp.policy_smt": "guest policy allows SMT and the policy forbids it (§1.3)",
    "snp.policy_single_socket": "the policy requires SINGLE_SOCKET and the guest policy lacks it (§1.3)",
    "snp.abi_below_minimum": "the guest policy's ABI major.minor is below the policy's minimum (§1.3)",
    "snp.tcb_below_minimum": "a TCB component is below the policy's minimum for this product (§1.10 step 8)",
    "snp.provisional_firmware": "COMMITTED differs from CURRENT (TCB or version) and the policy forbids it",
    "snp.guest_svn_below_minimum": "GUEST_SVN is below the policy's minimum",
    "snp.measurement_mismatch": "MEASUREMENT is not one of the allowed values",
    "snp.report_data_mismatch": "REPORT_DATA differs from the expected value",
    "snp.host_data_mismatch": "HOST_DATA differs from the expected value",
    # --- Intel TDX (spec/attestation.md §3) ---
    "tdx.malformed": "the quote is not a well-formed TDX quote v4/v5 (§3.1-§3.3)",
    "tdx.pck_chain_missing": "the quote carries no PCK certificate chain (certification data type 5)",
    "tdx.pck_chain_invalid": "a signature or name in the PCK chain fails (§3.6 step 3)",
    "tdx.cert_malformed": "a PCK or collateral chain certificate cannot be parsed or has the wrong profile",
    "tdx.cert_expired": "a certificate is outside its validity window at the given time",
    "tdx.cert_revoked": "a certificate is listed in a CRL (§3.6 step 7)",
    "tdx.root_untrusted": "the chain does not end at the pinned Intel SGX Root CA (§5)",
    "tdx.signature_invalid": "the quote signature by the attestation key fails (§3.6 step 4)",
    "tdx.qe_report_signature_invalid": "the QE report signature by the PCK key fails (§3.6 step 5)",
    "tdx.qe_binding_mismatch": "QE report_data != SHA-256(attestation key || QE auth data) || 0*32 (§3.6.6)",
    "tdx.collateral_malformed": "the collateral bundle cannot be parsed (§3.7)",
    "tdx.collateral_signature_invalid": "TCB info / QE identity signature or issuer chain fails (§3.7)",
    "tdx.collateral_expired": "TCB info, QE identity or a CRL is not valid at the given time (§3.7)",
    "tdx.collateral_mismatch": "TCB info FMSPC/PCEID or module identity does not match the quote (§3.6.8)",
    "tdx.qe_identity_mismatch": "the QE report does not match the QE identity (§3.6 step 9)",
    "tdx.tcb_level_not_found": "no TCB level of the TCB info matches the platform (§3.8)",
    "tdx.tcb_status_unacceptable": "the TCB status is not one the policy accepts (§3.6 step 10)",
    "tdx.collateral_missing": "the policy requires collateral and none was given",
    "tdx.debug": "TD_ATTRIBUTES.DEBUG is set and the policy forbids it (§3.2)",
    "tdx.sept_ve_disable_required": "TD_ATTRIBUTES.SEPT_VE_DISABLE is clear; the policy requires it (§3.2)",
    "tdx.measurement_mismatch": "MRTD is not one of the allowed values",
    "tdx.rtmr_mismatch": "an RTMR is not one of the allowed values",
    "tdx.mrconfigid_mismatch": "MRCONFIGID differs from the expected value",
    "tdx.mrowner_mismatch": "MROWNER differs from the expected value",
    "tdx.report_data_mismatch": "REPORTDATA differs from the expected value",
}


@dataclass(frozen=True)
class Failure:
    """One reason evidence was refused: a stable id (a key of FAILURE_IDS) and a human detail."""

    id: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "detail": self.detail}


@dataclass(frozen=True)
class Verdict:
    """`ok` is true exactly when `failures` is empty. `claims` is JSON-ready (hex strings, ints, bools)."""

    ok: bool
    failures: tuple[Failure, ...]
    claims: dict[str, Any] = field(default_factory=dict)

    def failure_ids(self) -> tuple[str, ...]:
        return tuple(f.id for f in self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "failures": [f.to_dict() for f in self.failures], "claims": self.claims}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


class Findings:
    """Collects failures and claims while a verifier runs, then freezes them into a Verdict."""

    def __init__(self) -> None:
        self.failures: list[Failure] = []
        self.claims: dict[str, Any] = {}

    def fail(self, failure_id: str, detail: str) -> None:
        if failure_id not in FAILURE_IDS:  # a programming error, not untrusted input
            raise KeyError(f"unregistered failure id {failure_id!r}")
        self.failures.append(Failure(failure_id, detail))

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def verdict(self) -> Verdict:
        return Verdict(ok=not self.failures, failures=tuple(self.failures), claims=dict(self.claims))


def malformed(failure_id: str, detail: str, claims: dict[str, Any] | None = None) -> Verdict:
    """The verdict for input that could not even be parsed."""
    return Verdict(ok=False, failures=(Failure(failure_id, detail),), claims=dict(claims or {}))

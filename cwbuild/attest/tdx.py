"""Verification of Intel TDX quotes v4/v5 (spec/attestation.md §3.6), pure and offline.

`verify_tdx` takes the quote bytes, the pinned trust store, optional offline collateral, an optional policy
and the time, and returns a `Verdict`. Without a policy the verdict says whether the quote is authentic
(quote signature, QE report signature, QE binding, PCK chain to the pinned root, validity at `now`, and the
collateral's signatures, dates, CRLs and identity matches when collateral is given); debug, TCB status and
measurements are then only reported in the claims.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cwbuild.attest import tdx_quote as layout
from cwbuild.attest.collateral import Collateral, TcbResult, check_crls, evaluate
from cwbuild.attest.intel_certs import (
    PCK_CN,
    PCK_ISSUER_CNS,
    PckInfo,
    parse_pck_extension,
    split_pem_chain,
    verify_intel_chain,
)
from cwbuild.attest.policy import Policy
from cwbuild.attest.tdx_quote import TdxQuote
from cwbuild.attest.trust import TrustStore, utc
from cwbuild.attest.verdict import Findings, Verdict, malformed
from cwbuild.errors import FormatError

__all__ = ["Collateral", "TdxQuote", "verify_tdx"]


def _ecdsa_p256_ok(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """r||s big-endian, 32 bytes each (§3.3), over `data` with SHA-256."""
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey | None:
    """X||Y big-endian without the 0x04 prefix (§3.3); None when not a point on P-256."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        return None


def verify_tdx(
    quote: bytes,
    *,
    trust: TrustStore | None = None,
    collateral: Collateral | None = None,
    policy: Policy | None,
    now: datetime,
) -> Verdict:
    """Verify a TDX quote; see the module docstring."""
    try:
        parsed = TdxQuote.parse(quote)
    except FormatError as exc:
        return malformed("tdx.malformed", exc.message)
    trust = trust or TrustStore.default()
    now = utc(now)
    f = Findings()
    f.claims.update(_base_claims(parsed))
    _check_quote_signature(parsed, f)
    _check_qe_binding(parsed, f)
    chain, pck = _check_pck(parsed, trust, now, f)
    result: TcbResult | None = None
    if collateral is not None and chain is not None and pck is not None:
        check_crls(collateral, chain[0], chain[1], trust=trust, now=now, f=f)
        result = evaluate(
            collateral, body=parsed.body, qe=parsed.qe_report, pck=pck, trust=trust, now=now, f=f
        )
        if result is not None:
            f.claims["tcb"] = result.to_dict()
    if policy is not None:
        _apply_policy(parsed, policy, collateral, result, f)
    return f.verdict()


def _check_quote_signature(q: TdxQuote, f: Findings) -> None:
    """§3.6 step 4: the attestation key signed header || body."""
    key = _attestation_key(q.attestation_key)
    if key is None or not _ecdsa_p256_ok(key, q.signature, q.signed):
        f.fail("tdx.signature_invalid", "the quote signature by the attestation key does not verify")


def _check_qe_binding(q: TdxQuote, f: Findings) -> None:
    """§3.6 step 6: QE report_data = SHA-256(attestation key || QE auth data) || 32 zero bytes."""
    expected = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + bytes(32)
    if q.qe_report.report_data != expected:
        f.fail("tdx.qe_binding_mismatch", "the QE report does not bind the attestation key")


def _check_pck(
    q: TdxQuote, trust: TrustStore, now: datetime, f: Findings
) -> tuple[list[x509.Certificate] | None, PckInfo | None]:
    """§3.6 steps 2, 3 and 5: the PCK chain, and the QE report signed by the PCK key."""
    try:
        chain = list(
            trust.memo("pck-chain", q.pck_chain_pem, lambda: tuple(split_pem_chain(q.pck_chain_pem)))
        )
        pck = trust.derived("pck-ext", chain[0], lambda: parse_pck_extension(chain[0])) if chain else None
    except FormatError as exc:
        f.fail("tdx.cert_malformed", f"PCK chain: {exc.message}")
        return None, None
    if pck is None:
        f.fail("tdx.pck_chain_missing", "the certification data holds no certificate")
        return None, None
    f.claims["pck"] = {
        "fmspc": pck.fmspc.hex(),
        "pceid": pck.pceid.hex(),
        "pcesvn": pck.pcesvn,
        "cpusvn": pck.cpusvn.hex(),
        "sgx_tcb": list(pck.sgx_tcb),
    }
    authentic = verify_intel_chain(
        chain, leaf_cns=frozenset({PCK_CN}), mid_cns=PCK_ISSUER_CNS, trust=trust, now=now, f=f
    )
    key = chain[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not _ecdsa_p256_ok(
        key, q.qe_report_signature, q.qe_report.raw
    ):
        f.fail("tdx.qe_report_signature_invalid", "the QE report signature by the PCK key does not verify")
    return (chain, pck) if authentic else (None, None)


def _apply_policy(
    q: TdxQuote, policy: Policy, collateral: Collateral | None, result: TcbResult | None, f: Findings
) -> None:
    """§3.6 step 10."""
    body = q.body
    if body.td_attributes & layout.TD_ATTR_DEBUG and not policy.debug:
        f.fail("tdx.debug", "TD_ATTRIBUTES.DEBUG is set")
    if policy.sept_ve_disable and not body.td_attributes & layout.TD_ATTR_SEPT_VE_DISABLE:
        f.fail("tdx.sept_ve_disable_required", "TD_ATTRIBUTES.SEPT_VE_DISABLE is clear")
    if policy.measurements and body.mrtd not in policy.measurements:
        f.fail("tdx.measurement_mismatch", f"MRTD {body.mrtd.hex()} is not allowed")
    for index, allowed in enumerate(policy.rtmrs):
        if allowed and body.rtmrs[index] not in allowed:
            f.fail("tdx.rtmr_mismatch", f"RTMR{index} {body.rtmrs[index].hex()} is not allowed")
    for name, want, have in (
        ("mrconfigid", policy.mrconfigid, body.mrconfigid),
        ("mrowner", policy.mrowner, body.mrowner),
        ("report_data", policy.report_data, body.report_data),
    ):
        if want is not None and want != have:
            f.fail(f"tdx.{name}_mismatch", f"{name.upper()} differs from the expected value")
    _apply_tcb_policy(policy, collateral, result, f)


def _apply_tcb_policy(
    policy: Policy, collateral: Collateral | None, result: TcbResult | None, f: Findings
) -> None:
    if collateral is None:
        if policy.require_collateral:
            f.fail("tdx.collateral_missing", "the policy requires collateral")
        return
    if result is None:
        return  # the collateral failed verification; that failure is already recorded
    if result.status is None or result.qe_status is None:
        f.fail("tdx.tcb_level_not_found", "no TCB level of the collateral matches the platform or the QE")
    bad = sorted({s for s in result.statuses() if s is not None and s not in policy.tcb_statuses})
    if bad:
        f.fail("tdx.tcb_status_unacceptable", f"TCB status {bad} is not in {sorted(policy.tcb_statuses)}")


def _base_claims(q: TdxQuote) -> dict[str, Any]:
    body = q.body
    claims: dict[str, Any] = {
        "tee": "tdx",
        "version": q.version,
        "body_type": q.body_type,
        "mrtd": body.mrtd.hex(),
        "rtmr0": body.rtmrs[0].hex(),
        "rtmr1": body.rtmrs[1].hex(),
        "rtmr2": body.rtmrs[2].hex(),
        "rtmr3": body.rtmrs[3].hex(),
        "report_data": body.report_data.hex(),
        "mrconfigid": body.mrconfigid.hex(),
        "mrowner": body.mrowner.hex(),
        "mrownerconfig": body.mrownerconfig.hex(),
        "mrseam": body.mrseam.hex(),
        "mrsignerseam": body.mrsignerseam.hex(),
        "seam_attributes": body.seam_attributes.hex(),
        "tee_tcb_svn": body.tee_tcb_svn.hex(),
        "td_attributes": {
            "value": f"{body.td_attributes:#018x}",
            "debug": bool(body.td_attributes & layout.TD_ATTR_DEBUG),
            "sept_ve_disable": bool(body.td_attributes & layout.TD_ATTR_SEPT_VE_DISABLE),
            "pks": bool(body.td_attributes & layout.TD_ATTR_PKS),
            "perfmon": bool(body.td_attributes & layout.TD_ATTR_PERFMON),
        },
        "xfam": f"{body.xfam:#018x}",
        "qe": {"isv_svn": q.qe_report.isv_svn, "isv_prod_id": q.qe_report.isv_prod_id},
    }
    if body.mrservicetd is not None and body.tee_tcb_svn2 is not None:
        claims["mrservicetd"] = body.mrservicetd.hex()
        claims["tee_tcb_svn2"] = body.tee_tcb_svn2.hex()
    return claims

"""Verification of AMD SEV-SNP attestation reports (spec/attestation.md §1.10), pure and offline.

`verify_snp` takes the report bytes, the VCEK/VLEK (and optionally ASK/ARK) certificates, the pinned
trust store, an optional policy and the time, and returns a `Verdict`. Without a policy the verdict says
whether the report is authentic (format, chain, signature, report<->certificate binding); debug, TCB and
measurement are then only reported in the claims.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cwbuild.attest import snp_report as layout
from cwbuild.attest.amd_certs import AmdLeaf, KeyKind, find_leaf, load_all, parse_leaf, verify_leaf_chain
from cwbuild.attest.policy import Policy
from cwbuild.attest.snp_report import SnpReport
from cwbuild.attest.tcb import Product, TcbParts
from cwbuild.attest.trust import TrustStore, utc
from cwbuild.attest.verdict import Findings, Verdict, malformed
from cwbuild.errors import FormatError

__all__ = ["SnpReport", "verify_report_signature", "verify_snp"]

#: The product assumed for the TCB layout of simulated reports whose CPUID names none.
SIM_DEFAULT_PRODUCT = Product.MILAN


def verify_report_signature(report: SnpReport, key: ec.EllipticCurvePublicKey, f: Findings) -> None:
    """§1.1: ECDSA P-384/SHA-384 over bytes 0x0..0x29F; R and S 72-byte little-endian, upper 24 bytes zero."""
    for name, value in (("R", report.signature_r), ("S", report.signature_s)):
        if value[layout.P384_LEN :].count(0) != layout.SIG_COMPONENT_LEN - layout.P384_LEN:
            f.fail("snp.signature_malformed", f"signature {name} has non-zero upper bytes")
            return
    r = int.from_bytes(report.signature_r, "little")
    s = int.from_bytes(report.signature_s, "little")
    if not isinstance(key.curve, ec.SECP384R1):
        f.fail("snp.signature_invalid", "the signing key is not P-384")
        return
    try:
        key.verify(encode_dss_signature(r, s), report.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        f.fail("snp.signature_invalid", "the report signature does not verify")


def verify_snp(  # noqa: PLR0913 - keyword-only inputs of a pure verifier (STYLE.md rule 6)
    report: bytes,
    *,
    certs: Sequence[bytes] = (),
    trust: TrustStore | None = None,
    policy: Policy | None,
    now: datetime,
    sim_key: ec.EllipticCurvePublicKey | None = None,
    crls: Sequence[bytes] = (),
) -> Verdict:
    """Verify an SNP report; see the module docstring. `certs`: DER certificates or PEM bundles."""
    try:
        parsed = SnpReport.parse(report)
    except FormatError as exc:
        return malformed("snp.malformed", exc.message)
    f = Findings()
    f.claims.update(_base_claims(parsed))
    if parsed.signing_key == layout.SIGNING_KEY_NONE:
        f.fail("snp.signing_key_none", "SIGNING_KEY is 7: the report is unsigned")
        return f.verdict()
    if parsed.signing_key not in (layout.SIGNING_KEY_VCEK, layout.SIGNING_KEY_VLEK):
        f.fail("snp.signing_key_reserved", f"SIGNING_KEY {parsed.signing_key} is reserved")
        return f.verdict()
    if sim_key is not None:
        product: Product | None = parsed.cpuid_product or SIM_DEFAULT_PRODUCT
        f.claims["signer"] = "sim"
        verify_report_signature(parsed, sim_key, f)
    else:
        product = _authenticate(parsed, certs, trust or TrustStore.default(), utc(now), crls, f)
    if product is not None:
        f.claims["product"] = product.value
        f.claims["tcb"] = {k: v.to_dict() for k, v in parsed.tcbs(product).items()}
    if policy is not None:
        apply_policy(parsed, product or SIM_DEFAULT_PRODUCT, policy, f)
    return f.verdict()


def _authenticate(
    report: SnpReport,
    blobs: Sequence[bytes],
    trust: TrustStore,
    now: datetime,
    crls: Sequence[bytes],
    f: Findings,
) -> Product | None:
    """Chain, signature and the report<->certificate binding (§1.10 steps 2-7). Returns the product."""
    kind = KeyKind.VCEK if report.signing_key == layout.SIGNING_KEY_VCEK else KeyKind.VLEK
    f.claims["signer"] = kind.value
    try:
        supplied = load_all(blobs, trust)
        cert = find_leaf(supplied, kind)
        if cert is None:
            other = find_leaf(supplied, KeyKind.VLEK if kind is KeyKind.VCEK else KeyKind.VCEK)
            failure = "snp.cert_kind_mismatch" if other is not None else "snp.cert_missing"
            f.fail(failure, f"the report is signed by a {kind.value.upper()}; none was supplied")
            return report.cpuid_product
        leaf = trust.derived("amd-leaf", cert, lambda: parse_leaf(cert))
        key = leaf.public_key
    except FormatError as exc:
        f.fail("snp.cert_malformed", exc.message)
        return report.cpuid_product
    verify_leaf_chain(leaf, supplied, trust=trust, now=now, crls=crls, f=f)
    verify_report_signature(report, key, f)
    _bind(report, leaf, f)
    return leaf.product


def _bind(report: SnpReport, leaf: AmdLeaf, f: Findings) -> None:
    """§1.10 step 7: TCB and chip id of the report against the certificate; CPUID as a cross-check."""
    if leaf.product is None or leaf.tcb is None:
        return
    f.claims["cert"] = {"product_name": leaf.product_name, "tcb": leaf.tcb.to_dict(), "csp_id": leaf.csp_id}
    cpuid = report.cpuid_product
    if cpuid is not None and cpuid is not leaf.product:
        f.fail("snp.product_mismatch", f"CPUID says {cpuid.value}, the certificate {leaf.product.value}")
    # productName is "Milan-B0", "Genoa", "Turin" (§1.7): its product part must name the issuer's product.
    # Its stepping is only reported: KDS names a stepping per product line, not per part.
    named = leaf.product_name.partition("-")[0]
    if named and named != leaf.product.value:
        f.fail("snp.product_mismatch", f"productName {leaf.product_name!r} under issuer {leaf.product.value}")
    tcbs = report.tcbs(leaf.product)
    if tcbs["reported"] != leaf.tcb:
        detail = f"REPORTED_TCB {tcbs['reported'].to_dict()} != cert {leaf.tcb.to_dict()}"
        f.fail("snp.tcb_cert_mismatch", detail)
    above = tcbs["current"].below(tcbs["reported"])
    if above:
        f.fail("snp.tcb_reported_above_current", f"REPORTED_TCB exceeds CURRENT_TCB in {above}")
    if leaf.kind is KeyKind.VCEK and not report.mask_chip_key and leaf.hwid is not None:
        _check_chip_id(report, leaf, f)


def _check_chip_id(report: SnpReport, leaf: AmdLeaf, f: Findings) -> None:
    """CHIP_ID == hwID (64 bytes); on Turin the hwID is 8 bytes == CHIP_ID[0:8], the rest zero (§1.7, §6)."""
    hwid = leaf.hwid or b""
    expected = hwid + bytes(56) if leaf.product is Product.TURIN and len(hwid) == 8 else hwid
    if report.chip_id != expected:
        f.fail("snp.chip_id_mismatch", f"CHIP_ID {report.chip_id.hex()[:16]}... != hwID {hwid.hex()[:16]}...")


def apply_policy(report: SnpReport, product: Product, policy: Policy, f: Findings) -> None:
    """§1.3 and §1.10 step 8: guest policy bits, VMPL, TCB minimum, firmware, measurement, data."""
    flags = report.policy_flags()
    if policy.vmpl is not None and report.vmpl != policy.vmpl:
        f.fail("snp.vmpl_mismatch", f"VMPL {report.vmpl}, policy requires {policy.vmpl}")
    for name, allowed in (("debug", policy.debug), ("migrate_ma", policy.migrate_ma), ("smt", policy.smt)):
        if flags[name] and not allowed:
            f.fail(f"snp.policy_{name}", f"guest policy allows {name.upper()}; the policy forbids it")
    if policy.single_socket and not flags["single_socket"]:
        f.fail("snp.policy_single_socket", "guest policy lacks SINGLE_SOCKET")
    if report.abi < policy.abi_minimum:
        major, minor = policy.abi_minimum
        f.fail("snp.abi_below_minimum", f"ABI {flags['abi']} < {major}.{minor}")
    if report.guest_svn < policy.min_guest_svn:
        f.fail("snp.guest_svn_below_minimum", f"GUEST_SVN {report.guest_svn} < {policy.min_guest_svn}")
    tcbs = report.tcbs(product)
    minimum = policy.min_tcb_for(product)
    if minimum is not None:
        low = tcbs["reported"].below(minimum)
        if low:
            f.fail("snp.tcb_below_minimum", f"REPORTED_TCB below the {product.value} minimum in {low}")
    _check_firmware(report, tcbs, policy, f)
    _check_values(report, policy, f)


def _check_firmware(report: SnpReport, tcbs: dict[str, TcbParts], policy: Policy, f: Findings) -> None:
    """GSG validateTcb: COMMITTED == CURRENT (TCB and version), or <= when provisional firmware is allowed."""
    current_v = (report.current_major, report.current_minor, report.current_build)
    committed_v = (report.committed_major, report.committed_minor, report.committed_build)
    if tcbs["committed"] == tcbs["current"] and committed_v == current_v:
        return
    if not policy.permit_provisional_firmware:
        f.fail(
            "snp.provisional_firmware",
            f"COMMITTED {tcbs['committed'].to_dict()} v{committed_v} != CURRENT "
            f"{tcbs['current'].to_dict()} v{current_v}",
        )
    elif tcbs["current"].below(tcbs["committed"]) or committed_v > current_v:
        f.fail("snp.provisional_firmware", "COMMITTED firmware is above CURRENT")


def _check_values(report: SnpReport, policy: Policy, f: Findings) -> None:
    if policy.measurements and report.measurement not in policy.measurements:
        f.fail("snp.measurement_mismatch", f"MEASUREMENT {report.measurement.hex()} is not allowed")
    if policy.report_data is not None and report.report_data != policy.report_data:
        f.fail("snp.report_data_mismatch", "REPORT_DATA differs from the expected value")
    if policy.host_data is not None and report.host_data != policy.host_data:
        f.fail("snp.host_data_mismatch", "HOST_DATA differs from the expected value")


def _base_claims(r: SnpReport) -> dict[str, Any]:
    return {
        "tee": "snp",
        "version": r.version,
        "measurement": r.measurement.hex(),
        "report_data": r.report_data.hex(),
        "host_data": r.host_data.hex(),
        "policy": {"value": f"{r.policy:#x}", **r.policy_flags()},
        "vmpl": r.vmpl,
        "guest_svn": r.guest_svn,
        "platform_info": f"{r.platform_info:#x}",
        "signing_key": r.signing_key,
        "mask_chip_key": r.mask_chip_key,
        "author_key_en": r.author_key_en,
        "chip_id": r.chip_id.hex(),
        "family_id": r.family_id.hex(),
        "image_id": r.image_id.hex(),
        "id_key_digest": r.id_key_digest.hex(),
        "author_key_digest": r.author_key_digest.hex(),
        "report_id": r.report_id.hex(),
        "report_id_ma": r.report_id_ma.hex(),
        "cpuid": None if r.version < 3 else [r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step],
        "firmware": {
            "current": f"{r.current_major}.{r.current_minor}.{r.current_build}",
            "committed": f"{r.committed_major}.{r.committed_minor}.{r.committed_build}",
        },
        "mit_vector": {"launch": r.launch_mit_vector, "current": r.current_mit_vector},
    }

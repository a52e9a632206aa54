"""TDX chain, collateral and TCB failures on synthetic Intel-shaped hierarchies (see attest_synth.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cwbuild.attest.policy import Policy
from cwbuild.attest.tdx import Collateral, TdxQuote, verify_tdx
from cwbuild.attest.verdict import Verdict
from tests.unit.attest_synth import NOW, IntelPki, intel_cert, intel_name, p256, pem


@pytest.fixture(scope="module")
def pki() -> IntelPki:
    return IntelPki()


def check(
    pki: IntelPki, quote: bytes, collateral: bytes | None = None, policy: Policy | None = None, **kw: object
) -> Verdict:
    bundle = None if collateral is None else Collateral.from_json(collateral)
    return verify_tdx(quote, trust=pki.trust(), collateral=bundle, policy=policy, now=kw.get("now", NOW))  # type: ignore[arg-type]


def ids(v: Verdict) -> set[str]:
    return set(v.failure_ids())


@pytest.mark.parametrize(("version", "body_type"), [(4, 2), (5, 2), (5, 3)])
def test_versions_verify(pki: IntelPki, version: int, body_type: int) -> None:
    quote = pki.quote(version=version, body_type=body_type)
    v = check(pki, quote, pki.collateral(), Policy(sept_ve_disable=True))
    assert v.ok, v.failures
    assert v.claims["tcb"]["tcb_status"] == "UpToDate"
    assert v.claims["mrtd"] == "11" * 48
    assert ("mrservicetd" in v.claims) == (body_type == 3)
    assert TdxQuote.parse(quote).trailing == 70


def test_real_root_refuses_synthetic(pki: IntelPki) -> None:
    v = verify_tdx(pki.quote(), policy=None, now=NOW)
    assert ids(v) == {"tdx.root_untrusted"}


def test_revoked_pck_and_intermediate(pki: IntelPki) -> None:
    quote = pki.quote()
    assert ids(check(pki, quote, pki.collateral(revoked_pck=(pki.pck.serial_number,)))) == {
        "tdx.cert_revoked"
    }
    assert ids(check(pki, quote, pki.collateral(revoked_inter=(pki.inter.serial_number,)))) == {
        "tdx.cert_revoked"
    }
    assert check(pki, quote, pki.collateral(revoked_pck=(1234,))).ok


def test_stale_collateral(pki: IntelPki) -> None:
    v = check(pki, pki.quote(), pki.collateral(next_update=NOW - timedelta(hours=1)))
    assert ids(v) == {"tdx.collateral_expired"}


def test_expired_pck(pki: IntelPki) -> None:
    expired = pki.make_pck(not_after=NOW - timedelta(days=1))
    quote = pki.quote(chain=pem(expired, pki.inter, pki.root) + b"\x00")
    assert ids(check(pki, quote)) == {"tdx.cert_expired"}


def test_wrong_issuer(pki: IntelPki) -> None:
    """A PCK with the right issuer name, signed by another key."""
    forged = pki.make_pck(signer=p256())
    quote = pki.quote(chain=pem(forged, pki.inter, pki.root) + b"\x00")
    assert ids(check(pki, quote)) == {"tdx.pck_chain_invalid"}


def test_other_root(pki: IntelPki) -> None:
    other = IntelPki()
    assert ids(check(pki, other.quote())) == {"tdx.root_untrusted"}


def test_chain_shape(pki: IntelPki) -> None:
    quote = pki.quote(chain=pem(pki.pck, pki.root) + b"\x00")
    assert ids(check(pki, quote)) == {"tdx.pck_chain_invalid"}
    quote = pki.quote(chain=pem(pki.pck, pki.inter, pki.root) + b"\n\x00")
    assert ids(check(pki, quote)) == {"tdx.cert_malformed"}


def test_tcb_status_policy(pki: IntelPki) -> None:
    low = pki.quote(tee_tcb_svn=bytes([3, 1] + [4] * 14))
    collateral = pki.collateral(platform_levels=((5, 11, 5, "UpToDate"), (5, 11, 4, "OutOfDate")))
    v = check(pki, low, collateral, Policy())
    assert ids(v) == {"tdx.tcb_status_unacceptable"}
    assert v.claims["tcb"]["advisory_ids"] == ["INTEL-SA-00000"]
    assert check(pki, low, collateral, Policy(tcb_statuses=frozenset({"UpToDate", "OutOfDate"}))).ok
    assert check(pki, low, collateral, None).ok  # without a policy the status is only reported
    none = pki.collateral(platform_levels=((6, 11, 5, "UpToDate"),))
    assert ids(check(pki, pki.quote(), none, Policy())) == {"tdx.tcb_level_not_found"}
    pce = pki.collateral(platform_levels=((5, 12, 5, "UpToDate"),))
    assert ids(check(pki, pki.quote(), pce, Policy())) == {"tdx.tcb_level_not_found"}


def test_module_identity(pki: IntelPki) -> None:
    old_module = pki.quote(tee_tcb_svn=bytes([2, 1] + [5] * 14))
    v = check(pki, old_module, pki.collateral(), Policy())
    assert v.claims["tcb"]["module_tcb_status"] == "OutOfDate"
    assert ids(v) == {"tdx.tcb_status_unacceptable"}
    unknown = pki.quote(tee_tcb_svn=bytes([3, 2] + [5] * 14))
    assert ids(check(pki, unknown, pki.collateral())) == {"tdx.collateral_mismatch"}


def test_qe_identity_mismatch(pki: IntelPki) -> None:
    v = check(pki, pki.quote(), pki.collateral(qe_mrsigner=b"\x01" * 32))
    assert ids(v) == {"tdx.qe_identity_mismatch"}
    old_qe = pki.quote(qe_isv_svn=3)
    assert ids(check(pki, old_qe, pki.collateral(), Policy())) == {"tdx.tcb_level_not_found"}


def test_fmspc_mismatch(pki: IntelPki) -> None:
    v = check(pki, pki.quote(), pki.collateral(fmspc=bytes.fromhex("00906ed50001")))
    assert ids(v) == {"tdx.collateral_mismatch"}


def test_collateral_signer(pki: IntelPki) -> None:
    """Collateral signed by a certificate that is not "Intel SGX TCB Signing", or by an unpinned root's."""
    v = check(pki, pki.quote(), pki.collateral(signer=(pki.inter_key, pki.inter)))
    assert ids(v) == {"tdx.collateral_signature_invalid"}
    rogue_key = p256()
    rogue = intel_cert(
        "Intel SGX TCB Signing", rogue_key.public_key(), intel_name("Intel SGX Root CA"), rogue_key
    )
    v = check(pki, pki.quote(), pki.collateral(signer=(rogue_key, rogue)))
    assert ids(v) == {"tdx.collateral_signature_invalid"}


def test_qe_binding(pki: IntelPki) -> None:
    quote = pki.quote(auth=b"\xaa" * 32, bound_auth=b"\xab" * 32)
    assert ids(check(pki, quote)) == {"tdx.qe_binding_mismatch"}


def test_debug_policy(pki: IntelPki) -> None:
    quote = pki.quote(td_attributes=1)
    assert ids(check(pki, quote, None, Policy())) == {"tdx.debug"}
    assert ids(check(pki, quote, None, Policy(debug=True, sept_ve_disable=True))) == {
        "tdx.sept_ve_disable_required"
    }


def test_crl_of_another_ca(pki: IntelPki) -> None:
    """A PCK CRL issued by a CA other than the PCK's issuer is a collateral mismatch, not a pass."""
    import json

    bundle = json.loads(pki.collateral())
    bundle["pck_crl"] = bundle["root_ca_crl"]
    v = check(pki, pki.quote(), json.dumps(bundle).encode())
    assert ids(v) == {"tdx.collateral_mismatch"}
    bundle["pck_crl"] = "3000"
    assert ids(check(pki, pki.quote(), json.dumps(bundle).encode())) == {"tdx.collateral_malformed"}

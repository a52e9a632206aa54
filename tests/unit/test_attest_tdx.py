"""TDX quote verification against real quotes and Intel collateral (tests/golden/README.md, "Evidence")."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from cwbuild.attest.policy import Policy
from cwbuild.attest.tdx import Collateral, TdxQuote, verify_tdx
from cwbuild.errors import FormatError
from tests.conftest import FIXTURES

TDX = FIXTURES / "evidence" / "tdx"
#: Inside the gotdx collateral windows (TCB info 2023-06-18..07-18, QE identity 2023-06-08..07-08), §4.2.
T_GOTDX = datetime(2023, 7, 1, tzinfo=UTC)
#: Inside the Phala collateral window (2025-06-19..07-19) (spec §4.2).
T_PHALA = datetime(2025, 7, 1, tzinfo=UTC)


def read(name: str) -> bytes:
    return (TDX / name).read_bytes()


def gotdx_collateral() -> Collateral:
    return Collateral.from_pcs(
        tcb_info_response=read("gotdx_tcbinfo_fmspc50806f000000.json"),
        qe_identity_response=read("gotdx_qe_identity.json"),
        issuer_chain=read("gotdx_tcb_signing_issuer_chain.DERIVED.pem"),
        pck_crl=read("gotdx_pckcrl_platform.der"),
        root_ca_crl=read("gotdx_intel_root_ca_crl.der"),
    )


@pytest.mark.parametrize(
    ("quote", "now"),
    [
        ("gotdx_v4_quote_spr_e4.dat", T_GOTDX),
        ("trustee_v4_quote_debugtd.dat", T_GOTDX),
        ("phala_v4_quote.bin", T_PHALA),
    ],
)
def test_real_quotes_are_authentic(quote: str, now: datetime) -> None:
    v = verify_tdx(read(quote), policy=None, now=now)
    assert v.ok, v.failures
    assert len(v.claims["mrtd"]) == 96


def test_phala_up_to_date() -> None:
    """spec §4.2: PHALA `could_parse_tdx_quote` expects UpToDate."""
    collateral = Collateral.from_json(read("phala_v4_quote_collateral.json"))
    v = verify_tdx(read("phala_v4_quote.bin"), collateral=collateral, policy=Policy(), now=T_PHALA)
    assert v.ok, v.failures
    assert v.claims["tcb"]["tcb_status"] == "UpToDate"
    assert v.claims["pck"]["fmspc"] == "b0c06f000000"


def test_phala_collateral_expired() -> None:
    collateral = Collateral.from_json(read("phala_v4_quote_collateral.json"))
    v = verify_tdx(
        read("phala_v4_quote.bin"), collateral=collateral, policy=None, now=datetime(2025, 8, 1, tzinfo=UTC)
    )
    assert set(v.failure_ids()) == {"tdx.collateral_expired"}


def test_gotdx_no_matching_level() -> None:
    """spec §4.2: SPR_E4 against its tcbInfo has no matching TCB level; QE identity UpToDate."""
    v = verify_tdx(read("gotdx_v4_quote_spr_e4.dat"), collateral=gotdx_collateral(), policy=None, now=T_GOTDX)
    assert v.ok, v.failures  # authentic; the TCB is only reported without a policy
    assert v.claims["tcb"]["tcb_status"] is None
    assert v.claims["tcb"]["qe_tcb_status"] == "UpToDate"
    v = verify_tdx(
        read("gotdx_v4_quote_spr_e4.dat"), collateral=gotdx_collateral(), policy=Policy(), now=T_GOTDX
    )
    assert v.failure_ids() == ("tdx.tcb_level_not_found",)


def test_debug_td() -> None:
    """spec §4.2: trustee quote 4 has TD_ATTRIBUTES DEBUG set; against the 50806f tcbInfo it is UpToDate."""
    quote = read("trustee_v4_quote_debugtd.dat")
    v = verify_tdx(quote, collateral=gotdx_collateral(), policy=Policy(), now=T_GOTDX)
    assert v.failure_ids() == ("tdx.debug",)
    assert v.claims["td_attributes"]["debug"] is True
    assert v.claims["tcb"]["tcb_status"] == "UpToDate"
    assert verify_tdx(quote, collateral=gotdx_collateral(), policy=Policy(debug=True), now=T_GOTDX).ok


def test_wrong_fmspc_collateral() -> None:
    collateral = Collateral.from_json(read("phala_v4_quote_collateral.json"))
    v = verify_tdx(read("gotdx_v4_quote_spr_e4.dat"), collateral=collateral, policy=None, now=T_PHALA)
    assert "tdx.collateral_mismatch" in v.failure_ids()


def test_policy_values() -> None:
    quote = read("phala_v4_quote.bin")
    body = TdxQuote.parse(quote).body
    good = Policy(
        measurements=(body.mrtd,),
        rtmrs=((body.rtmrs[0],), (), (body.rtmrs[2],), ()),
        report_data=body.report_data,
        mrconfigid=body.mrconfigid,
        sept_ve_disable=True,
    )
    assert verify_tdx(quote, policy=good, now=T_PHALA).ok
    bad = Policy(
        measurements=(bytes(48),),
        rtmrs=((), (bytes(48),), (), ()),
        report_data=b"\1" * 64,
        mrowner=b"\1" * 48,
        require_collateral=True,
    )
    ids = set(verify_tdx(quote, policy=bad, now=T_PHALA).failure_ids())
    assert ids == {
        "tdx.measurement_mismatch",
        "tdx.rtmr_mismatch",
        "tdx.report_data_mismatch",
        "tdx.mrowner_mismatch",
        "tdx.collateral_missing",
    }


def test_sept_ve_disable_required() -> None:
    v = verify_tdx(read("gotdx_v4_quote_spr_e4.dat"), policy=Policy(sept_ve_disable=True), now=T_GOTDX)
    assert v.failure_ids() == ("tdx.sept_ve_disable_required",)


def test_expired_pck() -> None:
    v = verify_tdx(read("gotdx_v4_quote_spr_e4.dat"), policy=None, now=datetime(2030, 1, 1, tzinfo=UTC))
    assert "tdx.cert_expired" in v.failure_ids()


def test_trailing_bytes_ignored_and_truncation_refused() -> None:
    quote = read("gotdx_v4_quote_spr_e4.dat")
    assert TdxQuote.parse(quote).trailing == 39
    assert verify_tdx(quote + bytes(100), policy=None, now=T_GOTDX).ok
    with pytest.raises(FormatError):
        TdxQuote.parse(quote[: len(quote) - 40])


@pytest.mark.parametrize(("offset", "value"), [(0, 1), (2, 1), (4, 1), (12, 1), (632, 0xFF), (636 + 128, 1)])
def test_header_errors(offset: int, value: int) -> None:
    raw = bytearray(read("phala_v4_quote.bin"))
    raw[offset] ^= value
    assert verify_tdx(bytes(raw), policy=None, now=T_PHALA).failure_ids() == ("tdx.malformed",)


def test_collateral_bundle_errors() -> None:
    good = json.loads(read("phala_v4_quote_collateral.json"))
    for key, value in (("tcb_info", 5), ("tcb_info_signature", "zz"), ("qe_identity_signature", "00")):
        with pytest.raises(FormatError):
            Collateral.from_json(json.dumps({**good, key: value}).encode())
    with pytest.raises(FormatError):
        Collateral.from_json(b"[]")
    tampered = Collateral.from_json(
        json.dumps({**good, "tcb_info": good["tcb_info"].replace("UpToDate", "UpT0Date", 1)}).encode()
    )
    v = verify_tdx(read("phala_v4_quote.bin"), collateral=tampered, policy=None, now=T_PHALA)
    assert v.failure_ids() == ("tdx.collateral_signature_invalid",)


@pytest.mark.parametrize(
    ("quote", "now"),
    [
        ("gotdx_v4_quote_spr_e4.dat", T_GOTDX),
        ("trustee_v4_quote_debugtd.dat", T_GOTDX),
        ("phala_v4_quote.bin", T_PHALA),
    ],
)
def test_pck_chain_agrees_with_cryptography_verifier(quote: str, now: datetime) -> None:
    """Oracle: cryptography's own X.509 path validation (spec §3.6 step 3 [OBS]) accepts these PCK chains."""
    from cryptography import x509
    from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store

    from cwbuild.attest.intel_certs import split_pem_chain
    from cwbuild.attest.trust import TrustStore

    pck, intermediate, root = split_pem_chain(TdxQuote.parse(read(quote)).pck_chain_pem)
    assert root == TrustStore.default().intel_root
    ca_policy = ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, Criticality.AGNOSTIC, None
    )
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(now)
        .extension_policies(ca_policy=ca_policy, ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    verifier.verify(pck, [intermediate])

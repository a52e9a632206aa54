"""SEV-SNP report verification against real hardware reports (tests/golden/README.md, "Evidence")."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography.exceptions import InvalidSignature

from cwbuild.attest import snp_report as layout
from cwbuild.attest.policy import Policy
from cwbuild.attest.sim import generate_sim_key, sim_report
from cwbuild.attest.snp import SnpReport, verify_snp
from cwbuild.attest.tcb import Product, TcbParts
from cwbuild.errors import FormatError
from tests.conftest import FIXTURES

SNP = FIXTURES / "evidence" / "snp"
#: Inside every fixture VCEK's window (spec §4.1): Milan VCEKs 2022..2029, VLEK 2024-12-10..2025-12-10.
T_2025 = datetime(2025, 6, 1, tzinfo=UTC)
#: The MS Genoa VCEK is valid from 2026-02-05 (spec §4.1).
T_2026 = datetime(2026, 6, 1, tzinfo=UTC)

#: (report, certificate, time, failure ids under the default Policy()) — expected verdicts from spec §4.1.
CASES = [
    ("gosev_milan_v2_report.bin", "gosev_milan_vcek.der", T_2025, {"snp.policy_debug"}),
    ("trustee_milan_v2_report.bin", "trustee_milan_vcek.der", T_2025, {"snp.provisional_firmware"}),
    (
        "trustee_milan_vlek_v3_report.bin",
        "trustee_milan_vlek.der",
        T_2025,
        {"snp.vmpl_mismatch", "snp.provisional_firmware"},
    ),
    ("ms_genoa_v3_report.bin", "ms_genoa_vcek.pem", T_2026, set()),
]


def read(name: str) -> bytes:
    return (SNP / name).read_bytes()


@pytest.mark.parametrize(("report", "cert", "now", "policy_failures"), CASES)
def test_real_reports_are_authentic(report: str, cert: str, now: datetime, policy_failures: set[str]) -> None:
    verdict = verify_snp(read(report), certs=[read(cert)], policy=None, now=now)
    assert verdict.ok, verdict.failures
    assert verdict.claims["signer"] in ("vcek", "vlek")
    with_policy = verify_snp(read(report), certs=[read(cert)], policy=Policy(), now=now)
    assert set(with_policy.failure_ids()) == policy_failures


def test_known_claims() -> None:
    """Values from spec §4.1 (go-sev-guest verify_test.go: TCB bl2/tee0/snp5/ucode68, data 0102...)."""
    v = verify_snp(
        read("gosev_milan_v2_report.bin"), certs=[read("gosev_milan_vcek.der")], policy=None, now=T_2025
    )
    assert v.claims["product"] == "Milan"
    assert v.claims["tcb"]["reported"] == {"bl": 2, "tee": 0, "snp": 5, "ucode": 68}
    assert v.claims["report_data"].startswith("0102030405")
    assert v.claims["policy"]["debug"] is True


def test_vlek_expired_now() -> None:
    v = verify_snp(
        read("trustee_milan_vlek_v3_report.bin"),
        certs=[read("trustee_milan_vlek.der")],
        policy=None,
        now=datetime(2026, 11, 28, tzinfo=UTC),
    )
    assert v.failure_ids() == ("snp.cert_expired",)


def test_genoa_before_vcek_validity() -> None:
    v = verify_snp(read("ms_genoa_v3_report.bin"), certs=[read("ms_genoa_vcek.pem")], policy=None, now=T_2025)
    assert v.failure_ids() == ("snp.cert_expired",)


@pytest.mark.parametrize(
    "cert", ["trustee_vcek_tampered_hwid_raw.der", "trustee_vcek_tampered_hwid_octetstring.der"]
)
def test_tampered_vcek_fails_chain(cert: str) -> None:
    """spec §4.1: real VCEKs with hwID replaced parse but their signature fails."""
    v = verify_snp(read("trustee_milan_v2_report.bin"), certs=[read(cert)], policy=None, now=T_2025)
    assert "snp.chain_invalid" in v.failure_ids()
    assert "snp.chip_id_mismatch" in v.failure_ids()


def test_wrong_vcek() -> None:
    v = verify_snp(
        read("trustee_milan_v2_report.bin"), certs=[read("gosev_milan_vcek.der")], policy=None, now=T_2025
    )
    assert {"snp.signature_invalid", "snp.tcb_cert_mismatch", "snp.chip_id_mismatch"} <= set(v.failure_ids())


def test_missing_and_mismatched_kind() -> None:
    report = read("trustee_milan_vlek_v3_report.bin")
    assert verify_snp(report, policy=None, now=T_2025).failure_ids() == ("snp.cert_missing",)
    v = verify_snp(report, certs=[read("trustee_milan_vcek.der")], policy=None, now=T_2025)
    assert v.failure_ids() == ("snp.cert_kind_mismatch",)


def test_policy_values() -> None:
    report, cert = read("ms_genoa_v3_report.bin"), read("ms_genoa_vcek.pem")
    parsed = SnpReport.parse(report)
    good = Policy(
        measurements=(parsed.measurement,), report_data=parsed.report_data, host_data=parsed.host_data
    )
    assert verify_snp(report, certs=[cert], policy=good, now=T_2026).ok
    bad = Policy(measurements=(bytes(48),), report_data=b"\1" * 64, host_data=b"\1" * 32)
    ids = set(verify_snp(report, certs=[cert], policy=bad, now=T_2026).failure_ids())
    assert ids == {"snp.measurement_mismatch", "snp.report_data_mismatch", "snp.host_data_mismatch"}


def test_policy_tcb_minimum_per_product() -> None:
    report, cert = read("ms_genoa_v3_report.bin"), read("ms_genoa_vcek.pem")
    above = Policy(min_tcb=(("Genoa", TcbParts(bl=10, tee=0, snp=23, ucode=85)),))
    v = verify_snp(report, certs=[cert], policy=above, now=T_2026)
    assert v.failure_ids() == ("snp.tcb_below_minimum",)
    other_product = Policy(min_tcb=(("Milan", TcbParts(bl=99, tee=0, snp=0, ucode=0)),))
    assert verify_snp(report, certs=[cert], policy=other_product, now=T_2026).ok
    equal = Policy(min_tcb=(("*", TcbParts(bl=10, tee=0, snp=23, ucode=84)),))
    assert verify_snp(report, certs=[cert], policy=equal, now=T_2026).ok


def test_provisional_firmware_permitted() -> None:
    report, cert = read("trustee_milan_v2_report.bin"), read("trustee_milan_vcek.der")
    assert verify_snp(report, certs=[cert], policy=Policy(permit_provisional_firmware=True), now=T_2025).ok


def test_sim_round_trip_and_policy() -> None:
    key = generate_sim_key()
    report = sim_report(measurement=b"\x11" * 48, report_data=b"\x22" * 64, key=key)
    assert len(report) == layout.REPORT_LEN
    policy = Policy(measurements=(b"\x11" * 48,), report_data=b"\x22" * 64)
    v = verify_snp(report, policy=policy, now=T_2025, sim_key=key.public_key())
    assert v.ok, v.failures
    assert v.claims["signer"] == "sim"
    other = generate_sim_key().public_key()
    assert verify_snp(report, policy=policy, now=T_2025, sim_key=other).failure_ids() == (
        "snp.signature_invalid",
    )
    debug = sim_report(measurement=b"\x11" * 48, report_data=b"\x22" * 64, key=key, policy=0xB0000, vmpl=2)
    v = verify_snp(debug, policy=policy, now=T_2025, sim_key=key.public_key())
    assert set(v.failure_ids()) == {"snp.policy_debug", "snp.vmpl_mismatch"}
    # without the sim key, a sim report is just an unverifiable VCEK-signed report
    assert verify_snp(report, policy=None, now=T_2025).failure_ids() == ("snp.cert_missing",)


def test_signing_key_none_and_reserved() -> None:
    raw = bytearray(read("gosev_milan_v2_report.bin"))
    raw[0x48] = layout.SIGNING_KEY_NONE << 2
    assert verify_snp(bytes(raw), policy=None, now=T_2025).failure_ids() == ("snp.signing_key_none",)
    raw[0x48] = 3 << 2
    assert verify_snp(bytes(raw), policy=None, now=T_2025).failure_ids() == ("snp.signing_key_reserved",)


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (0x0, 1),
        (0x34, 2),
        (0x4C, 1),
        (0x18B, 1),
        (0x208, 1),
        (0x330, 1),
        (0x4A0 - 1, 1),
        (0xB, 0x04),
        (0xA, 0x02),
        (0x4B, 1),
    ],
)
def test_format_errors(offset: int, value: int) -> None:
    raw = bytearray(read("ms_genoa_v3_report.bin"))
    raw[offset] ^= value
    with pytest.raises(FormatError):
        SnpReport.parse(bytes(raw))
    assert verify_snp(bytes(raw), policy=None, now=T_2026).failure_ids() == ("snp.malformed",)


def test_length_checked() -> None:
    with pytest.raises(FormatError, match="1184"):
        SnpReport.parse(bytes(100))


def test_tcb_layouts() -> None:
    """spec §1.5 [OBS]: Turin CURRENT_TCB 01 01 01 04 00 00 00 51 = fmc1 bl1 tee1 snp4 ucode 0x51."""
    raw = bytes.fromhex("0101010400000051")
    assert TcbParts.decode(raw, Product.TURIN) == TcbParts(fmc=1, bl=1, tee=1, snp=4, ucode=0x51)
    assert TcbParts.decode(raw, Product.TURIN).encode(Product.TURIN) == raw
    legacy = bytes.fromhex("0300000000000873")
    assert TcbParts.decode(legacy, Product.MILAN) == TcbParts(bl=3, tee=0, snp=8, ucode=115)


def test_cpuid_products() -> None:
    """spec §1.6: 19h 00-0F Milan; 10-1F and A0-AF Genoa; 1Ah 00-11 Turin."""
    assert Product.from_cpuid(0x19, 0x01) is Product.MILAN
    assert Product.from_cpuid(0x19, 0x11) is Product.GENOA
    assert Product.from_cpuid(0x19, 0xA0) is Product.GENOA
    assert Product.from_cpuid(0x1A, 0x02) is Product.TURIN
    assert Product.from_cpuid(0x19, 0x30) is None


@pytest.mark.parametrize(("report", "cert", "now", "policy_failures"), CASES)
def test_chain_agrees_with_cryptography(
    report: str, cert: str, now: datetime, policy_failures: set[str]
) -> None:
    """Oracle: cryptography's `verify_directly_issued_by` (it handles these PSS parameters, spec §1.7 [OBS])
    accepts each link of the chain cwbuild accepts, and rejects the tampered VCEK cwbuild rejects."""
    from cwbuild.attest.amd_certs import parse_leaf
    from cwbuild.attest.trust import TrustStore, load_certs

    leaf = parse_leaf(load_certs(read(cert))[0])
    assert leaf.product is not None
    roots = TrustStore.default().amd[leaf.product]
    issuer = roots.ask if leaf.kind.value == "vcek" else roots.asvk
    leaf.cert.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(roots.ark)
    roots.ark.verify_directly_issued_by(roots.ark)
    tampered = load_certs(read("trustee_vcek_tampered_hwid_raw.der"))[0]
    with pytest.raises(InvalidSignature):
        tampered.verify_directly_issued_by(TrustStore.default().amd[Product.MILAN].ask)

"""SEV-SNP chain and binding failures on synthetic AMD-shaped hierarchies (see attest_synth.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from cwbuild.attest import snp_report as layout
from cwbuild.attest.policy import Policy
from cwbuild.attest.snp import verify_snp
from cwbuild.attest.tcb import Product, TcbParts
from cwbuild.attest.trust import AmdRoots, TrustStore
from tests.unit.attest_synth import NOW, YEAR, AmdPki, amd_cert, amd_name, snp_report, vcek_extensions

TCB = TcbParts(bl=3, tee=0, snp=8, ucode=115)
HWID = b"\x5a" * 64


@pytest.fixture(scope="module")
def pki() -> AmdPki:
    return AmdPki.make(Product.MILAN)


def der(cert: object) -> bytes:
    return cert.public_bytes(Encoding.DER)  # type: ignore[attr-defined]


def ids(verdict: object) -> set[str]:
    return set(verdict.failure_ids())  # type: ignore[attr-defined]


def test_synthetic_chain_verifies(pki: AmdPki) -> None:
    report = snp_report(pki.leaf_key, Product.MILAN, TCB)
    v = verify_snp(report, certs=[der(pki.vcek(TCB, HWID))], trust=pki.trust(), policy=Policy(), now=NOW)
    assert v.ok, v.failures


def test_real_roots_refuse_synthetic_chain(pki: AmdPki) -> None:
    report = snp_report(pki.leaf_key, Product.MILAN, TCB)
    v = verify_snp(report, certs=[der(pki.vcek(TCB, HWID))], policy=None, now=NOW)
    assert "snp.chain_invalid" in ids(v)


def test_revoked_ask(pki: AmdPki) -> None:
    report = snp_report(pki.leaf_key, Product.MILAN, TCB)
    certs = [der(pki.vcek(TCB, HWID))]
    crl = pki.crl((pki.ask.serial_number,))
    assert ids(verify_snp(report, certs=certs, trust=pki.trust(), crls=[crl], policy=None, now=NOW)) == {
        "snp.cert_revoked"
    }
    other = pki.crl((999,))
    assert verify_snp(report, certs=certs, trust=pki.trust(), crls=[other], policy=None, now=NOW).ok
    forged = pki.crl((pki.ask.serial_number,), signer=pki.ask_key)
    v = verify_snp(report, certs=certs, trust=pki.trust(), crls=[forged], policy=None, now=NOW)
    assert ids(v) == {"snp.chain_invalid"}


def test_expired_vcek_and_not_yet_valid(pki: AmdPki) -> None:
    report = snp_report(pki.leaf_key, Product.MILAN, TCB)
    old = pki.vcek(TCB, HWID, not_before=NOW - 2 * YEAR, not_after=NOW - timedelta(seconds=1))
    assert ids(verify_snp(report, certs=[der(old)], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.cert_expired"
    }
    early = pki.vcek(TCB, HWID, not_before=NOW + timedelta(days=1))
    assert ids(verify_snp(report, certs=[der(early)], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.cert_expired"
    }


def test_wrong_issuer(pki: AmdPki) -> None:
    """A VCEK with the right names, signed by an ASK key that is not the pinned one."""
    rogue = AmdPki.make(Product.MILAN, tag="rogue-")
    report = snp_report(rogue.leaf_key, Product.MILAN, TCB)
    vcek = rogue.vcek(TCB, HWID)
    assert ids(verify_snp(report, certs=[der(vcek)], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.chain_invalid"
    }
    # ... and supplying the rogue ASK/ARK alongside does not help
    bundle = [der(vcek), der(rogue.ask), der(rogue.ark)]
    assert "snp.root_untrusted" in ids(
        verify_snp(report, certs=bundle, trust=pki.trust(), policy=None, now=NOW)
    )
    # the genuine ASK/ARK supplied alongside is fine
    genuine = [der(pki.vcek(TCB, HWID)), der(pki.ask), der(pki.ark)]
    report = snp_report(pki.leaf_key, Product.MILAN, TCB)
    assert verify_snp(report, certs=genuine, trust=pki.trust(), policy=None, now=NOW).ok


def test_wrong_product(pki: AmdPki) -> None:
    genoa = AmdPki.make(Product.GENOA)
    store = TrustStore(
        amd={
            Product.MILAN: AmdRoots(Product.MILAN, pki.ark, pki.ask, pki.asvk),
            Product.GENOA: AmdRoots(Product.GENOA, genoa.ark, genoa.ask, genoa.asvk),
        },
        intel_root=None,
    )
    # A Milan chain, but the report's CPUID says Genoa.
    report = snp_report(pki.leaf_key, Product.GENOA, TCB)
    v = verify_snp(report, certs=[der(pki.vcek(TCB, HWID))], trust=store, policy=None, now=NOW)
    assert ids(v) == {"snp.product_mismatch"}
    # A VCEK naming SEV-Genoa as issuer but signed by the Milan ASK.
    exts = vcek_extensions(Product.GENOA, TCB, hwid=HWID)
    liar = amd_cert(
        amd_name("SEV-VCEK"), amd_name("SEV-Genoa"), pki.leaf_key.public_key(), pki.ask_key, extensions=exts
    )
    report = snp_report(pki.leaf_key, Product.GENOA, TCB)
    assert ids(verify_snp(report, certs=[der(liar)], trust=store, policy=None, now=NOW)) == {
        "snp.chain_invalid"
    }
    # A product the store does not pin.
    rome = amd_cert(
        amd_name("SEV-VCEK"), amd_name("SEV-Rome"), pki.leaf_key.public_key(), pki.ask_key, extensions=exts
    )
    assert "snp.product_unknown" in ids(
        verify_snp(report, certs=[der(rome)], trust=store, policy=None, now=NOW)
    )


def test_tcb_mismatch(pki: AmdPki) -> None:
    report = snp_report(pki.leaf_key, Product.MILAN, TCB)
    other = TcbParts(bl=3, tee=0, snp=8, ucode=116)
    v = verify_snp(report, certs=[der(pki.vcek(other, HWID))], trust=pki.trust(), policy=None, now=NOW)
    assert ids(v) == {"snp.tcb_cert_mismatch"}
    lower_current = TcbParts(bl=3, tee=0, snp=7, ucode=115)
    report = snp_report(pki.leaf_key, Product.MILAN, TCB, current_tcb=lower_current)
    v = verify_snp(report, certs=[der(pki.vcek(TCB, HWID))], trust=pki.trust(), policy=None, now=NOW)
    assert ids(v) == {"snp.tcb_reported_above_current"}


def test_chip_id(pki: AmdPki) -> None:
    vcek = der(pki.vcek(TCB, HWID))
    report = snp_report(pki.leaf_key, Product.MILAN, TCB, chip_id=b"\x5b" * 64)
    assert ids(verify_snp(report, certs=[vcek], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.chip_id_mismatch"
    }
    masked = snp_report(pki.leaf_key, Product.MILAN, TCB, mask_chip_key=True)
    assert verify_snp(masked, certs=[vcek], trust=pki.trust(), policy=None, now=NOW).ok


def test_vlek_and_vmpl(pki: AmdPki) -> None:
    vlek = der(pki.vlek(TCB))
    report = snp_report(
        pki.leaf_key, Product.MILAN, TCB, signing_key=layout.SIGNING_KEY_VLEK, chip_id=bytes(64), vmpl=1
    )
    v = verify_snp(report, certs=[vlek], trust=pki.trust(), policy=None, now=NOW)
    assert v.ok, v.failures
    assert v.claims["signer"] == "vlek"
    assert ids(verify_snp(report, certs=[vlek], trust=pki.trust(), policy=Policy(), now=NOW)) == {
        "snp.vmpl_mismatch"
    }
    assert verify_snp(report, certs=[vlek], trust=pki.trust(), policy=Policy(vmpl=1), now=NOW).ok
    assert verify_snp(report, certs=[vlek], trust=pki.trust(), policy=Policy(vmpl=None), now=NOW).ok
    # a VLEK signed by the ASK (not the ASVK) does not chain
    exts = vcek_extensions(Product.MILAN, TCB, csp_id="CN=x")
    wrong = amd_cert(
        amd_name("SEV-VLEK"),
        amd_name("SEV-VLEK-Milan"),
        pki.leaf_key.public_key(),
        pki.ask_key,
        extensions=exts,
    )
    assert ids(verify_snp(report, certs=[der(wrong)], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.chain_invalid"
    }
    # a VLEK-signed report with only a VCEK supplied, and the reverse
    vcek = der(pki.vcek(TCB, HWID))
    assert ids(verify_snp(report, certs=[vcek], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.cert_kind_mismatch"
    }
    vcek_report = snp_report(pki.leaf_key, Product.MILAN, TCB)
    assert ids(verify_snp(vcek_report, certs=[vlek], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.cert_kind_mismatch"
    }


def test_turin_layout() -> None:
    """Turin: FMC-first TCB, 8-byte hwID == CHIP_ID[0:8], v5 report; PLATFORM_INFO bit 6 is not refused."""
    turin = AmdPki.make(Product.TURIN)
    tcb = TcbParts(fmc=1, bl=1, tee=1, snp=4, ucode=0x51)
    hwid = bytes.fromhex("59790fb1c39f35c1")
    vcek = der(turin.vcek(tcb, hwid))
    report = snp_report(turin.leaf_key, Product.TURIN, tcb, chip_id=hwid + bytes(56), platform_info=0x65)
    v = verify_snp(report, certs=[vcek], trust=turin.trust(), policy=Policy(), now=NOW)
    assert v.ok, v.failures
    assert v.claims["tcb"]["reported"] == {"fmc": 1, "bl": 1, "tee": 1, "snp": 4, "ucode": 0x51}
    low_fmc = Policy(min_tcb=(("Turin", TcbParts(fmc=2, bl=0, tee=0, snp=0, ucode=0)),))
    assert ids(verify_snp(report, certs=[vcek], trust=turin.trust(), policy=low_fmc, now=NOW)) == {
        "snp.tcb_below_minimum"
    }
    other_chip = snp_report(turin.leaf_key, Product.TURIN, tcb, chip_id=bytes(8 * [1]) + bytes(56))
    assert ids(verify_snp(other_chip, certs=[vcek], trust=turin.trust(), policy=None, now=NOW)) == {
        "snp.chip_id_mismatch"
    }
    wrong_fmc = der(turin.vcek(TcbParts(fmc=0, bl=1, tee=1, snp=4, ucode=0x51), hwid))
    v = verify_snp(report, certs=[wrong_fmc], trust=turin.trust(), policy=None, now=NOW)
    assert ids(v) == {"snp.tcb_cert_mismatch"}


def test_signature_upper_bytes_and_values(pki: AmdPki) -> None:
    vcek = der(pki.vcek(TCB, HWID))
    report = bytearray(snp_report(pki.leaf_key, Product.MILAN, TCB))
    report[0x2A0 + 60] = 1  # inside R's must-be-zero upper 24 bytes
    assert ids(verify_snp(bytes(report), certs=[vcek], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.signature_malformed"
    }
    other_key = ec.generate_private_key(ec.SECP384R1())
    forged = snp_report(other_key, Product.MILAN, TCB)
    assert ids(verify_snp(forged, certs=[vcek], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.signature_invalid"
    }


def test_policy_bits(pki: AmdPki) -> None:
    vcek = der(pki.vcek(TCB, HWID))
    policy_bits = layout.DEFAULT_GUEST_POLICY | layout.POLICY_MIGRATE_MA | (1 << 8) | 50  # ABI 1.50
    report = snp_report(pki.leaf_key, Product.MILAN, TCB, policy=policy_bits)
    strict = Policy(smt=False, single_socket=True, abi_minimum=(1, 51))
    assert ids(verify_snp(report, certs=[vcek], trust=pki.trust(), policy=strict, now=NOW)) == {
        "snp.policy_migrate_ma",
        "snp.policy_smt",
        "snp.policy_single_socket",
        "snp.abi_below_minimum",
    }
    lenient = Policy(migrate_ma=True, abi_minimum=(1, 50))
    assert verify_snp(report, certs=[vcek], trust=pki.trust(), policy=lenient, now=NOW).ok


def test_non_amd_names(pki: AmdPki) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    other = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Not AMD"),
            x509.NameAttribute(NameOID.COMMON_NAME, "SEV-VCEK"),
        ]
    )
    exts = vcek_extensions(Product.MILAN, TCB, hwid=HWID)
    cert = amd_cert(other, amd_name("SEV-Milan"), pki.leaf_key.public_key(), pki.ask_key, extensions=exts)
    report = snp_report(pki.leaf_key, Product.MILAN, TCB)
    assert ids(verify_snp(report, certs=[der(cert)], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.cert_malformed"
    }


def test_product_name_must_match_issuer(pki: AmdPki) -> None:
    exts = tuple(
        (oid, b"\x16\x05Genoa" if oid.endswith(".1.2") else value)
        for oid, value in vcek_extensions(Product.MILAN, TCB, hwid=HWID)
    )
    cert = amd_cert(
        amd_name("SEV-VCEK"), amd_name("SEV-Milan"), pki.leaf_key.public_key(), pki.ask_key, extensions=exts
    )
    report = snp_report(pki.leaf_key, Product.MILAN, TCB)
    assert ids(verify_snp(report, certs=[der(cert)], trust=pki.trust(), policy=None, now=NOW)) == {
        "snp.product_mismatch"
    }

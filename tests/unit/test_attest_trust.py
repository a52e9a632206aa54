"""The trust material shipped in the package: exactly the AMD and Intel roots named in spec §5."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cwbuild.attest.amd_certs import KeyKind, parse_leaf, verify_leaf_chain
from cwbuild.attest.tcb import Product, TcbParts
from cwbuild.attest.trust import TrustStore, load_cert, load_certs
from cwbuild.attest.verdict import Findings
from cwbuild.errors import FormatError
from tests.conftest import FIXTURES

#: SHA-256 of the DER certificates, from spec/attestation.md §5 (AMD KDS cert_chain via go-sev-guest,
#: virtee/sev, trustee and microsoft/TEE-Attestation-Verification, which all carry the same DER), and the
#: Intel SGX Root CA fingerprint that spec §5 and fixtures/evidence/README.md give.
EXPECTED = {
    (Product.MILAN, "ark"): "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    (Product.MILAN, "ask"): "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    (Product.MILAN, "asvk"): "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
    (Product.GENOA, "ark"): "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    (Product.GENOA, "ask"): "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    (Product.GENOA, "asvk"): "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
    (Product.TURIN, "ark"): "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    (Product.TURIN, "ask"): "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
    (Product.TURIN, "asvk"): "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
}
INTEL_ROOT_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
INTEL_ROOT_SPKI_SHA256 = "a0af031289f5d5d4132f9186068a7fc13628633ba235777472e29b6b6c67a49e"


@pytest.mark.parametrize(("product", "role"), sorted(EXPECTED))
def test_amd_fingerprints(product: Product, role: str) -> None:
    roots = TrustStore.default().amd[product]
    cert = getattr(roots, role)
    assert hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() == EXPECTED[(product, role)]


def test_intel_root_fingerprint() -> None:
    root = TrustStore.default().intel_root
    assert root is not None
    assert hashlib.sha256(root.public_bytes(Encoding.DER)).hexdigest() == INTEL_ROOT_SHA256
    spki = root.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert hashlib.sha256(spki).hexdigest() == INTEL_ROOT_SPKI_SHA256


def test_only_these_products() -> None:
    assert set(TrustStore.default().amd) == {Product.MILAN, Product.GENOA, Product.TURIN}


def test_turin_vcek_chain() -> None:
    """spec §4.1: the virtee Turin VCEK (structVersion 1, 8-byte hwID, fmc 0) chains to ARK-Turin."""
    cert = load_cert((FIXTURES / "evidence" / "snp" / "virtee_turin_vcek.der").read_bytes())
    leaf = parse_leaf(cert)
    assert (leaf.kind, leaf.product) == (KeyKind.VCEK, Product.TURIN)
    assert leaf.hwid == bytes.fromhex("1e550a8ee5cf9f4d")
    assert leaf.tcb is not None
    assert leaf.tcb.fmc == 0
    f = Findings()
    verify_leaf_chain(leaf, [], trust=TrustStore.default(), now=datetime(2026, 1, 1, tzinfo=UTC), f=f)
    assert not f.failures, f.failures
    supplied = load_certs((FIXTURES / "evidence" / "snp" / "virtee_turin_ask_ark.pem").read_bytes())
    verify_leaf_chain(leaf, supplied, trust=TrustStore.default(), now=datetime(2026, 1, 1, tzinfo=UTC), f=f)
    assert not f.failures, f.failures
    f = Findings()
    verify_leaf_chain(leaf, [], trust=TrustStore.default(), now=datetime(2024, 1, 1, tzinfo=UTC), f=f)
    assert [x.id for x in f.failures] == ["snp.cert_expired"]


def test_vlek_profile() -> None:
    cert = load_cert((FIXTURES / "evidence" / "snp" / "trustee_milan_vlek.der").read_bytes())
    leaf = parse_leaf(cert)
    assert (leaf.kind, leaf.product, leaf.hwid) == (KeyKind.VLEK, Product.MILAN, None)
    assert leaf.csp_id == "CN=cc-us-east-2.amazonaws.com"
    assert leaf.tcb == TcbParts(bl=4, tee=0, snp=24, ucode=217)


def test_signature_cache() -> None:
    store = TrustStore.default()
    cert = load_cert((FIXTURES / "evidence" / "snp" / "gosev_milan_vcek.der").read_bytes())
    ask = store.amd[Product.MILAN].ask
    assert store.amd_signed_by(cert, ask)
    misses = store.cache.misses
    assert store.amd_signed_by(cert, ask)
    assert store.cache.misses == misses  # the second check is a cache hit
    assert not store.amd_signed_by(cert, store.amd[Product.GENOA].ask)


def test_load_certs_errors() -> None:
    with pytest.raises(FormatError):
        load_certs(b"not a certificate")
    with pytest.raises(FormatError):
        load_certs(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")

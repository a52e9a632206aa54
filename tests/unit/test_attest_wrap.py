"""Wire cryptography of the endpoint (cwbuild.attest.wrap): encodings, keys, bindings, wrapping, sealing."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from cwbuild.attest import wrap
from cwbuild.errors import AttestError, FormatError


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def spki(public: object) -> bytes:
    assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_b64url_round_trip_and_strictness() -> None:
    data = bytes(range(256))
    text = wrap.b64url(data[:32])
    assert "=" not in text
    assert wrap.b64url_decode(text, what="n", max_bytes=32) == data[:32]
    assert wrap.b64url_decode(text + "=", what="n", max_bytes=32) == data[:32]
    for bad in ("a+b/", "!!!!", "A" * 5):
        with pytest.raises(FormatError):
            wrap.b64url_decode(bad, what="n", max_bytes=32)
    with pytest.raises(FormatError, match="too long"):
        wrap.b64url_decode("A" * 100, what="n", max_bytes=32)


def test_b64_strict() -> None:
    assert wrap.b64_decode("AAEC", what="x", max_bytes=10) == b"\x00\x01\x02"
    for bad in ("AAE", "AA E", "AA-_", "é"):
        with pytest.raises(FormatError):
            wrap.b64_decode(bad, what="x", max_bytes=10)


def test_pubkey_rules(key: rsa.RSAPrivateKey) -> None:
    der = spki(key.public_key())
    assert wrap.load_pubkey_der(der).key_size == 2048
    small = rsa.generate_private_key(65537, 1024)
    with pytest.raises(FormatError, match="1024 bits"):
        wrap.load_pubkey_der(spki(small.public_key()))
    with pytest.raises(FormatError, match="not RSA"):
        wrap.load_pubkey_der(spki(ec.generate_private_key(ec.SECP384R1()).public_key()))
    with pytest.raises(FormatError):
        wrap.load_pubkey_der(der[:-3])
    with pytest.raises(FormatError, match="too long"):
        wrap.load_pubkey_der(der + bytes(4096))
    pkcs1 = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    with pytest.raises(FormatError):
        wrap.load_pubkey_der(pkcs1)


def test_report_data_v1_definition(key: rsa.RSAPrivateKey) -> None:
    nonce, der = os.urandom(32), spki(key.public_key())
    expected = hashlib.sha512(nonce + hashlib.sha256(der).digest()).digest()
    assert wrap.report_data_v1(nonce, der) == expected
    assert len(expected) == 64


def test_oaep_wrap_unwraps(key: rsa.RSAPrivateKey) -> None:
    secret = os.urandom(wrap.MAX_SECRET_V1)
    wrapped = wrap.wrap_oaep(key.public_key(), secret)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert key.decrypt(wrapped, oaep) == secret
    with pytest.raises(AttestError):
        wrap.wrap_oaep(key.public_key(), secret + b"x")


def test_krun_key_and_binding(key: rsa.RSAPrivateKey) -> None:
    numbers = key.public_key().public_numbers()
    k_mod = base64.b64encode(numbers.n.to_bytes(256, "big")).decode()
    k_exp = base64.b64encode(b"\x01\x00\x01").decode()
    assert wrap.load_krun_pubkey(k_mod, k_exp).public_numbers() == numbers
    with pytest.raises(FormatError, match="minimal"):
        wrap.load_krun_pubkey(base64.b64encode(b"\x00" + numbers.n.to_bytes(256, "big")).decode(), k_exp)
    nonce = "0123456789abcdef0123456789abcdef"
    assert (
        wrap.report_data_krun(nonce, k_mod, k_exp)
        == hashlib.sha512((nonce + k_mod + k_exp).encode()).digest()
    )
    ciphertext = wrap.wrap_pkcs1v15(key.public_key(), b"passphrase")
    assert key.decrypt(ciphertext, padding.PKCS1v15()) == b"passphrase"


def test_seal_binds_key_and_workload() -> None:
    master = os.urandom(32)
    sealed = wrap.seal(master, "wl-1", b"secret bytes")
    assert b"secret bytes" not in sealed
    assert wrap.unseal(master, "wl-1", sealed) == b"secret bytes"
    assert wrap.seal(master, "wl-1", b"secret bytes") != sealed  # fresh IV
    with pytest.raises(AttestError):
        wrap.unseal(master, "wl-2", sealed)  # the workload id is associated data
    with pytest.raises(AttestError):
        wrap.unseal(os.urandom(32), "wl-1", sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(AttestError):
        wrap.unseal(master, "wl-1", tampered)
    with pytest.raises(AttestError, match="malformed"):
        wrap.unseal(master, "wl-1", sealed[:10])

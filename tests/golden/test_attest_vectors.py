"""Known answers for the attestation API v1 wire bytes (tests/vectors/attest-v1.json).

The vector was made by tests/vectors/make_attest_v1.py with the openssl CLI (key, OAEP wrap) and hashlib
(report_data), without cwbuild. Here cwbuild's wire code is checked against it, and the openssl CLI
(`pkeyutl -decrypt` with OAEP SHA-256/MGF1-SHA-256, the command the guest agent runs) unwraps both the
vector and what cwbuild wraps.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cwbuild.attest import wrap
from tests.conftest import REPO

VECTOR = REPO / "tests" / "vectors" / "attest-v1.json"
OPENSSL_OAEP = [
    "-pkeyopt",
    "rsa_padding_mode:oaep",
    "-pkeyopt",
    "rsa_oaep_md:sha256",
    "-pkeyopt",
    "rsa_mgf1_md:sha256",
]


@pytest.fixture(scope="module")
def vector() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTOR.read_text())
    return data


def openssl_unwrap(key_pem: Path, wrapped: bytes) -> bytes:
    proc = subprocess.run(
        ["openssl", "pkeyutl", "-decrypt", "-inkey", str(key_pem), *OPENSSL_OAEP],
        input=wrapped,
        capture_output=True,
        check=True,
    )
    return proc.stdout


def test_nonce_encoding(vector: dict[str, Any]) -> None:
    nonce = bytes.fromhex(vector["nonce_hex"])
    assert len(nonce) == wrap.NONCE_BYTES
    assert wrap.b64url(nonce) == vector["nonce_b64url"]
    assert wrap.b64url_decode(vector["nonce_b64url"], what="nonce", max_bytes=32) == nonce


def test_report_data(vector: dict[str, Any]) -> None:
    nonce = bytes.fromhex(vector["nonce_hex"])
    der = base64.b64decode(vector["pubkey_der_b64"])
    assert hashlib.sha256(der).hexdigest() == vector["pubkey_sha256_hex"]
    assert wrap.report_data_v1(nonce, der).hex() == vector["report_data_hex"]
    assert wrap.load_pubkey_der(der).key_size == 2048
    changed = bytes([nonce[0] ^ 1]) + nonce[1:]  # each input matters
    assert wrap.report_data_v1(changed, der).hex() != vector["report_data_hex"]
    assert wrap.report_data_v1(nonce, der[:-1] + bytes([der[-1] ^ 1])).hex() != vector["report_data_hex"]


def test_vector_unwraps_with_cryptography(vector: dict[str, Any]) -> None:
    key = serialization.load_pem_private_key(vector["private_key_pem"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    secret = key.decrypt(base64.b64decode(vector["wrapped_key_b64"]), oaep)
    assert secret.hex() == vector["secret_hex"]


@pytest.mark.integration
def test_openssl_unwraps_the_vector_and_our_wrap(vector: dict[str, Any], tmp_path: Path) -> None:
    assert shutil.which("openssl"), "openssl is in scripts/setup.sh's APT_PACKAGES"
    key_pem = tmp_path / "key.pem"
    key_pem.write_text(vector["private_key_pem"])
    secret = bytes.fromhex(vector["secret_hex"])
    assert openssl_unwrap(key_pem, base64.b64decode(vector["wrapped_key_b64"])) == secret
    public = wrap.load_pubkey_der(base64.b64decode(vector["pubkey_der_b64"]))
    ours = wrap.wrap_oaep(public, secret)
    assert ours != base64.b64decode(vector["wrapped_key_b64"])  # OAEP is randomised
    assert openssl_unwrap(key_pem, ours) == secret


@pytest.mark.integration
def test_openssl_report_data(vector: dict[str, Any], tmp_path: Path) -> None:
    """The guest's shell pipeline: (nonce; sha256(pubkey DER)) | sha512."""
    der = tmp_path / "pub.der"
    der.write_bytes(base64.b64decode(vector["pubkey_der_b64"]))
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary", str(der)], capture_output=True, check=True
    ).stdout
    out = subprocess.run(
        ["openssl", "dgst", "-sha512", "-binary"],
        input=bytes.fromhex(vector["nonce_hex"]) + digest,
        capture_output=True,
        check=True,
    ).stdout
    assert out.hex() == vector["report_data_hex"]

"""Wire cryptography of the attestation endpoint (DESIGN.md "Attestation API v1", cw-format.md §4.4, §5).

Pure functions on bytes: nonce encoding, the guest public key, the report_data binding, key wrapping to the
guest (RSA-OAEP-SHA256 for v1, RSA-PKCS#1 v1.5 for the krun guest) and sealing secrets at rest (AES-GCM
under the master key, the workload id as associated data). The HTTP layer holds no cryptography of its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cwbuild.errors import AttestError, FormatError

#: DESIGN.md "Attestation API v1": the nonce is 32 random bytes.
NONCE_BYTES = 32
#: DESIGN.md: the guest key is RSA, at least 2048 bits. Upper bound so a hostile key cannot cost us seconds.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
#: Largest SPKI DER we parse (an 8192-bit RSA SPKI is ~1.05 KiB).
MAX_PUBKEY_DER = 2048
#: RFC 8017 §7.1.1: OAEP input limit is k - 2*hLen - 2; with a 2048-bit key and SHA-256 that is 190 bytes.
#: Registration refuses longer secrets, since the guest key may be as small as 2048 bits (DESIGN.md).
MAX_SECRET_V1 = 2048 // 8 - 2 * 32 - 2
#: RFC 8017 §7.2.1: PKCS#1 v1.5 input limit is k - 11 (245 bytes for RSA-2048, cw-format.md §8).
MAX_SECRET_PKCS1 = 2048 // 8 - 11
#: Sealed secret layout: version byte, 96-bit GCM nonce (NIST SP 800-38D §8.2), ciphertext||tag.
SEAL_VERSION = 1
_GCM_NONCE = 12
_MASTER_KEY_BYTES = 32


def new_nonce() -> bytes:
    """32 fresh random bytes."""
    return os.urandom(NONCE_BYTES)


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 4648 §5), as the v1 nonce travels."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, what: str, max_bytes: int) -> bytes:
    """Decode base64url with or without padding; bounded; `FormatError` on anything else."""
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise FormatError(f"{what} is too long")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not base64url") from None
    if b64url(raw) != text.rstrip("="):
        raise FormatError(f"{what} is not canonical base64url")
    return raw


def b64_decode(text: str, *, what: str, max_bytes: int) -> bytes:
    """Decode standard base64 (RFC 4648 §4, padded); bounded; `FormatError` on anything else."""
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise FormatError(f"{what} is too long")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise FormatError(f"{what} is not base64") from None


def b64(data: bytes) -> str:
    """Standard padded base64 (RFC 4648 §4)."""
    return base64.b64encode(data).decode("ascii")


def _check_rsa(key: rsa.RSAPublicKey) -> rsa.RSAPublicKey:
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise FormatError(f"RSA key has {key.key_size} bits; {MIN_RSA_BITS}..{MAX_RSA_BITS} are accepted")
    if key.public_numbers().e < 3 or key.public_numbers().e % 2 == 0:
        raise FormatError("RSA public exponent is not odd and >= 3")
    return key


def load_pubkey_der(der: bytes) -> rsa.RSAPublicKey:
    """The guest's RSA SubjectPublicKeyInfo DER (DESIGN.md), 2048..8192 bits."""
    if len(der) > MAX_PUBKEY_DER:
        raise FormatError("public key is too long")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise FormatError("public key is not a SubjectPublicKeyInfo DER") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise FormatError("public key is not RSA")
    if key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != der:
        raise FormatError("public key DER is not canonical")
    return _check_rsa(key)


def report_data_v1(nonce: bytes, pubkey_der: bytes) -> bytes:
    """DESIGN.md: report_data = SHA-512(nonce || SHA-256(pubkey DER)), 64 bytes."""
    return hashlib.sha512(nonce + hashlib.sha256(pubkey_der).digest()).digest()


def wrap_oaep(key: rsa.RSAPublicKey, secret: bytes) -> bytes:
    """RSA-OAEP with SHA-256 and MGF1-SHA-256, empty label (DESIGN.md "wrapped_key")."""
    limit = key.key_size // 8 - 2 * 32 - 2
    if len(secret) > limit:
        raise AttestError(f"secret is longer than {limit} bytes, the OAEP limit of this key")
    return key.encrypt(
        secret,
        padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )


# --- krun C guest (cw-format.md §4.4 step 4c, §5) ---


def _b64_minimal_int(text: str, what: str) -> int:
    raw = b64_decode(text, what=what, max_bytes=MAX_RSA_BITS // 8 + 1)
    if not raw or (len(raw) > 1 and raw[0] == 0):
        raise FormatError(f"{what} is not a minimal big-endian integer")
    return int.from_bytes(raw, "big")


def load_krun_pubkey(k_mod: str, k_exp: str) -> rsa.RSAPublicKey:
    """The krun guest's `{"alg":"RSA","k-mod","k-exp"}`: standard base64 of minimal big-endian bytes."""
    n = _b64_minimal_int(k_mod, "k-mod")
    e = _b64_minimal_int(k_exp, "k-exp")
    try:
        key = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise FormatError("k-mod/k-exp do not form an RSA public key") from None
    return _check_rsa(key)


def report_data_krun(nonce: str, k_mod: str, k_exp: str) -> bytes:
    """cw-format.md §4.4 4c: SHA-512(nonce_ascii || n_b64 || e_b64) over the strings as sent."""
    return hashlib.sha512((nonce + k_mod + k_exp).encode("ascii")).digest()


def wrap_pkcs1v15(key: rsa.RSAPublicKey, secret: bytes) -> bytes:
    """RSA PKCS#1 v1.5 encryption, what the krun guest decrypts (cw-format.md §4.4 4f)."""
    if len(secret) > key.key_size // 8 - 11:
        raise AttestError("secret is longer than the PKCS#1 v1.5 limit of this key")
    return key.encrypt(secret, padding.PKCS1v15())


# --- secrets at rest ---


def _aead(master_key: bytes) -> AESGCM:
    if len(master_key) != _MASTER_KEY_BYTES:
        raise AttestError("master key must be 32 bytes")
    return AESGCM(master_key)


def seal(master_key: bytes, workload_id: str, secret: bytes) -> bytes:
    """AES-256-GCM under the master key, the workload id (UTF-8) as associated data."""
    iv = os.urandom(_GCM_NONCE)
    return bytes([SEAL_VERSION]) + iv + _aead(master_key).encrypt(iv, secret, workload_id.encode("utf-8"))


def unseal(master_key: bytes, workload_id: str, sealed: bytes) -> bytes:
    """Inverse of `seal`; a wrong key, a wrong workload id or a modified blob raises `AttestError`."""
    if len(sealed) < 1 + _GCM_NONCE + 16 or sealed[0] != SEAL_VERSION:
        raise AttestError(f"sealed secret of workload {workload_id!r} is malformed")
    iv, body = sealed[1 : 1 + _GCM_NONCE], sealed[1 + _GCM_NONCE :]
    try:
        return _aead(master_key).decrypt(iv, body, workload_id.encode("utf-8"))
    except InvalidTag:
        raise AttestError(
            f"sealed secret of workload {workload_id!r} does not open under the master key"
        ) from None

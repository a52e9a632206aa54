"""Trust material (the pinned AMD and Intel roots) and certificate signature checks, cached per certificate.

The roots ship as package data (cwbuild/data/trust/, copied from the KDS/PCS chains listed in
spec/attestation.md §5; their fingerprints are asserted by tests/unit/test_attest_trust.py). A `TrustStore`
is built once and passed into the verifiers; it also remembers which (certificate, issuer) signatures have
verified, so checking the same VCEK or PCK twice does not redo RSA-PSS or ECDSA.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning

from cwbuild.attest.tcb import Product
from cwbuild.errors import FormatError
from cwbuild.resources import data_root

_MAX_CERT_BYTES = 64 * 1024  # one certificate; AMD's are ~1.4 KiB, bundles ~5 KiB
_MAX_CERTS = 16
_CACHE_SIZE = 4096
_T = TypeVar("_T")

#: spec §1.7/§1.8: every AMD certificate is RSASSA-PSS, SHA-384, MGF1-SHA-384, salt 48.
AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
OID_RSASSA_PSS = "1.2.840.113549.1.1.10"  # §1.7
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"  # §3.5 ecdsa-with-SHA256


def load_cert(der: bytes) -> x509.Certificate:
    """One DER certificate. AMD VCEKs have serial 0, which `cryptography` only warns about (spec §6.4)."""
    if len(der) > _MAX_CERT_BYTES:
        raise FormatError("certificate larger than 64 KiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise FormatError(f"not a DER X.509 certificate: {exc}") from None
    return _decoded(cert)


def _decoded(cert: x509.Certificate) -> x509.Certificate:
    """Decode every field the verifiers read now: `cryptography` parses lazily and would raise ValueError
    (or UnsupportedAlgorithm) later, in the middle of a verification."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # malformed names warn before they fail; the error is what counts
            _ = (cert.issuer, cert.subject, cert.serial_number, cert.signature_algorithm_oid)
            _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.extensions, cert.public_key())
            _ = (cert.signature, cert.tbs_certificate_bytes)
    except (
        ValueError,
        UnsupportedAlgorithm,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ) as exc:
        raise FormatError(f"malformed X.509 certificate: {exc}") from None
    return cert


def load_certs(blob: bytes) -> list[x509.Certificate]:
    """Every certificate in `blob`: one DER certificate or a PEM bundle."""
    if len(blob) > _MAX_CERT_BYTES * _MAX_CERTS:
        raise FormatError("certificate input too large")
    if b"-----BEGIN" not in blob:
        return [load_cert(blob)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            certs = x509.load_pem_x509_certificates(blob)
    except ValueError as exc:
        raise FormatError(f"not a PEM certificate bundle: {exc}") from None
    if len(certs) > _MAX_CERTS:
        raise FormatError(f"more than {_MAX_CERTS} certificates")
    return [_decoded(cert) for cert in certs]


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def cn(name: x509.Name) -> str:
    """The single commonName of `name`, or "" when there is none or several."""
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if len(attrs) != 1:
        return ""
    value = attrs[0].value
    return value if isinstance(value, str) else ""


def valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def validity(cert: x509.Certificate, now: datetime) -> str:
    """Why `valid_at` is False, for a finding: "is valid FROM..TO, not at NOW" (UTC)."""
    return (
        f"is valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}.."
        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not at {now:%Y-%m-%dT%H:%M:%SZ}"
    )


def _verify_amd(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if cert.signature_algorithm_oid.dotted_string != OID_RSASSA_PSS or not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, AMD_PSS, hashes.SHA384())
    except InvalidSignature:
        return False
    return True


def _verify_intel(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if cert.signature_algorithm_oid.dotted_string != OID_ECDSA_SHA256:
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


class Memo:
    """A bounded, thread-safe LRU memo. Keys are digests of the exact input bytes, so equal keys mean equal
    inputs; failures (exceptions) are never stored. Size 4096 entries of at most a parsed chain each."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        self._memo: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], _T]) -> _T:
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                self.hits += 1
                found: _T = self._memo[key]
                return found
        result = compute()
        with self._lock:
            self.misses += 1
            self._memo[key] = result
            if len(self._memo) > self._size:
                self._memo.popitem(last=False)
        return result


def digest(data: bytes) -> bytes:
    """The memo key of some input bytes: SHA-256, so entries stay small whatever the input size."""
    return hashlib.sha256(data).digest()


def der_digest(cert: x509.Certificate) -> bytes:
    """The memo key of a certificate: SHA-256 of its exact DER."""
    return digest(cert.public_bytes(serialization.Encoding.DER))


@dataclass(frozen=True)
class AmdRoots:
    """The pinned chain heads of one product: ARK, ASK (signs VCEKs), ASVK (signs VLEKs) (spec §1.8)."""

    product: Product
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate


@dataclass(frozen=True)
class TrustStore:
    """Pinned roots plus the signature cache. Build with `TrustStore.default()` or `from_certs(...)`."""

    amd: dict[Product, AmdRoots]
    intel_root: x509.Certificate | None
    cache: Memo = field(default_factory=Memo, compare=False)

    @classmethod
    def default(cls) -> TrustStore:
        """The roots shipped in the package (one shared instance, so its cache is shared too)."""
        return _default_store()

    @classmethod
    def from_pem(cls, amd: dict[Product, tuple[bytes, bytes]], intel_root: bytes | None) -> TrustStore:
        """Build from PEM files: per product (ASK+ARK bundle, ASVK+ARK bundle), and the Intel root."""
        roots = {}
        for product, (vcek_chain, vlek_chain) in amd.items():
            ask, ark = load_certs(vcek_chain)
            asvk, ark2 = load_certs(vlek_chain)
            if ark.public_bytes(_DER) != ark2.public_bytes(_DER):
                raise FormatError(f"{product}: the VCEK and VLEK chains name different ARKs")
            roots[product] = AmdRoots(product, ark=ark, ask=ask, asvk=asvk)
        intel = load_certs(intel_root)[0] if intel_root is not None else None
        return cls(amd=roots, intel_root=intel)

    def amd_signed_by(self, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
        """RSA-PSS SHA-384 salt 48 signature of `cert` by `issuer`'s key (spec §1.8), cached per pair."""
        return self.cache.get(
            ("amd", der_digest(cert), der_digest(issuer)), lambda: _verify_amd(cert, issuer)
        )

    def intel_signed_by(self, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
        """ECDSA P-256 SHA-256 signature of `cert` by `issuer`'s key (spec §3.6 step 3), cached per pair."""
        return self.cache.get(
            ("intel", der_digest(cert), der_digest(issuer)), lambda: _verify_intel(cert, issuer)
        )

    def certs(self, blob: bytes) -> list[x509.Certificate]:
        """`load_certs(blob)`, memoized on the exact bytes (a VCEK or chain seen before is not re-parsed)."""
        return list(self.cache.get(("certs", digest(blob)), lambda: tuple(load_certs(blob))))

    def derived(self, kind: str, cert: x509.Certificate, compute: Callable[[], _T]) -> _T:
        """`compute()` (a pure function of `cert`, e.g. its decoded extensions), memoized per certificate."""
        return self.cache.get((kind, der_digest(cert)), compute)

    def memo(self, kind: str, data: bytes, compute: Callable[[], _T]) -> _T:
        """`compute()` (a pure function of `data`), memoized on the digest of `data`."""
        return self.cache.get((kind, digest(data)), compute)

    def products(self) -> Iterable[Product]:
        return self.amd.keys()


_DER = serialization.Encoding.DER


@functools.cache
def _default_store() -> TrustStore:
    base = data_root() / "trust"
    amd = {
        p: (
            (base / f"amd_{p.value.lower()}_vcek_ask_ark.pem").read_bytes(),
            (base / f"amd_{p.value.lower()}_vlek_asvk_ark.pem").read_bytes(),
        )
        for p in Product
    }
    return TrustStore.from_pem(amd, (base / "intel_sgx_root_ca.pem").read_bytes())


def utc(moment: datetime) -> datetime:
    """`moment` as an aware UTC datetime (naive values are taken as UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

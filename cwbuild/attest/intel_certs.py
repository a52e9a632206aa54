"""Intel PCK certificates: the SGX extension and the chain PCK -> Platform/Processor CA -> pinned root.

spec/attestation.md §3.5 (profile, SGX extension 1.2.840.113741.1.13.1), §3.6 steps 2-3 (chain), §5 (root).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cwbuild.attest import der
from cwbuild.attest.trust import TrustStore, cn, load_certs, valid_at, validity
from cwbuild.attest.verdict import Findings
from cwbuild.errors import FormatError

OID_SGX_EXTENSION = "1.2.840.113741.1.13.1"  # §3.5
_SGX = OID_SGX_EXTENSION
OID_TCB = f"{_SGX}.2"
OID_PCESVN = f"{_SGX}.2.17"
OID_CPUSVN = f"{_SGX}.2.18"
OID_PCEID = f"{_SGX}.3"
OID_FMSPC = f"{_SGX}.4"
OID_SGX_TYPE = f"{_SGX}.5"
SGX_TCB_COMPONENTS = 16  # §3.5: .2.1-.2.16

PCK_CN = "Intel SGX PCK Certificate"  # §3.5
PCK_ISSUER_CNS = frozenset({"Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA"})  # §3.5
ROOT_CN = "Intel SGX Root CA"  # §3.5
TCB_SIGNING_CN = "Intel SGX TCB Signing"  # §3.7


@dataclass(frozen=True)
class PckInfo:
    """The SGX extension of a PCK certificate (§3.5)."""

    fmspc: bytes
    pceid: bytes
    pcesvn: int
    cpusvn: bytes
    sgx_tcb: tuple[int, ...]


def _pairs(value: bytes) -> dict[str, bytes]:
    """A SEQUENCE OF SEQUENCE {OID, value} as oid -> value TLV."""
    out: dict[str, bytes] = {}
    for tag, item in der.children(der.expect(value, der.TAG_SEQUENCE)):
        if tag != der.TAG_SEQUENCE:
            raise FormatError("SGX extension: element is not a SEQUENCE")
        parts = der.children(der.expect(item, der.TAG_SEQUENCE), limit=2)
        if len(parts) != 2 or parts[0][0] != der.TAG_OID:
            raise FormatError("SGX extension: element is not {OID, value}")
        out[der.oid(parts[0][1])] = parts[1][1]
    return out


def parse_pck_extension(cert: x509.Certificate) -> PckInfo:
    """Decode FMSPC, PCE-ID, PCESVN, CPUSVN and the 16 SGX TCB components; FormatError if absent or bad."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_SGX_EXTENSION)).value
    except x509.ExtensionNotFound:
        raise FormatError("PCK certificate lacks the SGX extension") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise FormatError("PCK SGX extension has an unexpected type")
    top = _pairs(ext.value)
    try:
        tcb = _pairs(top[OID_TCB])
        fmspc = der.expect(top[OID_FMSPC], der.TAG_OCTET_STRING)
        pceid = der.expect(top[OID_PCEID], der.TAG_OCTET_STRING)
        comps = tuple(der.integer(tcb[f"{OID_TCB}.{i}"]) for i in range(1, SGX_TCB_COMPONENTS + 1))
        pcesvn = der.integer(tcb[OID_PCESVN])
        cpusvn = der.expect(tcb[OID_CPUSVN], der.TAG_OCTET_STRING)
    except KeyError as missing:
        raise FormatError(f"PCK SGX extension lacks {missing}") from None
    if len(fmspc) != 6 or len(pceid) != 2 or len(cpusvn) != 16:
        raise FormatError("PCK SGX extension FMSPC/PCE-ID/CPUSVN has the wrong size")
    return PckInfo(fmspc=fmspc, pceid=pceid, pcesvn=pcesvn, cpusvn=cpusvn, sgx_tcb=comps)


def split_pem_chain(pem: bytes) -> list[x509.Certificate]:
    """§3.6 step 2: the PEM chain of the quote, at most one trailing NUL."""
    text = pem[:-1] if pem.endswith(b"\x00") else pem
    if b"\x00" in text:
        raise FormatError("PCK chain contains NUL bytes")
    certs = load_certs(text)
    # Canonical PEM only (64-column base64, LF): then every byte of the chain text is covered by a
    # certificate signature or the pinned root, and no variant spelling of the same chain is accepted.
    if text != b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs):
        raise FormatError("PCK chain is not canonical PEM or has data around the certificates")
    return certs


def _p256(cert: x509.Certificate) -> bool:
    key = cert.public_key()
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def verify_intel_chain(
    chain: Sequence[x509.Certificate],
    *,
    leaf_cns: frozenset[str],
    mid_cns: frozenset[str] | None,
    trust: TrustStore,
    now: datetime,
    f: Findings,
) -> bool:
    """[leaf, (intermediate,) root]: names, P-256 keys, signatures, pinned root, validity (§3.6 step 3).

    Returns True when the chain is authentic (validity is reported separately as tdx.cert_expired).
    """
    expected = 2 if mid_cns is None else 3
    if len(chain) != expected:
        f.fail("tdx.pck_chain_invalid", f"chain has {len(chain)} certificates, expected {expected}")
        return False
    pinned = trust.intel_root
    root = chain[-1]
    if pinned is None or root != pinned:
        f.fail("tdx.root_untrusted", f"chain ends at {cn(root.subject)!r}, not the pinned Intel SGX Root CA")
        return False
    ok = True
    names = [leaf_cns, *([mid_cns] if mid_cns is not None else []), frozenset({ROOT_CN})]
    for cert, allowed in zip(chain, names, strict=True):
        if cn(cert.subject) not in allowed or not _p256(cert):
            f.fail(
                "tdx.cert_malformed", f"{cn(cert.subject)!r} is not one of {sorted(allowed)} with a P-256 key"
            )
            ok = False
    for child, parent in zip(chain, [*chain[1:], root], strict=True):
        if child.issuer != parent.subject or not trust.intel_signed_by(child, parent):
            f.fail("tdx.pck_chain_invalid", f"{cn(child.subject)!r} is not signed by {cn(parent.subject)!r}")
            ok = False
    for cert in chain:
        if not valid_at(cert, now):
            f.fail("tdx.cert_expired", f"{cn(cert.subject)!r} {validity(cert, now)}")
    return ok

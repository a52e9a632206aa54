"""AMD VCEK/VLEK certificates: the KDS profile, the private extensions, and the ARK -> ASK/ASVK -> leaf chain.

spec/attestation.md §1.7 (profile and the 1.3.6.1.4.1.3704.1 extension arc), §1.8 (chain, CRL), §5 (pinned
roots). The chain is checked certificate by certificate because `cryptography`'s chain builder rejects
AMD's PSS parameters (§1.8 pitfall).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cwbuild.attest import der
from cwbuild.attest.tcb import Product, TcbParts
from cwbuild.attest.trust import (
    AMD_PSS,
    OID_RSASSA_PSS,
    AmdRoots,
    TrustStore,
    cn,
    load_certs,
    valid_at,
    validity,
)
from cwbuild.attest.verdict import Findings
from cwbuild.errors import FormatError

# §1.7 AMD OID arc 1.3.6.1.4.1.3704.1 (GSG kds.go; Turin fmcSPL from SNPG verify.rs / TRU snp/mod.rs)
_ARC = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = f"{_ARC}.1"
OID_PRODUCT_NAME = f"{_ARC}.2"
OID_BL_SPL = f"{_ARC}.3.1"
OID_TEE_SPL = f"{_ARC}.3.2"
OID_SNP_SPL = f"{_ARC}.3.3"
OID_UCODE_SPL = f"{_ARC}.3.8"
OID_FMC_SPL = f"{_ARC}.3.9"
OID_HWID = f"{_ARC}.4"
OID_CSP_ID = f"{_ARC}.5"

HWID_LEN_LEGACY = 64  # §1.7 hwID: 64 bytes on Milan/Genoa
HWID_LEN_TURIN = 8  # §1.7 hwID: 8 bytes on Turin
AMD_ORG = "Advanced Micro Devices"  # §1.7 validateAmdLocation


class KeyKind(enum.StrEnum):
    """Which AMD key signed a report (§1.1 SIGNING_KEY 0 / 1)."""

    VCEK = "vcek"
    VLEK = "vlek"

    @property
    def subject_cn(self) -> str:
        return "SEV-VCEK" if self is KeyKind.VCEK else "SEV-VLEK"  # §1.7


@dataclass(frozen=True)
class AmdLeaf:
    """A VCEK or VLEK with its AMD extensions decoded."""

    cert: x509.Certificate
    kind: KeyKind
    product: Product | None
    tcb: TcbParts | None
    hwid: bytes | None
    csp_id: str | None
    product_name: str

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        key = self.cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            raise FormatError("VCEK/VLEK key is not ECDSA P-384")  # §1.7
        return key


def _issuer_product(issuer_cn: str, kind: KeyKind) -> Product | None:
    """§1.7: a VCEK's issuer is SEV-{product}, a VLEK's SEV-VLEK-{product}."""
    prefix = "SEV-" if kind is KeyKind.VCEK else "SEV-VLEK-"
    for product in Product:
        if issuer_cn == prefix + product.value:
            return product
    return None


def _amd_extensions(cert: x509.Certificate) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for ext in cert.extensions:
        name = ext.oid.dotted_string
        if name.startswith(_ARC + ".") and isinstance(ext.value, x509.UnrecognizedExtension):
            out[name] = ext.value.value
    return out


def _hwid(raw: bytes) -> bytes:
    """§1.7: hwID is raw bytes, or (GSG/TRU also accept) a DER OCTET STRING wrapping them."""
    if len(raw) in (HWID_LEN_LEGACY, HWID_LEN_TURIN):
        return raw
    return der.expect(raw, der.TAG_OCTET_STRING)


def _ia5(raw: bytes) -> str:
    return der.expect(raw, der.TAG_IA5STRING).decode("ascii", "replace")


def parse_leaf(cert: x509.Certificate) -> AmdLeaf:
    """Decode a VCEK/VLEK; FormatError when it does not have the AMD profile (§1.7)."""
    subject = cn(cert.subject)
    kind = {"SEV-VCEK": KeyKind.VCEK, "SEV-VLEK": KeyKind.VLEK}.get(subject)
    if kind is None:
        raise FormatError(f"certificate subject CN {subject!r} is not SEV-VCEK or SEV-VLEK")
    if not is_amd_name(cert.subject) or not is_amd_name(cert.issuer):
        raise FormatError(f"{kind.value.upper()} subject or issuer is not an AMD name (O={AMD_ORG})")
    product = _issuer_product(cn(cert.issuer), kind)
    exts = _amd_extensions(cert)
    try:
        spl = {oid: der.integer(exts[oid]) for oid in (OID_BL_SPL, OID_TEE_SPL, OID_SNP_SPL, OID_UCODE_SPL)}
    except KeyError as missing:
        raise FormatError(f"{kind.value.upper()} lacks the TCB extension {missing}") from None
    fmc = der.integer(exts[OID_FMC_SPL]) if OID_FMC_SPL in exts else None
    if product is Product.TURIN and fmc is None:
        raise FormatError("Turin VCEK lacks the fmcSPL extension")
    tcb = TcbParts(
        bl=spl[OID_BL_SPL], tee=spl[OID_TEE_SPL], snp=spl[OID_SNP_SPL], ucode=spl[OID_UCODE_SPL], fmc=fmc
    )
    if any(v > 0xFF for v in tcb.components().values()):
        raise FormatError("TCB extension value exceeds one byte")
    hwid = _hwid(exts[OID_HWID]) if OID_HWID in exts else None
    csp = _ia5(exts[OID_CSP_ID]) if OID_CSP_ID in exts else None
    # GSG: a VCEK has hwID and no cspId, a VLEK the reverse (§1.7).
    if (kind is KeyKind.VCEK) != (hwid is not None) or (kind is KeyKind.VLEK) != (csp is not None):
        raise FormatError(f"{kind.value.upper()} has the wrong hwID/cspId extensions for its kind")
    name = exts.get(OID_PRODUCT_NAME)
    product_name = _ia5(name) if name else ""
    return AmdLeaf(cert, kind, product, tcb, hwid, csp, product_name)


def find_leaf(certs: Sequence[x509.Certificate], kind: KeyKind) -> x509.Certificate | None:
    for cert in certs:
        if cn(cert.subject) == kind.subject_cn:
            return cert
    return None


def load_all(blobs: Sequence[bytes], trust: TrustStore | None = None) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    for blob in blobs:
        out.extend(trust.certs(blob) if trust is not None else load_certs(blob))
    return out


def _pick_intermediate(
    leaf: AmdLeaf, supplied: Sequence[x509.Certificate], roots: AmdRoots, trust: TrustStore, f: Findings
) -> x509.Certificate | None:
    """The pinned ASK/ASVK, or a supplied one that differs from it only if the pinned ARK signed it."""
    pinned = roots.ask if leaf.kind is KeyKind.VCEK else roots.asvk
    for cert in supplied:
        if cert is leaf.cert or cert.subject != leaf.cert.issuer or cert == pinned:
            continue
        if cert.issuer != roots.ark.subject or not trust.amd_signed_by(cert, roots.ark):
            f.fail("snp.root_untrusted", f"supplied {cn(cert.subject)} is not signed by the pinned ARK")
            return None
        return cert
    return pinned


def _check_supplied_arks(supplied: Sequence[x509.Certificate], roots: AmdRoots, f: Findings) -> None:
    for cert in supplied:
        if cn(cert.subject).startswith("ARK-") and cert != roots.ark:
            f.fail("snp.root_untrusted", f"supplied {cn(cert.subject)} is not the pinned ARK")


def verify_leaf_chain(
    leaf: AmdLeaf,
    supplied: Sequence[x509.Certificate],
    *,
    trust: TrustStore,
    now: datetime,
    crls: Sequence[bytes] = (),
    f: Findings,
) -> None:
    """ARK self-signature, ASK/ASVK by ARK, leaf by ASK/ASVK, names, validity at `now`, CRLs (§1.8)."""
    if leaf.product is None or leaf.product not in trust.amd:
        f.fail("snp.product_unknown", f"issuer {cn(leaf.cert.issuer)!r} names no pinned AMD product")
        return
    roots = trust.amd[leaf.product]
    _check_supplied_arks(supplied, roots, f)
    inter = _pick_intermediate(leaf, supplied, roots, trust, f)
    if inter is None:
        return
    links = ((roots.ark, roots.ark), (inter, roots.ark), (leaf.cert, inter))
    for child, parent in links:
        if child.issuer != parent.subject or not trust.amd_signed_by(child, parent):
            f.fail("snp.chain_invalid", f"{cn(child.subject)} is not signed by {cn(parent.subject)}")
    for cert in (roots.ark, inter, leaf.cert):
        if not valid_at(cert, now):
            f.fail("snp.cert_expired", f"{cn(cert.subject)} {validity(cert, now)}")
    _check_crls(crls, roots.ark, inter, f)
    if not isinstance(leaf.cert.public_key(), ec.EllipticCurvePublicKey):
        f.fail("snp.cert_malformed", "VCEK/VLEK key is not ECDSA")
    if leaf.cert.signature_algorithm_oid.dotted_string != OID_RSASSA_PSS:
        f.fail("snp.chain_invalid", "VCEK/VLEK is not signed with RSASSA-PSS")


def _check_crls(crls: Sequence[bytes], ark: x509.Certificate, inter: x509.Certificate, f: Findings) -> None:
    """§1.8: an ARK-signed CRL listing the ASK/ASVK serial revokes it. CRLs of other issuers are skipped."""
    key = ark.public_key()
    for blob in crls:
        try:
            crl = x509.load_der_x509_crl(blob)
        except ValueError:
            f.fail("snp.cert_malformed", "a CRL is not DER")
            continue
        if crl.issuer != ark.subject:
            continue
        try:
            if not isinstance(key, rsa.RSAPublicKey):
                raise InvalidSignature
            key.verify(crl.signature, crl.tbs_certlist_bytes, AMD_PSS, hashes.SHA384())
        except InvalidSignature:
            f.fail("snp.chain_invalid", f"the CRL of {cn(ark.subject)} is not signed by it")
            continue
        if crl.get_revoked_certificate_by_serial_number(inter.serial_number) is not None:
            f.fail("snp.cert_revoked", f"{cn(inter.subject)} serial {inter.serial_number} is revoked")


def is_amd_name(name: x509.Name) -> bool:
    """§1.7: AMD names carry O=Advanced Micro Devices."""
    orgs = name.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
    return len(orgs) == 1 and orgs[0].value == AMD_ORG

"""Synthetic AMD- and Intel-shaped certificate hierarchies, built with `cryptography` for negative tests.

No real fixture is revoked, expired at a convenient time, or signed by the wrong issuer, so these hierarchies
stand in for the PKI (not for the verifier): same names, algorithms (RSA-PSS SHA-384 salt 48 + P-384 for AMD;
P-256 ECDSA-SHA256 for Intel), extensions and wire formats as the real ones (spec/attestation.md §1.7, §1.8,
§3.5, §3.7). RSA keys are 2048-bit (AMD's are 4096) to keep key generation fast.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from cwbuild.attest import snp_report as layout
from cwbuild.attest.sim import sign_report
from cwbuild.attest.tcb import Product, TcbParts
from cwbuild.attest.trust import AMD_PSS, AmdRoots, TrustStore

NOW = datetime(2025, 6, 1, tzinfo=UTC)
YEAR = timedelta(days=365)
AMD_ARC = "1.3.6.1.4.1.3704.1"


# --- a tiny DER encoder for the vendor extensions -----------------------------------------------------------


def tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + value


def der_int(value: int) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return tlv(0x02, raw)


def der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


def seq(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


# --- AMD ---------------------------------------------------------------------------------------------------


def amd_name(cn: str) -> x509.Name:
    """§1.7: C=US, L=Santa Clara, ST=CA, O=Advanced Micro Devices, OU=Engineering, CN=..."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@functools.cache
def rsa_key(label: str) -> rsa.RSAPrivateKey:
    """A cached RSA key per label, so a test session makes each only once."""
    del label
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def amd_cert(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: rsa.RSAPrivateKey,
    *,
    serial: int = 1,
    not_before: datetime = NOW - YEAR,
    not_after: datetime = NOW + YEAR,
    extensions: tuple[tuple[str, bytes], ...] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for oid, value in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=AMD_PSS)


def vcek_extensions(
    product: Product, tcb: TcbParts, *, hwid: bytes | None = None, csp_id: str | None = None
) -> tuple[tuple[str, bytes], ...]:
    """§1.7 extensions: structVersion, productName, the SPLs (fmc on Turin), hwID (VCEK) or cspId (VLEK)."""
    exts = [
        (f"{AMD_ARC}.1", der_int(1 if product is Product.TURIN else 0)),
        (f"{AMD_ARC}.2", tlv(0x16, product.value.encode())),
        (f"{AMD_ARC}.3.1", der_int(tcb.bl)),
        (f"{AMD_ARC}.3.2", der_int(tcb.tee)),
        (f"{AMD_ARC}.3.3", der_int(tcb.snp)),
        (f"{AMD_ARC}.3.8", der_int(tcb.ucode)),
    ]
    if tcb.fmc is not None:
        exts.append((f"{AMD_ARC}.3.9", der_int(tcb.fmc)))
    if hwid is not None:
        exts.append((f"{AMD_ARC}.4", hwid))
    if csp_id is not None:
        exts.append((f"{AMD_ARC}.5", tlv(0x16, csp_id.encode())))
    return tuple(exts)


@dataclass
class AmdPki:
    """ARK -> ASK/ASVK -> VCEK/VLEK for one product, plus the keys to sign anything else."""

    product: Product
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    asvk_key: rsa.RSAPrivateKey
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP384R1())
    )

    @classmethod
    def make(cls, product: Product = Product.MILAN, tag: str = "") -> AmdPki:
        p = product.value
        ark_key, ask_key, asvk_key = (rsa_key(f"{tag}{p}-{r}") for r in ("ark", "ask", "asvk"))
        ark_name = amd_name(f"ARK-{p}")
        ark = amd_cert(ark_name, ark_name, ark_key.public_key(), ark_key)
        ask = amd_cert(amd_name(f"SEV-{p}"), ark_name, ask_key.public_key(), ark_key, serial=2)
        asvk = amd_cert(amd_name(f"SEV-VLEK-{p}"), ark_name, asvk_key.public_key(), ark_key, serial=3)
        return cls(product, ark_key, ask_key, asvk_key, ark, ask, asvk)

    def trust(self) -> TrustStore:
        return TrustStore(
            amd={self.product: AmdRoots(self.product, self.ark, self.ask, self.asvk)}, intel_root=None
        )

    def vcek(self, tcb: TcbParts, hwid: bytes, **kw: object) -> x509.Certificate:
        exts = vcek_extensions(self.product, tcb, hwid=hwid)
        issuer = amd_name(f"SEV-{self.product.value}")
        return amd_cert(
            amd_name("SEV-VCEK"), issuer, self.leaf_key.public_key(), self.ask_key, extensions=exts, **kw
        )  # type: ignore[arg-type]

    def vlek(self, tcb: TcbParts, **kw: object) -> x509.Certificate:
        exts = vcek_extensions(self.product, tcb, csp_id="CN=example-csp")
        issuer = amd_name(f"SEV-VLEK-{self.product.value}")
        return amd_cert(
            amd_name("SEV-VLEK"), issuer, self.leaf_key.public_key(), self.asvk_key, extensions=exts, **kw
        )  # type: ignore[arg-type]

    def crl(self, revoked_serials: tuple[int, ...], signer: rsa.RSAPrivateKey | None = None) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ark.subject)
            .last_update(NOW - timedelta(days=1))
            .next_update(NOW + timedelta(days=30))
        )
        for serial in revoked_serials:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(NOW - timedelta(days=1))
            )
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(signer or self.ark_key, hashes.SHA384(), rsa_padding=AMD_PSS)
        return crl.public_bytes(Encoding.DER)


def snp_report(
    key: ec.EllipticCurvePrivateKey,
    product: Product,
    tcb: TcbParts,
    *,
    chip_id: bytes = b"\x5a" * 64,
    signing_key: int = layout.SIGNING_KEY_VCEK,
    mask_chip_key: bool = False,
    current_tcb: TcbParts | None = None,
    **fields: object,
) -> bytes:
    """A signed report for `product` (v3 with that product's CPUID, v5 for Turin)."""
    cpuid = {Product.MILAN: (0x19, 0x01, 1), Product.GENOA: (0x19, 0x11, 1), Product.TURIN: (0x1A, 0x02, 1)}[
        product
    ]
    raw_tcb = tcb.encode(product)
    values: dict[str, object] = {
        "version": 5 if product is Product.TURIN else 3,
        "policy": layout.DEFAULT_GUEST_POLICY,
        "signature_algo": layout.SIG_ALGO_ECDSA_P384_SHA384,
        "current_tcb": (current_tcb or tcb).encode(product),
        "committed_tcb": (current_tcb or tcb).encode(product),
        "reported_tcb": raw_tcb,
        "launch_tcb": raw_tcb,
        "signer_info": (signing_key << layout.SIGNING_KEY_SHIFT)
        | (layout.SIGNER_MASK_CHIP_KEY if mask_chip_key else 0),
        "chip_id": bytes(64) if mask_chip_key else chip_id,
        "cpuid_fam_id": cpuid[0],
        "cpuid_mod_id": cpuid[1],
        "cpuid_step": cpuid[2],
        "measurement": b"\x42" * 48,
        "current_major": 1,
        "current_minor": 55,
        "committed_major": 1,
        "committed_minor": 55,
    }
    values.update(fields)
    return sign_report(layout.encode_report(**values), key)

"""Synthetic AMD- and Intel-shaped certificate hierarchies, built with `cryptography` for negative tests.

No real fixture is revoked, expired at a convenient time, or signed by the wrong issuer, so these hierarchies
stand in for the PKI (not for the verifier): same names, algorithms (RSA-PSS SHA-384 salt 48 + P-384 for AMD;
P-256 ECDSA-SHA256 for Intel), extensions and wire formats as the real ones (spec/attestation.md §1.7, §1.8,
§3.5, §3.7). RSA keys are 2048-bit (AMD's are 4096) to keep key generation fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from cwbuild.attest import snp_report as layout
from cwbuild.attest import tdx_quote as q
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


def crl_builder(
    issuer: x509.Name, revoked: tuple[int, ...], *, next_update: datetime = NOW + timedelta(days=30)
) -> x509.CertificateRevocationListBuilder:
    """An unsigned CRL of `issuer` issued a day before NOW, listing `revoked` (revoked a day before NOW)."""
    day_before = NOW - timedelta(days=1)
    builder = x509.CertificateRevocationListBuilder().issuer_name(issuer)
    builder = builder.last_update(day_before).next_update(next_update)
    for serial in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(day_before)
        builder = builder.add_revoked_certificate(entry.build())
    return builder


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
        builder = crl_builder(self.ark.subject, revoked_serials)
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


# --- Intel -------------------------------------------------------------------------------------------------

SGX = "1.2.840.113741.1.13.1"


def intel_name(cn: str) -> x509.Name:
    """§5: CN=..., O=Intel Corporation, L=Santa Clara, ST=CA, C=US."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def sgx_extension(fmspc: bytes, pceid: bytes, sgx_svns: tuple[int, ...], pcesvn: int) -> bytes:
    """§3.5: SEQUENCE of {OID, value}: PPID, TCB {comp 1..16, PCESVN, CPUSVN}, PCE-ID, FMSPC, SGX type."""
    comps = [seq(der_oid(f"{SGX}.2.{i + 1}"), der_int(svn)) for i, svn in enumerate(sgx_svns)]
    tcb = seq(
        *comps,
        seq(der_oid(f"{SGX}.2.17"), der_int(pcesvn)),
        seq(der_oid(f"{SGX}.2.18"), tlv(0x04, bytes(16))),
    )
    return seq(
        seq(der_oid(f"{SGX}.1"), tlv(0x04, b"\x01" * 16)),
        seq(der_oid(f"{SGX}.2"), tcb),
        seq(der_oid(f"{SGX}.3"), tlv(0x04, pceid)),
        seq(der_oid(f"{SGX}.4"), tlv(0x04, fmspc)),
        seq(der_oid(f"{SGX}.5"), tlv(0x0A, b"\x00")),
    )


def intel_cert(
    cn: str,
    key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    *,
    serial: int = 1,
    not_after: datetime = NOW + YEAR,
    ca: bool = False,
    sgx: bytes | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(intel_name(cn))
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(NOW - YEAR)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sgx is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX), sgx), False)
    return builder.sign(signer, hashes.SHA256())


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rs(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 as r||s big-endian (§3.3)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


FMSPC = bytes.fromhex("00906ed50000")
PCEID = bytes(2)
QE_MRSIGNER = b"\xdc" * 32
QE_ATTRIBUTES = bytes.fromhex("11" + "00" * 15)


@dataclass
class IntelPki:
    """Root -> PCK Platform CA -> PCK, Root -> TCB Signing; quotes and collateral signed with them."""

    root_key: ec.EllipticCurvePrivateKey = field(default_factory=p256)
    inter_key: ec.EllipticCurvePrivateKey = field(default_factory=p256)
    pck_key: ec.EllipticCurvePrivateKey = field(default_factory=p256)
    tcb_key: ec.EllipticCurvePrivateKey = field(default_factory=p256)
    att_key: ec.EllipticCurvePrivateKey = field(default_factory=p256)
    sgx_svns: tuple[int, ...] = (5,) * 16
    pcesvn: int = 11

    def __post_init__(self) -> None:
        root_name = intel_name("Intel SGX Root CA")
        self.root = intel_cert(
            "Intel SGX Root CA", self.root_key.public_key(), root_name, self.root_key, ca=True
        )
        self.inter = intel_cert(
            "Intel SGX PCK Platform CA",
            self.inter_key.public_key(),
            root_name,
            self.root_key,
            serial=2,
            ca=True,
        )
        self.tcb_signing = intel_cert(
            "Intel SGX TCB Signing", self.tcb_key.public_key(), root_name, self.root_key, serial=3
        )
        self.pck = self.make_pck()

    def make_pck(
        self, *, signer: ec.EllipticCurvePrivateKey | None = None, not_after: datetime = NOW + YEAR
    ) -> x509.Certificate:
        sgx = sgx_extension(FMSPC, PCEID, self.sgx_svns, self.pcesvn)
        issuer = intel_name("Intel SGX PCK Platform CA")
        key = self.pck_key.public_key()
        return intel_cert(
            "Intel SGX PCK Certificate",
            key,
            issuer,
            signer or self.inter_key,
            serial=0x77,
            not_after=not_after,
            sgx=sgx,
        )

    def trust(self) -> TrustStore:
        return TrustStore(amd={}, intel_root=self.root)

    def quote(
        self,
        *,
        version: int = 4,
        body_type: int = 2,
        tee_tcb_svn: bytes = bytes([3, 1] + [5] * 14),
        td_attributes: int = 1 << 28,
        qe_isv_svn: int = 4,
        auth: bytes = b"\xaa" * 32,
        bound_auth: bytes | None = None,
        chain: bytes | None = None,
    ) -> bytes:
        header = q.HEADER.pack(version, 2, 0x81, 0, q.INTEL_QE_VENDOR_ID, bytes(20))
        body = q.BODY_TDX10.pack(
            tee_tcb_svn, b"\x01" * 48, bytes(48), bytes(8), td_attributes, 0xE7, b"\x11" * 48, bytes(48),
            bytes(48), bytes(48), b"\x21" * 48, b"\x22" * 48, b"\x23" * 48, bytes(48), b"\x33" * 64,
        )  # fmt: skip
        if body_type == 3:
            body += q.BODY_TDX15_EXTRA.pack(bytes(16), b"\x44" * 48)
        signed = header + body if version == 4 else header + q.V5_DESCRIPTOR.pack(body_type, len(body)) + body
        att_raw = self.att_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
        binding = hashlib.sha256(att_raw + (auth if bound_auth is None else bound_auth)).digest() + bytes(32)
        qe_report = q.QE_REPORT.pack(
            bytes(16), 0, bytes(12), bytes(16), QE_ATTRIBUTES, b"\x99" * 32, bytes(32), QE_MRSIGNER,
            bytes(32), bytes(64), 2, qe_isv_svn, 0, bytes(42), bytes(16), binding,
        )  # fmt: skip
        chain = pem(self.pck, self.inter, self.root) + b"\x00" if chain is None else chain
        inner = (
            qe_report
            + rs(self.pck_key, qe_report)
            + q.AUTH_SIZE.pack(len(auth))
            + auth
            + q.CERT_HEADER.pack(5, len(chain))
            + chain
        )
        sig_data = rs(self.att_key, signed) + att_raw + q.CERT_HEADER.pack(6, len(inner)) + inner
        return signed + q.SIG_LEN_FIELD.pack(len(sig_data)) + sig_data + bytes(70)

    def crl(
        self,
        issuer_key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate,
        revoked: tuple[int, ...],
        *,
        next_update: datetime = NOW + timedelta(days=30),
    ) -> bytes:
        builder = crl_builder(issuer.subject, revoked, next_update=next_update)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(Encoding.DER)

    def collateral(
        self,
        *,
        platform_levels: tuple[tuple[int, int, int, str], ...] = (
            (5, 11, 5, "UpToDate"),
            (3, 10, 3, "OutOfDate"),
        ),
        module_levels: tuple[tuple[int, str], ...] = ((3, "UpToDate"), (2, "OutOfDate")),
        qe_mrsigner: bytes = QE_MRSIGNER,
        fmspc: bytes = FMSPC,
        revoked_pck: tuple[int, ...] = (),
        revoked_inter: tuple[int, ...] = (),
        signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
        next_update: datetime = NOW + timedelta(days=30),
    ) -> bytes:
        """An offline bundle (§3.7). Levels: (sgx svn, pcesvn, tdx svn, status); module (isvsvn, status)."""
        dates = {"issueDate": _iso(NOW - timedelta(days=1)), "nextUpdate": _iso(next_update)}
        levels = [
            {
                "tcb": {
                    "sgxtcbcomponents": [{"svn": sgx}] * 16,
                    "pcesvn": pce,
                    "tdxtcbcomponents": [{"svn": tdx}] * 16,
                },
                "tcbDate": "2024-03-13T00:00:00Z",
                "tcbStatus": status,
                "advisoryIDs": [] if status == "UpToDate" else ["INTEL-SA-00000"],
            }
            for sgx, pce, tdx, status in platform_levels
        ]
        module = {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8}
        tcb_info = {
            "id": "TDX", "version": 3, **dates, "fmspc": fmspc.hex().upper(), "pceId": PCEID.hex(),
            "tcbType": 0, "tcbEvaluationDataNumber": 17, "tdxModule": module,
            "tdxModuleIdentities": [
                {"id": "TDX_01", **module, "tcbLevels": [
                    {"tcb": {"isvsvn": svn}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": st}
                    for svn, st in module_levels
                ]},
            ],
            "tcbLevels": levels,
        }  # fmt: skip
        qe_identity = {
            "id": "TD_QE", "version": 2, **dates, "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
            "attributes": QE_ATTRIBUTES.hex(), "attributesMask": "FBFFFFFFFFFFFFFF" + "00" * 8,
            "mrsigner": qe_mrsigner.hex().upper(), "isvprodid": 2,
            "tcbLevels": [{"tcb": {"isvsvn": 4}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"}],
        }  # fmt: skip
        key, cert = signer or (self.tcb_key, self.tcb_signing)
        tcb_text = json.dumps(tcb_info, separators=(",", ":"))
        qe_text = json.dumps(qe_identity, separators=(",", ":"))
        chain = pem(cert, self.root).decode()
        bundle = {
            "tcb_info_issuer_chain": chain,
            "tcb_info": tcb_text,
            "tcb_info_signature": rs(key, tcb_text.encode()).hex(),
            "qe_identity_issuer_chain": chain,
            "qe_identity": qe_text,
            "qe_identity_signature": rs(key, qe_text.encode()).hex(),
            "pck_crl_issuer_chain": pem(self.inter, self.root).decode(),
            "pck_crl": self.crl(self.inter_key, self.inter, revoked_pck, next_update=next_update).hex(),
            "root_ca_crl": self.crl(self.root_key, self.root, revoked_inter, next_update=next_update).hex(),
        }
        return json.dumps(bundle).encode()


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

"""The Intel TDX quote (v4 and v5): one declared layout per part, a strict bounded parser.

Layouts: spec/attestation.md §3.1 (header, IDCAP sgx_quote4_header_t), §3.2 (TD report bodies,
sgx_report2_body_t / _v1_5_t, and the v5 body descriptor of sgx_quote5_t), §3.3 (ECDSA-256 quote auth data v4,
sgx_ecdsa_sig_data_v4_t and sgx_qe_report_certification_data_t), §3.4 (QE report, sgx_report_body_t).
All integers little-endian; signatures and keys big-endian. Bytes after the declared signature data are
ignored (§3.3: real quotes carry 39, 70 or 3065 trailing bytes). The exact input is kept in `raw`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cwbuild.errors import FormatError

MAX_QUOTE_LEN = 1 << 20  # no real quote comes near 1 MiB (fixtures: 4.9-8 KiB); larger input is refused

HEADER = struct.Struct("<HHII16s20s")  # §3.1: 48 bytes
VERSIONS = frozenset({4, 5})  # §3.1
ATT_KEY_TYPE_ECDSA_P256 = 2  # §3.1; IQVL ALLOWED_ATTESTATION_KEY_TYPES
TEE_TYPE_TDX = 0x00000081  # §3.1
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")  # §3.1, IQVL INTEL_QE_VENDOR_ID

V4_BODY_OFFSET = 48  # §3.2
V5_DESCRIPTOR = struct.Struct("<HI")  # §3.2: u16 body_type at 48, u32 body_size at 50
V5_BODY_OFFSET = 54
BODY_TYPE_TDX10, BODY_TYPE_TDX15 = 2, 3  # §3.2
BODY_TDX10_LEN, BODY_TDX15_LEN = 584, 648  # §3.2
BODY_TDX10 = struct.Struct("<16s48s48s8sQQ48s48s48s48s48s48s48s48s64s")  # §3.2 table, offsets 0..583
BODY_TDX15_EXTRA = struct.Struct("<16s48s")  # §3.2: TEE_TCB_SVN2 at 584, MRSERVICETD at 600

SIG_LEN_FIELD = struct.Struct("<I")
ECDSA_SIG_LEN = 64  # §3.3: r||s, 32 bytes each, big-endian
ATT_KEY_LEN = 64  # §3.3: X||Y, big-endian, no 0x04 prefix
CERT_HEADER = struct.Struct("<HI")  # §3.3: u16 certification data type, u32 size
CERT_TYPE_QE_REPORT = 6  # §3.3 PCK_ID_QE_REPORT_CERTIFICATION_DATA
CERT_TYPE_PCK_CHAIN = 5  # §3.3 PCK cert chain
QE_REPORT_LEN = 384  # §3.4
QE_REPORT = struct.Struct("<16sI12s16s16s32s32s32s32s64sHHH42s16s64s")  # §3.4 table
AUTH_SIZE = struct.Struct("<H")

if BODY_TDX10.size != BODY_TDX10_LEN or BODY_TDX10.size + BODY_TDX15_EXTRA.size != BODY_TDX15_LEN:
    raise ImportError("TDX body layout size")  # pragma: no cover - checked at import (STYLE.md rule 3)
if QE_REPORT.size != QE_REPORT_LEN or HEADER.size != 48:
    raise ImportError("TDX QE report / header layout size")  # pragma: no cover

# §3.2 TD_ATTRIBUTES bits (GTG validate.go)
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
TD_ATTR_PKS = 1 << 30
TD_ATTR_PERFMON = 1 << 63


@dataclass(frozen=True)
class TdBody:
    """The TD report body (TDX 1.0, or 1.5 with the two extra fields)."""

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: int
    xfam: int
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None


@dataclass(frozen=True)
class QeReport:
    """The fields of the QE's SGX report that verification uses (§3.4); `raw` is what the PCK signed."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@dataclass(frozen=True)
class TdxQuote:
    """A parsed quote. `signed` is header+body (what the attestation key signed, §3.6 step 4)."""

    raw: bytes
    version: int
    att_key_type: int
    tee_type: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int
    body: TdBody
    signed: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    trailing: int

    @classmethod
    def parse(cls, data: bytes) -> TdxQuote:
        """Parse and check the format (§3.6 step 1); raises FormatError naming the first problem."""
        if len(data) > MAX_QUOTE_LEN:
            raise FormatError(f"TDX quote larger than {MAX_QUOTE_LEN} bytes")
        reader = _Reader(bytes(data))
        version, key_type, tee_type, _reserved, vendor, user_data = HEADER.unpack(
            reader.take(HEADER.size, "header")
        )
        _check_header(version, key_type, tee_type, vendor)
        body_type, body_raw = _read_body(reader, version)
        signed = reader.data[: reader.pos]
        sig_len = SIG_LEN_FIELD.unpack(reader.take(4, "signature data length"))[0]
        sig = _Reader(reader.take(sig_len, "signature data"))
        sd = _parse_signature_data(sig)
        return cls(
            raw=reader.data,
            version=version,
            att_key_type=key_type,
            tee_type=tee_type,
            qe_vendor_id=vendor,
            user_data=user_data,
            body_type=body_type,
            body=_parse_body(body_raw),
            signed=signed,
            trailing=len(reader.data) - reader.pos,
            signature=sd.signature,
            attestation_key=sd.attestation_key,
            qe_report=sd.qe_report,
            qe_report_signature=sd.qe_report_signature,
            qe_auth_data=sd.qe_auth_data,
            pck_chain_pem=sd.pck_chain_pem,
        )


class _Reader:
    """Sequential bounded reads over bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError(f"TDX quote truncated in the {what} ({n} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _check_header(version: int, key_type: int, tee_type: int, vendor: bytes) -> None:
    if version not in VERSIONS:
        raise FormatError(f"TDX quote version {version} is not supported (4, 5)")
    if key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise FormatError(f"TDX attestation key type {key_type} is not ECDSA P-256 (2)")
    if tee_type != TEE_TYPE_TDX:
        raise FormatError(f"TEE type {tee_type:#x} is not TDX (0x81)")
    if vendor != INTEL_QE_VENDOR_ID:
        raise FormatError(f"QE vendor id {vendor.hex()} is not Intel's")


def _read_body(reader: _Reader, version: int) -> tuple[int, bytes]:
    if version == 4:
        return BODY_TYPE_TDX10, reader.take(BODY_TDX10_LEN, "TD report body")
    body_type, size = V5_DESCRIPTOR.unpack(reader.take(V5_DESCRIPTOR.size, "body descriptor"))
    expected = {BODY_TYPE_TDX10: BODY_TDX10_LEN, BODY_TYPE_TDX15: BODY_TDX15_LEN}.get(body_type)
    if expected is None:
        raise FormatError(f"TDX quote v5 body type {body_type} is not a TD report (2, 3)")
    if size != expected:
        raise FormatError(f"TDX quote v5 body type {body_type} has size {size}, expected {expected}")
    return body_type, reader.take(size, "TD report body")


def _parse_body(raw: bytes) -> TdBody:
    v = BODY_TDX10.unpack(raw[:BODY_TDX10_LEN])
    svn2 = servicetd = None
    if len(raw) == BODY_TDX15_LEN:
        svn2, servicetd = BODY_TDX15_EXTRA.unpack(raw[BODY_TDX10_LEN:])
    return TdBody(
        tee_tcb_svn=v[0],
        mrseam=v[1],
        mrsignerseam=v[2],
        seam_attributes=v[3],
        td_attributes=v[4],
        xfam=v[5],
        mrtd=v[6],
        mrconfigid=v[7],
        mrowner=v[8],
        mrownerconfig=v[9],
        rtmrs=(v[10], v[11], v[12], v[13]),
        report_data=v[14],
        tee_tcb_svn2=svn2,
        mrservicetd=servicetd,
    )


@dataclass(frozen=True)
class _SignatureData:
    signature: bytes
    attestation_key: bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes


def _parse_signature_data(sig: _Reader) -> _SignatureData:
    """§3.3: signature, attestation key, type-6 QE report certification data holding the type-5 PCK chain."""
    signature = sig.take(ECDSA_SIG_LEN, "quote signature")
    att_key = sig.take(ATT_KEY_LEN, "attestation key")
    cert_type, size = CERT_HEADER.unpack(sig.take(CERT_HEADER.size, "certification data header"))
    if cert_type != CERT_TYPE_QE_REPORT:
        raise FormatError(f"certification data type {cert_type} is not QE report certification data (6)")
    inner = _Reader(sig.take(size, "QE report certification data"))
    if sig.left:
        raise FormatError(f"{sig.left} bytes after the certification data inside the signature data")
    qe_raw = inner.take(QE_REPORT_LEN, "QE report")
    qe_sig = inner.take(ECDSA_SIG_LEN, "QE report signature")
    auth_len = AUTH_SIZE.unpack(inner.take(AUTH_SIZE.size, "QE auth data size"))[0]
    auth = inner.take(auth_len, "QE auth data")
    chain_type, chain_len = CERT_HEADER.unpack(inner.take(CERT_HEADER.size, "PCK certification data header"))
    if chain_type != CERT_TYPE_PCK_CHAIN:
        raise FormatError(f"inner certification data type {chain_type} is not a PCK chain (5)")
    chain = inner.take(chain_len, "PCK certificate chain")
    if inner.left:
        raise FormatError(f"{inner.left} bytes after the PCK chain inside the certification data")
    return _SignatureData(signature, att_key, _parse_qe_report(qe_raw), qe_sig, auth, chain)


def _parse_qe_report(raw: bytes) -> QeReport:
    v = QE_REPORT.unpack(raw)
    return QeReport(
        raw=raw,
        cpu_svn=v[0],
        misc_select=v[1],
        attributes=v[4],
        mr_enclave=v[5],
        mr_signer=v[7],
        isv_prod_id=v[10],
        isv_svn=v[11],
        report_data=v[15],
    )

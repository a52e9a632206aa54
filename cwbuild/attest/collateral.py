"""Intel TDX offline collateral: TCB info, QE identity, CRLs; their signatures, and the TCB status they give.

spec/attestation.md §3.7 (PCS v4 responses, the offline bundle, signatures over the exact JSON bytes),
§3.6 steps 7-9 (what is checked) and §3.8 (TCB-level matching). The bundle is the JSON object of
Phala dcap-qvl's QuoteCollateralV3: `tcb_info` and `qe_identity` are JSON *strings* holding the signed bytes,
signatures are hex r||s, CRLs hex DER, issuer chains PEM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cwbuild.attest.intel_certs import TCB_SIGNING_CN, PckInfo, verify_intel_chain
from cwbuild.attest.tdx_quote import QeReport, TdBody
from cwbuild.attest.tdx_tcb import match_platform, match_qe
from cwbuild.attest.trust import TrustStore, cn, der_digest
from cwbuild.attest.verdict import Findings
from cwbuild.errors import FormatError

MAX_COLLATERAL_LEN = 1 << 20  # the Phala bundle is 16 KiB; 1 MiB bounds hostile input
TCB_INFO_ID, TCB_INFO_VERSION = "TDX", 3  # §3.6 step 8
QE_ID, QE_VERSION = "TD_QE", 2  # §3.6 step 9
_SIG_LEN = 64  # §3.7: raw r||s, P-256


@dataclass(frozen=True)
class Collateral:
    """The offline bundle (§3.7). `tcb_info` / `qe_identity` are the exact signed JSON bytes."""

    tcb_info: bytes
    tcb_info_signature: bytes
    tcb_info_issuer_chain: bytes
    qe_identity: bytes
    qe_identity_signature: bytes
    qe_identity_issuer_chain: bytes
    pck_crl: bytes | None = None
    root_ca_crl: bytes | None = None

    @classmethod
    def from_json(cls, data: bytes) -> Collateral:
        """Parse the bundle; FormatError names the first bad key."""
        if len(data) > MAX_COLLATERAL_LEN:
            raise FormatError("collateral bundle larger than 1 MiB")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"collateral is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise FormatError("collateral must be a JSON object")
        return cls(
            tcb_info=_text(obj, "tcb_info").encode(),
            tcb_info_signature=_hexval(obj, "tcb_info_signature", _SIG_LEN),
            tcb_info_issuer_chain=_text(obj, "tcb_info_issuer_chain").encode(),
            qe_identity=_text(obj, "qe_identity").encode(),
            qe_identity_signature=_hexval(obj, "qe_identity_signature", _SIG_LEN),
            qe_identity_issuer_chain=_text(obj, "qe_identity_issuer_chain").encode(),
            pck_crl=_hexval(obj, "pck_crl", None) if obj.get("pck_crl") is not None else None,
            root_ca_crl=_hexval(obj, "root_ca_crl", None) if obj.get("root_ca_crl") is not None else None,
        )

    @classmethod
    def from_pcs(
        cls,
        *,
        tcb_info_response: bytes,
        qe_identity_response: bytes,
        issuer_chain: bytes,
        pck_crl: bytes | None = None,
        root_ca_crl: bytes | None = None,
    ) -> Collateral:
        """Build from raw PCS responses (`{"tcbInfo": ..., "signature": ...}`), keeping the exact bytes."""
        tcb, tcb_sig = _signed_member(tcb_info_response, "tcbInfo")
        qe, qe_sig = _signed_member(qe_identity_response, "enclaveIdentity")
        return cls(tcb, tcb_sig, issuer_chain, qe, qe_sig, issuer_chain, pck_crl, root_ca_crl)


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise FormatError(f"collateral: {key} must be a string")
    return value


def _hexval(obj: dict[str, Any], key: str, length: int | None) -> bytes:
    text = _text(obj, key)
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise FormatError(f"collateral: {key} is not hex") from None
    if length is not None and len(raw) != length:
        raise FormatError(f"collateral: {key} must be {length} bytes")
    return raw


def _signed_member(response: bytes, key: str) -> tuple[bytes, bytes]:
    """The exact bytes of `key`'s value in a top-level JSON object, and `signature` (GTG bodyToRawMessage)."""
    try:
        text = response.decode()
    except UnicodeDecodeError:
        raise FormatError("PCS response is not UTF-8") from None
    decoder = json.JSONDecoder()
    members: dict[str, str] = {}
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        raise FormatError("PCS response is not a JSON object")
    pos = _skip(text, pos + 1)
    while pos < len(text) and text[pos] != "}":
        try:
            name, pos = decoder.raw_decode(text, pos)
            pos = _skip(text, pos)
            if not text.startswith(":", pos):
                raise ValueError("expected ':'")
            start = _skip(text, pos + 1)
            _value, end = decoder.raw_decode(text, start)
        except ValueError as exc:
            raise FormatError(f"PCS response is not valid JSON: {exc}") from None
        members[str(name)] = text[start:end]
        pos = _skip(text, end)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
    if key not in members or "signature" not in members:
        raise FormatError(f"PCS response lacks {key} or signature")
    signature = _hexval({"signature": json.loads(members["signature"])}, "signature", _SIG_LEN)
    return members[key].encode(), signature


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise FormatError(f"{what} is not a date string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise FormatError(f"{what} is not an ISO 8601 date") from None


@dataclass(frozen=True)
class TcbResult:
    """What the collateral says about the platform (claims: tcb_status, module/qe statuses, advisories)."""

    status: str | None
    module_status: str | None
    qe_status: str | None
    advisory_ids: tuple[str, ...]
    tcb_date: str | None

    def statuses(self) -> tuple[str | None, ...]:
        return (self.status, self.module_status, self.qe_status)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tcb_status": self.status,
            "module_tcb_status": self.module_status,
            "qe_tcb_status": self.qe_status,
            "advisory_ids": list(self.advisory_ids),
            "tcb_date": self.tcb_date,
        }


def _verify_signed_json(
    signed: tuple[bytes, bytes, bytes], what: str, *, trust: TrustStore, now: datetime, f: Findings
) -> dict[str, Any] | None:
    """(body, signature, issuer chain PEM): the chain [TCB Signing, Root] to the pinned root, then ECDSA
    P-256 over the exact body bytes (§3.7)."""
    body, signature, chain_pem = signed
    try:
        chain = trust.certs(chain_pem)
    except FormatError as exc:
        f.fail("tdx.collateral_malformed", f"{what} issuer chain: {exc.message}")
        return None
    sub = Findings()
    if not verify_intel_chain(
        chain, leaf_cns=frozenset({TCB_SIGNING_CN}), mid_cns=None, trust=trust, now=now, f=sub
    ):
        f.fail(
            "tdx.collateral_signature_invalid",
            f"{what} issuer chain: {'; '.join(x.detail for x in sub.failures)}",
        )
        return None
    for failure in sub.failures:  # expiry of the signing certificate
        f.fail(failure.id, f"{what} issuer chain: {failure.detail}")
    signer = chain[0]
    key_id = der_digest(signer) + signature
    if not trust.memo("collateral-sig", key_id + body, lambda: _signature_ok(signer, signature, body)):
        f.fail("tdx.collateral_signature_invalid", f"{what} signature does not verify")
        return None
    parsed = trust.memo("collateral-json", body, lambda: _json_object(body))  # shared: read-only from here
    if parsed is None:
        f.fail("tdx.collateral_malformed", f"{what} is not a JSON object")
        return None
    return parsed


def _signature_ok(signer: x509.Certificate, signature: bytes, body: bytes) -> bool:
    key = signer.public_key()
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(encode_dss_signature(r, s), body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _check_dates(obj: dict[str, Any], what: str, now: datetime, f: Findings) -> None:
    issued, next_update = _time(obj.get("issueDate"), f"{what} issueDate"), _time(obj.get("nextUpdate"), what)
    if not issued <= now <= next_update:
        f.fail(
            "tdx.collateral_expired",
            f"{what} is valid {obj['issueDate']}..{obj['nextUpdate']}, not at {now:%FT%TZ}",
        )


@dataclass(frozen=True)
class _CrlView:
    """What a CRL says once its signature is checked: validity window and revoked serials (or a failure)."""

    failure: tuple[str, str] | None
    last_update: datetime | None = None
    next_update: datetime | None = None
    revoked: frozenset[int] = frozenset()


def _read_crl(blob: bytes, issuer: x509.Certificate) -> _CrlView:
    """Parse `blob`, check it is issued and signed (ECDSA P-256/SHA-256) by `issuer`."""
    name = cn(issuer.subject)
    try:
        crl = x509.load_der_x509_crl(blob)
        key = issuer.public_key()
        if crl.issuer != issuer.subject:  # e.g. a Processor CA CRL for a Platform CA PCK
            return _CrlView(("tdx.collateral_mismatch", f"the CRL is not issued by {name!r}"))
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return _CrlView(("tdx.collateral_signature_invalid", f"{name!r} has no ECDSA key"))
        key.verify(crl.signature, crl.tbs_certlist_bytes, ec.ECDSA(hashes.SHA256()))
        revoked = frozenset(entry.serial_number for entry in crl)
        return _CrlView(None, crl.last_update_utc, crl.next_update_utc, revoked)
    except InvalidSignature:
        return _CrlView(("tdx.collateral_signature_invalid", f"the CRL of {name!r} does not verify"))
    except (ValueError, UnsupportedAlgorithm):
        return _CrlView(("tdx.collateral_malformed", f"the CRL of {name!r} is not a valid DER CRL"))


def _crl_view(trust: TrustStore, blob: bytes, issuer: x509.Certificate) -> _CrlView:
    return trust.memo("crl", blob + der_digest(issuer), lambda: _read_crl(blob, issuer))


def check_crls(
    collateral: Collateral,
    pck: x509.Certificate,
    intermediate: x509.Certificate,
    *,
    trust: TrustStore,
    now: datetime,
    f: Findings,
) -> None:
    """§3.6 step 7: the root CRL (signed by the root) must not list the intermediate; the PCK CRL (signed by
    the intermediate) must not list the PCK. Each CRL must be current at `now`. Parsing and signature
    checks are memoized in the trust store per (CRL, issuer)."""
    pairs = (
        (collateral.root_ca_crl, trust.intel_root, intermediate),
        (collateral.pck_crl, intermediate, pck),
    )
    for blob, issuer, subject in pairs:
        if blob is None or issuer is None:
            continue
        view = _crl_view(trust, blob, issuer)
        if view.failure is not None:
            f.fail(*view.failure)
            continue
        name = cn(issuer.subject)
        if (
            view.last_update is None
            or now < view.last_update
            or (view.next_update is not None and now > view.next_update)
        ):
            f.fail("tdx.collateral_expired", f"the CRL of {name!r} is not current at {now:%FT%TZ}")
        if subject.serial_number in view.revoked:
            f.fail(
                "tdx.cert_revoked", f"{cn(subject.subject)!r} serial {subject.serial_number:#x} is revoked"
            )


def evaluate(  # noqa: PLR0913 - keyword-only inputs of a pure check
    collateral: Collateral,
    *,
    body: TdBody,
    qe: QeReport,
    pck: PckInfo,
    trust: TrustStore,
    now: datetime,
    f: Findings,
) -> TcbResult | None:
    """Verify TCB info and QE identity and match the quote against them (§3.6 steps 7-9, §3.8)."""
    c = collateral
    tcb_signed = (c.tcb_info, c.tcb_info_signature, c.tcb_info_issuer_chain)
    qe_signed = (c.qe_identity, c.qe_identity_signature, c.qe_identity_issuer_chain)
    tcb_info = _verify_signed_json(tcb_signed, "TCB info", trust=trust, now=now, f=f)
    qe_identity = _verify_signed_json(qe_signed, "QE identity", trust=trust, now=now, f=f)
    if tcb_info is None or qe_identity is None:
        return None
    try:
        _check_dates(tcb_info, "TCB info", now, f)
        _check_dates(qe_identity, "QE identity", now, f)
        platform = match_platform(tcb_info, body=body, pck=pck, f=f)
        qe_status = match_qe(qe_identity, qe=qe, f=f)
    except (FormatError, KeyError, TypeError, ValueError) as exc:
        f.fail("tdx.collateral_malformed", f"collateral content: {exc}")
        return None
    return TcbResult(
        status=platform[0], module_status=platform[1], qe_status=qe_status, advisory_ids=platform[2],
        tcb_date=platform[3],
    )  # fmt: skip

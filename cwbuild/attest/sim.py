"""The simulated TEE signer (DESIGN.md "Simulated TEE"): software-signed reports in the SNP layout.

For development and CI only. The signer runs on the host (`cwbuild run --tee sim`); the endpoint trusts its
public key only when started with `--insecure-sim-trust PUBKEY`, and only for `tee: sim` workloads. The
reports are version 3 ATTESTATION_REPORTs (spec/attestation.md §1.1) signed the way the AMD firmware signs:
ECDSA P-384 / SHA-384 over bytes 0x0..0x29F, R and S little-endian in 72-byte fields.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cwbuild.attest import snp_report as layout
from cwbuild.errors import FormatError

#: CPUID of the simulated part: family 19h model 01h stepping 1, a Milan-B1 (§1.6), so the legacy TCB layout.
SIM_CPUID = (0x19, 0x01, 0x01)
#: The TCB the simulated firmware claims (Milan layout, §1.5): bl 3, tee 0, snp 8, ucode 115.
SIM_TCB = bytes([3, 0, 0, 0, 0, 0, 8, 115])
#: Firmware version 1.55.29 (major.minor.build), as in a real Milan v3 report.
SIM_FIRMWARE = (1, 55, 29)


def generate_sim_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-384 signing key for the simulated TEE."""
    return ec.generate_private_key(ec.SECP384R1())


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The SubjectPublicKeyInfo PEM the endpoint's `--insecure-sim-trust` takes."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(serialization.Encoding.PEM, spki)


def load_sim_public_key(pem_or_der: bytes) -> ec.EllipticCurvePublicKey:
    """Load a sim public key (PEM or DER SPKI); FormatError unless it is P-384."""
    try:
        if pem_or_der.lstrip().startswith(b"-----"):
            key = serialization.load_pem_public_key(pem_or_der)
        else:
            key = serialization.load_der_public_key(pem_or_der)
    except ValueError as exc:
        raise FormatError(f"sim public key is not a PEM/DER public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise FormatError("sim public key must be ECDSA P-384")
    return key


def sim_report(  # noqa: PLR0913 - keyword-only report fields
    *,
    measurement: bytes,
    report_data: bytes,
    key: ec.EllipticCurvePrivateKey,
    policy: int = layout.DEFAULT_GUEST_POLICY,
    vmpl: int = 0,
    host_data: bytes = bytes(32),
    report_id: bytes = bytes(32),
) -> bytes:
    """A signed v3 SNP report (1184 bytes) with the given fields; see the module docstring."""
    if len(measurement) != 48 or len(report_data) != 64 or len(host_data) != 32 or len(report_id) != 32:
        raise ValueError("measurement 48, report_data 64, host_data 32, report_id 32 bytes")
    if not isinstance(key.curve, ec.SECP384R1):
        raise ValueError("the sim key must be P-384")
    fam, mod, step = SIM_CPUID
    major, minor, build = SIM_FIRMWARE
    body = layout.encode_report(
        version=3,
        policy=policy,
        vmpl=vmpl,
        signature_algo=layout.SIG_ALGO_ECDSA_P384_SHA384,
        current_tcb=SIM_TCB,
        platform_info=0x1,  # SMT_EN (§1.4)
        signer_info=layout.SIGNING_KEY_VCEK << layout.SIGNING_KEY_SHIFT,
        report_data=report_data,
        measurement=measurement,
        host_data=host_data,
        report_id=report_id,
        report_id_ma=b"\xff" * 32,  # §1.1: all ones when there is no migration agent
        reported_tcb=SIM_TCB,
        cpuid_fam_id=fam,
        cpuid_mod_id=mod,
        cpuid_step=step,
        committed_tcb=SIM_TCB,
        current_major=major,
        current_minor=minor,
        current_build=build,
        committed_major=major,
        committed_minor=minor,
        committed_build=build,
        launch_tcb=SIM_TCB,
    )
    return sign_report(body, key)


def sign_report(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """`report` with its signature field replaced: ECDSA P-384/SHA-384 over bytes 0x0..0x29F, R and S
    little-endian in 72-byte fields (spec §1.1). Also used by tests to sign with synthetic VCEKs."""
    if len(report) != layout.REPORT_LEN:
        raise ValueError(f"an SNP report is {layout.REPORT_LEN} bytes")
    der_sig = key.sign(report[: layout.SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der_sig)
    width = layout.SIG_COMPONENT_LEN
    return (
        report[: layout.SIGNED_LEN]
        + r.to_bytes(width, "little")
        + s.to_bytes(width, "little")
        + report[layout.SIGNED_LEN + 2 * width :]
    )

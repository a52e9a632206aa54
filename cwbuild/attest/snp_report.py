"""The AMD SEV-SNP ATTESTATION_REPORT: one declared layout, a strict parser and an encoder.

Layout: spec/attestation.md §1.1 (AMD SEV-SNP Firmware ABI #56860, Table "ATTESTATION_REPORT Structure";
go-sev-guest abi.go ReportToProto; virtee/sev snp.rs). All integers little-endian. The parsed view keeps the
exact input bytes beside it (`raw`), and the signature is always checked over `raw[:SIGNED_LEN]`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from cwbuild.attest.tcb import Product, TcbParts
from cwbuild.errors import FormatError

REPORT_LEN = 0x4A0  # §1.1: 1184 bytes
SIGNED_LEN = 0x2A0  # §1.1: the signature covers bytes 0x000..0x29F
SIG_COMPONENT_LEN = 72  # §1.1: R at 0x2A0 and S at 0x2E8, 72 bytes each, little-endian
P384_LEN = 48  # a P-384 scalar; the upper 72-48 = 24 bytes of R and S must be zero
VERSIONS = frozenset({2, 3, 4, 5})  # §1.1: go-sev-guest accepts 2..5
SIG_ALGO_ECDSA_P384_SHA384 = 1  # §1.1 SIGNATURE_ALGO (GSG SignEcdsaP384Sha384)

# §1.1 signer info at 0x48 (GSG ParseSignerInfo)
SIGNER_AUTHOR_KEY_EN = 1 << 0
SIGNER_MASK_CHIP_KEY = 1 << 1
SIGNING_KEY_SHIFT, SIGNING_KEY_MASK = 2, 0x7
SIGNING_KEY_VCEK, SIGNING_KEY_VLEK, SIGNING_KEY_NONE = 0, 1, 7
SIGNER_MBZ_MASK = 0xFFFFFFE0  # bits 31:5

# §1.3 guest POLICY bits (GSG ParseSnpPolicy, policy*Bit)
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17  # must be 1
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20
POLICY_MBZ_MASK = ~((1 << 26) - 1) & 0xFFFFFFFFFFFFFFFF  # bits 63:26
DEFAULT_GUEST_POLICY = POLICY_RESERVED_ONE | POLICY_SMT  # 0x30000: SMT allowed, debug off (QEMU default)

# (name, struct code); offsets in the comments are §1.1's. Reserved fields are named by offset.
_FIELDS: tuple[tuple[str, str], ...] = (
    ("version", "I"),  # 0x000
    ("guest_svn", "I"),  # 0x004
    ("policy", "Q"),  # 0x008
    ("family_id", "16s"),  # 0x010
    ("image_id", "16s"),  # 0x020
    ("vmpl", "I"),  # 0x030
    ("signature_algo", "I"),  # 0x034
    ("current_tcb", "8s"),  # 0x038
    ("platform_info", "Q"),  # 0x040
    ("signer_info", "I"),  # 0x048
    ("reserved_0x4c", "I"),  # 0x04C
    ("report_data", "64s"),  # 0x050
    ("measurement", "48s"),  # 0x090
    ("host_data", "32s"),  # 0x0C0
    ("id_key_digest", "48s"),  # 0x0E0
    ("author_key_digest", "48s"),  # 0x110
    ("report_id", "32s"),  # 0x140
    ("report_id_ma", "32s"),  # 0x160
    ("reported_tcb", "8s"),  # 0x180
    ("cpuid_fam_id", "B"),  # 0x188 (v3+)
    ("cpuid_mod_id", "B"),  # 0x189 (v3+)
    ("cpuid_step", "B"),  # 0x18A (v3+)
    ("reserved_0x18b", "21s"),  # 0x18B
    ("chip_id", "64s"),  # 0x1A0
    ("committed_tcb", "8s"),  # 0x1E0
    ("current_build", "B"),  # 0x1E8
    ("current_minor", "B"),  # 0x1E9
    ("current_major", "B"),  # 0x1EA
    ("reserved_0x1eb", "B"),  # 0x1EB
    ("committed_build", "B"),  # 0x1EC
    ("committed_minor", "B"),  # 0x1ED
    ("committed_major", "B"),  # 0x1EE
    ("reserved_0x1ef", "B"),  # 0x1EF
    ("launch_tcb", "8s"),  # 0x1F0
    ("launch_mit_vector", "Q"),  # 0x1F8 (v5)
    ("current_mit_vector", "Q"),  # 0x200 (v5)
    ("reserved_0x208", "152s"),  # 0x208
    ("signature_r", "72s"),  # 0x2A0
    ("signature_s", "72s"),  # 0x2E8
    ("reserved_0x330", "368s"),  # 0x330
)
_STRUCT = struct.Struct("<" + "".join(code for _, code in _FIELDS))
_NAMES = tuple(name for name, _ in _FIELDS)
if _STRUCT.size != REPORT_LEN:  # pragma: no cover - checked at import (STYLE.md rule 3)
    raise ImportError(f"SNP report layout is {_STRUCT.size} bytes, expected {REPORT_LEN}")


@dataclass(frozen=True)
class SnpReport:
    """A parsed ATTESTATION_REPORT. `raw` is the exact input; fields are its decoded view."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: bytes
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: bytes
    cpuid_fam_id: int
    cpuid_mod_id: int
    cpuid_step: int
    chip_id: bytes
    committed_tcb: bytes
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: bytes
    launch_mit_vector: int
    current_mit_vector: int
    signature_r: bytes
    signature_s: bytes

    @classmethod
    def parse(cls, data: bytes) -> SnpReport:
        """Parse and check the format (§1.10 step 1); raises FormatError naming the first problem."""
        if len(data) != REPORT_LEN:
            raise FormatError(f"SNP report must be {REPORT_LEN} bytes, got {len(data)}")
        values = dict(zip(_NAMES, _STRUCT.unpack(data), strict=True))
        _check_format(values)
        kept = {k: v for k, v in values.items() if not k.startswith("reserved_")}
        return cls(raw=bytes(data), **kept)

    @property
    def signed(self) -> bytes:
        return self.raw[:SIGNED_LEN]

    @property
    def signing_key(self) -> int:
        """0 VCEK, 1 VLEK, 7 none (§1.1 signer info bits 4:2)."""
        return (self.signer_info >> SIGNING_KEY_SHIFT) & SIGNING_KEY_MASK

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.signer_info & SIGNER_MASK_CHIP_KEY)

    @property
    def author_key_en(self) -> bool:
        return bool(self.signer_info & SIGNER_AUTHOR_KEY_EN)

    @property
    def cpuid_product(self) -> Product | None:
        """The product the v3+ CPUID fields name (None for v2 or an unknown model) (§1.6)."""
        if self.version < 3:
            return None
        return Product.from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    def policy_flags(self) -> dict[str, Any]:
        """The guest policy decoded (§1.3)."""
        return {
            "abi": f"{(self.policy >> 8) & 0xFF}.{self.policy & 0xFF}",
            "smt": bool(self.policy & POLICY_SMT),
            "migrate_ma": bool(self.policy & POLICY_MIGRATE_MA),
            "debug": bool(self.policy & POLICY_DEBUG),
            "single_socket": bool(self.policy & POLICY_SINGLE_SOCKET),
        }

    @property
    def abi(self) -> tuple[int, int]:
        return (self.policy >> 8) & 0xFF, self.policy & 0xFF

    def tcbs(self, product: Product) -> dict[str, TcbParts]:
        """Every TCB_VERSION of the report decoded in `product`'s layout (§1.5)."""
        return {
            "current": TcbParts.decode(self.current_tcb, product),
            "reported": TcbParts.decode(self.reported_tcb, product),
            "committed": TcbParts.decode(self.committed_tcb, product),
            "launch": TcbParts.decode(self.launch_tcb, product),
        }


def _check_format(v: dict[str, Any]) -> None:
    """§1.10 step 1: version, algorithm, MBZ ranges, policy bit 17 and bits 63:26, signer bits 31:5."""
    if v["version"] not in VERSIONS:
        raise FormatError(f"SNP report version {v['version']} is not supported (2..5)")
    if v["signature_algo"] != SIG_ALGO_ECDSA_P384_SHA384:
        raise FormatError(f"SNP report SIGNATURE_ALGO {v['signature_algo']} is not ECDSA P-384 (1)")
    if not v["policy"] & POLICY_RESERVED_ONE or v["policy"] & POLICY_MBZ_MASK:
        raise FormatError(f"SNP guest policy {v['policy']:#x} has reserved bits wrong (bit 17, bits 63:26)")
    if v["signer_info"] & SIGNER_MBZ_MASK:
        raise FormatError(f"SNP signer info {v['signer_info']:#x} has reserved bits 31:5 set")
    mbz: list[tuple[str, Any]] = [
        ("0x04C", v["reserved_0x4c"]),
        ("0x18B", v["reserved_0x18b"]),
        ("0x1EB", v["reserved_0x1eb"]),
        ("0x1EF", v["reserved_0x1ef"]),
        ("0x208", v["reserved_0x208"]),
        ("0x330", v["reserved_0x330"]),
    ]
    if v["version"] < 3:  # v2: the whole range 0x188..0x1A0 is reserved
        mbz.append(("0x188", bytes([v["cpuid_fam_id"], v["cpuid_mod_id"], v["cpuid_step"]])))
    if v["version"] < 5:  # the mitigation vectors are v5 fields, reserved before
        mbz.append(("0x1F8", v["launch_mit_vector"] | v["current_mit_vector"]))
    for offset, value in mbz:
        if (value.count(0) != len(value)) if isinstance(value, bytes) else value != 0:
            raise FormatError(f"SNP report reserved field at {offset} is not zero")


def encode_report(**fields: Any) -> bytes:
    """Pack a report from field values (unnamed fields zero). Unknown names are refused (STYLE.md rule 3)."""
    unknown = set(fields) - set(_NAMES)
    if unknown:
        raise ValueError(f"unknown SNP report fields: {sorted(unknown)}")
    defaults: dict[str, Any] = {}
    for name, code in _FIELDS:
        defaults[name] = b"" if code.endswith("s") else 0
    defaults.update(fields)
    return _STRUCT.pack(*(defaults[name] for name in _NAMES))

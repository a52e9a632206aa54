"""AMD products and the SEV-SNP TCB_VERSION, whose byte layout depends on the product.

spec/attestation.md §1.5: Milan and Genoa (KDS structVersion 0) put BL, TEE, 4 reserved bytes, SNP, UCODE
in bytes 0..7; Turin (structVersion 1) puts FMC, BL, TEE, SNP, 3 reserved bytes, UCODE. Comparison is
component-wise, never as a u64.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cwbuild.errors import FormatError


class Product(enum.StrEnum):
    """The AMD EPYC generations whose roots ship with cwbuild (spec §1.6, §5)."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @property
    def turin_layout(self) -> bool:
        """True when TCB_VERSION has the FMC byte first and the VCEK hwID is 8 bytes (spec §1.5, §1.7)."""
        return self is Product.TURIN

    @classmethod
    def from_cpuid(cls, family: int, model: int) -> Product | None:
        """spec §1.6 (VSEV/SNPG/TRU mapping): 19h 00-0F Milan; 19h 10-1F, A0-AF Genoa; 1Ah 00-11 Turin."""
        if family == 0x19 and model <= 0x0F:
            return cls.MILAN
        if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
            return cls.GENOA
        if family == 0x1A and model <= 0x11:
            return cls.TURIN
        return None


#: The components, in the order they are reported.
COMPONENTS = ("fmc", "bl", "tee", "snp", "ucode")


@dataclass(frozen=True, order=False)
class TcbParts:
    """A decoded TCB_VERSION. `fmc` is None for the Milan/Genoa layout (it has no FMC component)."""

    bl: int
    tee: int
    snp: int
    ucode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, product: Product) -> TcbParts:
        """Decode 8 bytes of TCB_VERSION in `product`'s layout (spec §1.5 table)."""
        if len(raw) != 8:
            raise FormatError(f"TCB_VERSION is 8 bytes, got {len(raw)}")
        if product.turin_layout:
            return cls(fmc=raw[0], bl=raw[1], tee=raw[2], snp=raw[3], ucode=raw[7])
        return cls(bl=raw[0], tee=raw[1], snp=raw[6], ucode=raw[7])

    def encode(self, product: Product) -> bytes:
        """The inverse of `decode` (reserved bytes zero)."""
        if product.turin_layout:
            return bytes([self.fmc or 0, self.bl, self.tee, self.snp, 0, 0, 0, self.ucode])
        return bytes([self.bl, self.tee, 0, 0, 0, 0, self.snp, self.ucode])

    def components(self) -> dict[str, int]:
        out = {"bl": self.bl, "tee": self.tee, "snp": self.snp, "ucode": self.ucode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out

    def below(self, other: TcbParts) -> list[str]:
        """The components in which self is lower than `other` (a component `other` lacks is not compared)."""
        mine = self.components()
        return [name for name, value in other.components().items() if mine.get(name, 0) < value]

    def to_dict(self) -> dict[str, int]:
        return self.components()

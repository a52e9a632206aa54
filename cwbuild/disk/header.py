"""What a parsed LUKS header says, for both versions: keyslots, the volume-key digest, the data segment.

Pure values, no secrets (salts and digests are public header data). `luks1.py` and `luks2.py` turn bytes
into these and back; `luks.py` unlocks keyslots with them.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from cwbuild.disk.kdf import KdfSpec
from cwbuild.errors import FormatError

#: The only cipher we read and write: AES in XTS mode with dm-crypt plain64/plain IVs (cw-format.md §3.1:
#: luksy's and cryptsetup's default). Value: whether the IV is plain64 (True) or 32-bit plain (False).
CIPHERS = {"aes-xts-plain64": True, "aes-xts-plain": False}
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
LUKS_SECTOR = 512  # LUKS1 spec §2: all offsets count 512-byte sectors; keyslot areas use 512-byte sectors


@dataclass(frozen=True)
class Keyslot:
    """One active keyslot: KDF + salt, the AF-split key material area and how it is encrypted."""

    index: int
    kdf: KdfSpec
    salt: bytes
    area_offset: int  # bytes from the start of the device
    area_size: int
    area_cipher: str
    area_key_size: int  # bytes the KDF derives: the key of the area cipher
    key_size: int  # bytes of the volume key held here
    stripes: int
    af_hash: str

    @property
    def material_size(self) -> int:
        """Bytes of AF material, rounded up to whole 512-byte sectors of the area cipher."""
        n = self.key_size * self.stripes
        return n + (-n % LUKS_SECTOR)


@dataclass(frozen=True)
class VolumeDigest:
    """PBKDF2 of the volume key, used to tell a right passphrase from a wrong one."""

    hash: str
    iterations: int
    salt: bytes
    value: bytes


@dataclass(frozen=True)
class LuksHeader:
    """The facts of a LUKS1 or LUKS2 header that matter to us."""

    version: int
    uuid: str
    label: str
    cipher: str
    key_size: int
    sector_size: int
    payload_offset: int  # bytes
    payload_size: int | None  # bytes; None: to the end of the device ("dynamic")
    iv_tweak: int  # IV of the first payload sector
    keyslots: tuple[Keyslot, ...]
    digest: VolumeDigest
    metadata_size: int  # LUKS2 hdr_size (one copy of binary header + JSON); LUKS1: 592-byte phdr
    seqid: int = 0

    @property
    def plain64(self) -> bool:
        return CIPHERS[self.cipher]

    def facts(self) -> dict[str, object]:
        """A JSON-able summary for `cwbuild disk inspect` (no key material: none is in a header)."""
        return {
            "version": self.version,
            "uuid": self.uuid,
            "label": self.label,
            "cipher": self.cipher,
            "key_bits": self.key_size * 8,
            "sector_size": self.sector_size,
            "payload_offset": self.payload_offset,
            "payload_size": "dynamic" if self.payload_size is None else self.payload_size,
            "iv_tweak": self.iv_tweak,
            "metadata_size": self.metadata_size,
            "keyslots": [
                {
                    "index": k.index,
                    "kdf": k.kdf.describe(),
                    "area_offset": k.area_offset,
                    "area_size": k.area_size,
                    "af_hash": k.af_hash,
                    "stripes": k.stripes,
                }
                for k in self.keyslots
            ],
            "digest": {"hash": self.digest.hash, "iterations": self.digest.iterations},
        }


def check_cipher(cipher: str, key_size: int, where: str) -> None:
    if cipher not in CIPHERS:
        raise FormatError(f"{where}: unsupported cipher {cipher!r} (only aes-xts-plain64 and aes-xts-plain)")
    if key_size not in (32, 64):
        raise FormatError(f"{where}: AES-XTS key of {key_size} bytes (expected 32 or 64)")


def check_areas(slots: tuple[Keyslot, ...], lo: int, hi: int) -> None:
    """Every keyslot area lies in [lo, hi), holds its material, and no two overlap."""
    spans = []
    for k in slots:
        end = k.area_offset + k.area_size
        if k.area_offset < lo or end > hi or k.area_size < k.material_size:
            raise FormatError(
                f"keyslot {k.index}: area {k.area_offset}+{k.area_size} is outside {lo}..{hi} "
                f"or too small for {k.material_size} bytes of key material"
            )
        spans.append((k.area_offset, end, k.index))
    spans.sort()
    for (_, end_a, ia), (start_b, _, ib) in itertools.pairwise(spans):
        if start_b < end_a:
            raise FormatError(f"keyslot areas {ia} and {ib} overlap")

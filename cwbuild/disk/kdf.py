"""Key derivation for LUKS keyslots: PBKDF2 (RFC 8018 §5.2) and Argon2i/Argon2id (RFC 9106), with bounds.

Every cost read from a header is checked against `KdfLimits` before anything runs, so a hostile header
cannot make us allocate gigabytes or spin for hours. Write-side minimums are cryptsetup's (LUKS2 spec
§3.3 "kdf": pbkdf2 iterations >= 1000; argon2 time >= 4, memory >= 32 KiB, cpus 1..16 as luksy writes).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from enum import StrEnum

from argon2.exceptions import HashingError
from argon2.low_level import ARGON2_VERSION, Type, hash_secret_raw

from cwbuild.errors import DiskError, FormatError

#: LUKS hash names (LUKS1 spec §4 "hash-spec", LUKS2 "hash") -> hashlib names. ripemd160 is not offered.
HASHES = {"sha1": "sha1", "sha256": "sha256", "sha512": "sha512"}

MIN_PBKDF2_ITERATIONS = 1000  # cryptsetup's floor (LUKS2 on-disk format §3.3; DESIGN.md "the KDF is cheap")
MIN_ARGON2_TIME = 4  # cryptsetup: "Argon2 minimal time cost"
MIN_ARGON2_MEMORY_KIB = 32
MAX_ARGON2_CPUS = 16  # luksy writes cpus=16 (cw-format.md §3.2)


class KdfType(StrEnum):
    """The `kdf.type` values of the LUKS2 JSON (LUKS1 only knows pbkdf2)."""

    PBKDF2 = "pbkdf2"
    ARGON2I = "argon2i"
    ARGON2ID = "argon2id"


@dataclass(frozen=True)
class KdfSpec:
    """A keyslot KDF and its cost. `hash` is used by pbkdf2; time/memory_kib/cpus by argon2."""

    type: KdfType
    hash: str = "sha256"
    iterations: int = MIN_PBKDF2_ITERATIONS
    time: int = 4
    memory_kib: int = 65536
    cpus: int = 2

    def __post_init__(self) -> None:
        if self.hash not in HASHES:
            raise FormatError(f"unsupported KDF hash {self.hash!r} (use one of {', '.join(HASHES)})")

    def check_writable(self) -> None:
        """Refuse costs below cryptsetup's minimums (reading accepts what other writers produced)."""
        if self.type is KdfType.PBKDF2:
            if self.iterations < MIN_PBKDF2_ITERATIONS:
                raise DiskError(f"pbkdf2 needs at least {MIN_PBKDF2_ITERATIONS} iterations")
        elif (
            self.time < MIN_ARGON2_TIME
            or self.memory_kib < MIN_ARGON2_MEMORY_KIB
            or not 1 <= self.cpus <= MAX_ARGON2_CPUS
        ):
            raise DiskError(
                f"argon2 needs time >= {MIN_ARGON2_TIME}, memory >= {MIN_ARGON2_MEMORY_KIB} KiB, "
                f"1..{MAX_ARGON2_CPUS} cpus"
            )

    def check_guest_memory(self, guest_memory_mib: int) -> None:
        """DESIGN.md: an argon2 keyslot never needs more than a quarter of the guest's memory (the guest
        runs the KDF when it unlocks the disk)."""
        if self.type is not KdfType.PBKDF2 and self.memory_kib > guest_memory_mib * 1024 // 4:
            raise DiskError(
                f"argon2 memory {self.memory_kib} KiB exceeds a quarter of {guest_memory_mib} MiB",
                hint="lower --kdf-memory or raise --memory",
            )

    def describe(self) -> str:
        if self.type is KdfType.PBKDF2:
            return f"pbkdf2-{self.hash}, {self.iterations} iterations"
        return f"{self.type}, time {self.time}, memory {self.memory_kib} KiB, {self.cpus} cpus"


def _default_max_memory_kib() -> int:
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    except (ValueError, OSError):
        phys = 8 * 1024 * 1024
    return min(4 * 1024 * 1024, phys // 2)  # cryptsetup's own maximum is 4 GiB


@dataclass(frozen=True)
class KdfLimits:
    """The most a header may make us spend to try one keyslot."""

    max_iterations: int = 50_000_000  # a few seconds of sha1; cryptsetup's 2 s benchmark stays below
    max_time: int = 64  # argon2 passes (luksy writes 16)
    max_memory_kib: int = _default_max_memory_kib()
    max_cpus: int = MAX_ARGON2_CPUS

    def check(self, spec: KdfSpec, where: str) -> None:
        """Raise `FormatError` when `spec` costs more than these limits allow."""
        if spec.type is KdfType.PBKDF2:
            if spec.iterations > self.max_iterations:
                raise FormatError(
                    f"{where}: pbkdf2 iterations {spec.iterations} exceed {self.max_iterations}"
                )
            return
        if spec.time > self.max_time or spec.memory_kib > self.max_memory_kib or spec.cpus > self.max_cpus:
            raise FormatError(
                f"{where}: argon2 cost (time {spec.time}, memory {spec.memory_kib} KiB, cpus {spec.cpus}) "
                f"exceeds the limit (time {self.max_time}, memory {self.max_memory_kib} KiB, "
                f"cpus {self.max_cpus})"
            )


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC (RFC 8018 §5.2)."""
    if hash_name not in HASHES:
        raise FormatError(f"unsupported hash {hash_name!r}")
    return hashlib.pbkdf2_hmac(HASHES[hash_name], secret, salt, iterations, length)


def derive(spec: KdfSpec, passphrase: bytes, salt: bytes, length: int) -> bytes:
    """The keyslot key of `length` bytes. Argon2 is version 0x13 (RFC 9106 §3.1), as cryptsetup uses."""
    if spec.type is KdfType.PBKDF2:
        return pbkdf2(spec.hash, passphrase, salt, spec.iterations, length)
    kind = Type.ID if spec.type is KdfType.ARGON2ID else Type.I
    try:
        return hash_secret_raw(
            passphrase,
            salt,
            time_cost=spec.time,
            memory_cost=spec.memory_kib,
            parallelism=spec.cpus,
            hash_len=length,
            type=kind,
            version=ARGON2_VERSION,
        )
    except HashingError as exc:  # e.g. memory < 8 KiB per lane, or a salt argon2 refuses
        raise FormatError(f"argon2 refused the keyslot parameters: {exc}") from None


def default_kdf(*, generated_passphrase: bool, guest_memory_mib: int | None = None) -> KdfSpec:
    """DESIGN.md: a generated (random) passphrase gets pbkdf2-sha256 at the floor; a user passphrase gets
    argon2id t=4, m=64 MiB, p=2, never more than a quarter of the guest memory."""
    if generated_passphrase:
        return KdfSpec(KdfType.PBKDF2)
    memory = 64 * 1024
    if guest_memory_mib is not None:
        memory = max(MIN_ARGON2_MEMORY_KIB, min(memory, guest_memory_mib * 1024 // 4))
    return KdfSpec(KdfType.ARGON2ID, time=4, memory_kib=memory, cpus=2)

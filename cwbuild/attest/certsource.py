"""Where the endpoint gets the VCEK/VLEK for an SNP report (issue 5 item 3; spec/attestation.md §1.9, §2.2).

In order: the guest's extended-report cert table (the configfs-tsm `auxblob`, sent as `certs`), then the
`--cert-cache` directory, then (unless offline) AMD KDS through `cwbuild.net`, rate-limited, with each
answer cached on disk and each failure remembered for a while so a broken URL is not hammered. The
certificates found here are only candidates: the verifier checks them against the pinned AMD roots.

Cache layout (flat directory): `vcek-<Product>-<hex CHIP_ID used in the URL>-<hex REPORTED_TCB>.der`.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cwbuild import net
from cwbuild.attest.ratelimit import Rate, RateLimiter
from cwbuild.attest.snp_report import SIGNING_KEY_VCEK, SnpReport
from cwbuild.attest.tcb import Product, TcbParts
from cwbuild.errors import CwbuildError, FormatError

log = logging.getLogger("cwbuild.attest.certs")

#: spec §2.2 (AMD GHCB §4.1.8.1): a cert table entry is GUID[16] (RFC 4122 order), u32 offset, u32 length.
_ENTRY = struct.Struct("<16sII")
MAX_TABLE_BYTES = 64 * 1024
MAX_TABLE_ENTRIES = 32
MAX_CERT_BYTES = 8 * 1024
#: spec §2.2 table of GUIDs.
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_CERT_GUIDS = (GUID_VCEK, GUID_VLEK, GUID_ASK, GUID_ARK)
#: spec §1.9: KDS base URL.
KDS_BASE = "https://kdsintf.amd.com"
#: spec §1.9: identical KDS requests are throttled to about 1 per 10 s; stay well below.
KDS_RATE = Rate(per_second=1.0, burst=4)
NEGATIVE_CACHE_SECONDS = 60.0


def parse_cert_table(table: bytes) -> dict[uuid.UUID, bytes]:
    """The certificates of a cert table, by GUID; bounded, `FormatError` on any inconsistency."""
    if len(table) > MAX_TABLE_BYTES:
        raise FormatError(f"cert table is larger than {MAX_TABLE_BYTES} bytes")
    out: dict[uuid.UUID, bytes] = {}
    for index in range(MAX_TABLE_ENTRIES + 1):
        start = index * _ENTRY.size
        if start + _ENTRY.size > len(table):
            raise FormatError("cert table has no terminating all-zero entry")
        guid_bytes, offset, length = _ENTRY.unpack_from(table, start)
        if guid_bytes == bytes(16) and offset == 0 and length == 0:
            return out
        if length > MAX_CERT_BYTES or offset + length > len(table) or offset < start + _ENTRY.size:
            raise FormatError(f"cert table entry {index} points outside the table")
        guid = uuid.UUID(bytes=guid_bytes)
        if guid in out:
            raise FormatError(f"cert table lists {guid} twice")
        if guid in _CERT_GUIDS:
            out[guid] = table[offset : offset + length]
    raise FormatError(f"cert table has more than {MAX_TABLE_ENTRIES} entries")


def build_cert_table(certs: dict[uuid.UUID, bytes]) -> bytes:
    """The inverse of `parse_cert_table` (used by the simulated TEE and tests)."""
    header_len = (len(certs) + 1) * _ENTRY.size
    entries, blobs, offset = [], [], header_len
    for guid, der in certs.items():
        entries.append(_ENTRY.pack(guid.bytes, offset, len(der)))
        blobs.append(der)
        offset += len(der)
    return b"".join(entries) + _ENTRY.pack(bytes(16), 0, 0) + b"".join(blobs)


def _products(report: SnpReport) -> tuple[Product, ...]:
    if report.version >= 3:
        found = Product.from_cpuid(report.cpuid_fam_id, report.cpuid_mod_id)
        if found is not None:
            return (found,)
    if report.chip_id[8:] == bytes(56) and report.chip_id[:8] != bytes(8):
        return (Product.TURIN,)  # spec §1.6: v2 reports, chip_id[8:] zero => Turin (SNPG)
    return (Product.MILAN, Product.GENOA)


def vcek_url(report: SnpReport, product: Product, base: str = KDS_BASE) -> str:
    """spec §1.9: the KDS VCEK URL from CHIP_ID and REPORTED_TCB in the product's layout."""
    tcb = TcbParts.decode(report.reported_tcb, product)
    if product.turin_layout:
        hwid = report.chip_id[:8].hex()
        query = f"fmcSPL={tcb.fmc or 0:02}&blSPL={tcb.bl:02}&teeSPL={tcb.tee:02}&snpSPL={tcb.snp:02}"
        return f"{base}/vcek/v1/{product.value}/{hwid}?{query}&ucodeSPL={tcb.ucode:02}"
    query = f"blSPL={tcb.bl}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.ucode}"
    return f"{base}/vcek/v1/{product.value}/{report.chip_id.hex()}?{query}"


@dataclass(frozen=True)
class CertOptions:
    cache_dir: Path | None = None
    offline: bool = False
    kds_base: str = KDS_BASE
    timeout: float = 10.0


class CertSource:
    """Finds candidate certificates for an SNP report; thread-safe."""

    def __init__(self, options: CertOptions) -> None:
        self.options = options
        self._limiter = RateLimiter(KDS_RATE)
        self._failed: dict[str, float] = {}
        self._lock = threading.Lock()

    def certs_for(self, report: SnpReport, table: bytes | None) -> tuple[bytes, ...]:
        """DER certificates for `report`: the table's, else cached or fetched VCEK; may be empty."""
        if table:
            found = parse_cert_table(table)
            if GUID_VCEK in found or GUID_VLEK in found:
                return tuple(found.values())
        if report.signing_key != SIGNING_KEY_VCEK or report.chip_id == bytes(64):
            return ()  # a VLEK (or a masked chip id) can only come from the guest (spec §1.9)
        for product in _products(report):
            der = self._cached_or_fetched(report, product)
            if der is not None:
                return (der,)
        return ()

    def may_fetch(self, report: SnpReport, table: bytes | None) -> bool:
        """Whether `certs_for` may go to the network (not offline, no VCEK in the table, none cached)."""
        if self.options.offline:
            return False
        try:
            if table and ({GUID_VCEK, GUID_VLEK} & set(parse_cert_table(table))):
                return False
        except FormatError:
            return False
        paths = [self._cache_path(report, product) for product in _products(report)]
        return not any(p is not None and p.is_file() for p in paths)

    def _cache_path(self, report: SnpReport, product: Product) -> Path | None:
        if self.options.cache_dir is None:
            return None
        chip = report.chip_id[:8] if product.turin_layout else report.chip_id
        name = f"vcek-{product.value}-{chip.hex()}-{report.reported_tcb.hex()}.der"
        return self.options.cache_dir / name

    def _cached_or_fetched(self, report: SnpReport, product: Product) -> bytes | None:
        path = self._cache_path(report, product)
        if path is not None and path.is_file():
            data = path.read_bytes()
            if len(data) <= MAX_CERT_BYTES:
                return data
        if self.options.offline:
            return None
        return self._fetch(vcek_url(report, product, self.options.kds_base), path)

    def _fetch(self, url: str, path: Path | None) -> bytes | None:
        now = time.monotonic()
        with self._lock:
            if now - self._failed.get(url, -NEGATIVE_CACHE_SECONDS) < NEGATIVE_CACHE_SECONDS:
                return None
        if not self._limiter.allow("kds"):
            log.warning("KDS rate limit reached; not fetching %s", net.redact_url(url))
            return None
        try:
            opts = net.Options(timeout=self.options.timeout, retries=1, max_bytes=MAX_CERT_BYTES)
            data = net.fetch(url, options=opts)
        except CwbuildError as exc:
            log.warning("fetching a VCEK from KDS failed: %s", exc.message)
            with self._lock:
                self._failed[url] = now
            return None
        if path is not None:
            _write_atomic(path, data)
        return data


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:  # the certificate is still used; only caching failed
        log.warning("cannot write the cert cache %s: %s", path.parent, exc.strerror)

"""Synthetic firmware for the measurement tests, built from the spec's byte layouts (measurement.md §1.1,
§1.2, §3.1), independently of cwbuild's parser: GUIDs are written from their text form with `uuid.bytes_le`.
"""

from __future__ import annotations

import random
import struct
import uuid
from dataclasses import dataclass, field

PAGE = 4096

FOOTER = "96b582de-1fb2-45f7-baea-a366c55a082d"
RESET_BLOCK = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
HASH_TABLE = "7255371f-3a3b-4b04-927b-1da6efa8d454"
SEV_METADATA = "dc886566-984a-4798-a75e-5585a7bf67cc"
TDX_METADATA = "e47a6535-984a-4798-865e-4685a7bf8ec2"
TDVF_GUID = "e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae"
SVSM_INFO = "a789a612-0597-4c4b-a49f-cbb1fe9d1ddd"

SEC_MEM, SECRETS, CPUID, SVSM_CAA, KERNEL_HASHES = 1, 2, 3, 4, 0x10


def entry(guid: str, data: bytes) -> bytes:
    """A footer-table entry: data, u16 length (data + 18), GUID (spec §1.1)."""
    return data + struct.pack("<H", len(data) + 18) + uuid.UUID(guid).bytes_le


@dataclass
class SevFirmwareLayout:
    pages: int = 8
    reset_eip: int | None = 0x80B004
    hash_table: tuple[int, int] | None = (0x810C00, 0x400)
    sections: list[tuple[int, int, int]] = field(default_factory=list)  # (gpa, size, type)
    extra_entries: list[tuple[str, bytes]] = field(default_factory=list)
    svsm_info: int | None = None


def sev_firmware(layout: SevFirmwareLayout, rng: random.Random) -> bytes:
    """Random bytes with an OVMF footer table and an ASEV block placed before it."""
    size = layout.pages * PAGE
    body = bytearray(rng.randbytes(size))
    entries = [entry(g, d) for g, d in layout.extra_entries]
    if layout.reset_eip is not None:
        entries.append(entry(RESET_BLOCK, struct.pack("<I", layout.reset_eip)))
    if layout.hash_table is not None:
        entries.append(entry(HASH_TABLE, struct.pack("<II", *layout.hash_table)))
    if layout.svsm_info is not None:
        entries.append(entry(SVSM_INFO, struct.pack("<I", layout.svsm_info)))
    asev = b""
    if layout.sections:
        items = b"".join(struct.pack("<III", *s) for s in layout.sections)
        asev = b"ASEV" + struct.pack("<III", 16 + len(items), 1, len(layout.sections)) + items
    table_end = size - 32 - 18
    meta_entry_len = 4 + 18 if asev else 0
    table_start = table_end - sum(len(e) for e in entries) - meta_entry_len
    if asev:
        asev_start = table_start - len(asev) - 64
        body[asev_start : asev_start + len(asev)] = asev
        entries.append(entry(SEV_METADATA, struct.pack("<I", size - asev_start)))
    table = b"".join(entries)
    body[table_end - len(table) : table_end] = table
    body[table_end : table_end + 18] = struct.pack("<H", len(table) + 18) + uuid.UUID(FOOTER).bytes_le
    return bytes(body)


def random_sections(rng: random.Random, *, kernel_hashes: bool) -> list[tuple[int, int, int]]:
    """A shuffled ASEV list like OVMF's (types 1-4 and optionally 0x10), page-aligned GPAs in low memory."""
    base = 0x800000 + rng.randrange(0, 64) * PAGE
    kinds = [SEC_MEM, SEC_MEM, SECRETS, CPUID, SVSM_CAA]
    if kernel_hashes:
        kinds.append(KERNEL_HASHES)
    rng.shuffle(kinds)
    sections = []
    gpa = base
    for kind in kinds:
        pages = rng.randint(1, 6) if kind in (SEC_MEM, SVSM_CAA) else 1
        sections.append((gpa, pages * PAGE, kind))
        gpa += pages * PAGE
    return sections


@dataclass
class TdvfSection:
    data_offset: int
    raw_size: int
    gpa: int
    mem_size: int
    type: int
    attributes: int


def tdvf_firmware(pages: int, sections: list[TdvfSection], rng: random.Random) -> bytes:
    """Random bytes with a footer table pointing at a TDVF descriptor (spec §3.1)."""
    size = pages * PAGE
    body = bytearray(rng.randbytes(size))
    desc = b"TDVF" + struct.pack("<III", 16 + 32 * len(sections), 1, len(sections))
    desc += b"".join(
        struct.pack("<IIQQII", s.data_offset, s.raw_size, s.gpa, s.mem_size, s.type, s.attributes)
        for s in sections
    )
    table = entry(TDX_METADATA, struct.pack("<I", 0))
    table_end = size - 32 - 18
    desc_start = table_end - len(table) - len(desc) - 32
    body[desc_start - 16 : desc_start] = uuid.UUID(TDVF_GUID).bytes_le
    body[desc_start : desc_start + len(desc)] = desc
    table = entry(TDX_METADATA, struct.pack("<I", size - desc_start))
    body[table_end - len(table) : table_end] = table
    body[table_end : table_end + 18] = struct.pack("<H", len(table) + 18) + uuid.UUID(FOOTER).bytes_le
    return bytes(body)

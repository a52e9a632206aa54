"""OVMF / TDVF firmware parsing: the footer GUID table, SEV metadata ("ASEV") and TDX metadata ("TDVF").

Spec: measurement.md §1.1 (footer table), §1.2 (ASEV), §1.9 (SVSM info), §3.1 (TDVF). Every offset and length
read from the file is bounds-checked; malformed firmware raises `FormatError` naming what is wrong.
Pure: bytes in, values out.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cwbuild.errors import FormatError
from cwbuild.measure.layout import check_size, guid

#: The firmware is mapped so that it ends at 4 GiB (spec §1.1; SSM ovmf.py FOUR_GB).
FOUR_GB = 0x1_0000_0000
PAGE_SIZE = 4096

# Footer GUID table entries (EDK2 ResetVectorVtf0.nasm.inc; spec §1.1 table "Known entry GUIDs").
FOOTER_GUID = guid("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = guid("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_HASH_TABLE_RV_GUID = guid("7255371f-3a3b-4b04-927b-1da6efa8d454")
SEV_METADATA_GUID = guid("dc886566-984a-4798-a75e-5585a7bf67cc")
TDX_METADATA_OFFSET_GUID = guid("e47a6535-984a-4798-865e-4685a7bf8ec2")
SVSM_INFO_GUID = guid("a789a612-0597-4c4b-a49f-cbb1fe9d1ddd")
#: The GUID in the 16 bytes before the "TDVF" descriptor (spec §3.1; TDSHIM python checks it).
TDVF_DESCRIPTOR_GUID = guid("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae")

#: The last 32 bytes are the reset vector; the footer entry is the 18 bytes before them (spec §1.1).
RESET_VECTOR_SIZE = 32
#: Each table entry ends with `u16 entry_len` then the GUID (spec §1.1).
TABLE_ENTRY_TAIL = struct.Struct("<H16s")
check_size(TABLE_ENTRY_TAIL, 18)

#: ASEV header: "ASEV", u32 length, u32 version (1), u32 num_items (spec §1.2; OvmfSevMetadata.nasm.inc).
ASEV_HEADER = struct.Struct("<4sIII")
check_size(ASEV_HEADER, 16)
#: ASEV section descriptor: u32 gpa, u32 size, u32 type (spec §1.2).
ASEV_SECTION = struct.Struct("<III")
check_size(ASEV_SECTION, 12)

#: TDVF descriptor: "TDVF", u32 length, u32 version (1), u32 num_sections (spec §3.1).
TDVF_HEADER = struct.Struct("<4sIII")
check_size(TDVF_HEADER, 16)
#: TDVF section: u32 data_offset, u32 raw_size, u64 gpa, u64 mem_size, u32 type, u32 attributes (spec §3.1).
TDVF_SECTION = struct.Struct("<IIQQII")
check_size(TDVF_SECTION, 32)


class SevSectionType(enum.IntEnum):
    """ASEV section types (spec §1.2; OvmfSevMetadata.nasm.inc)."""

    SNP_SEC_MEM = 1
    SNP_SECRETS = 2
    CPUID = 3
    SVSM_CAA = 4
    SNP_KERNEL_HASHES = 0x10


class TdvfSectionType(enum.IntEnum):
    """TDVF section types (spec §3.1; TDSHIM tdshim_spec.md TDVF_SECTION)."""

    BFV = 0
    CFV = 1
    TD_HOB = 2
    TEMP_MEM = 3
    PERM_MEM = 4
    PAYLOAD = 5
    PAYLOAD_PARAM = 6
    TD_INFO = 7
    TD_PARAMS = 8


#: TDVF section attribute bits (spec §3.1).
TDVF_ATTR_MR_EXTEND = 1 << 0
TDVF_ATTR_PAGE_AUG = 1 << 1


@dataclass(frozen=True)
class SevSection:
    gpa: int
    size: int
    type: SevSectionType


@dataclass(frozen=True)
class TdvfSection:
    data_offset: int
    raw_size: int
    gpa: int
    mem_size: int
    type: TdvfSectionType
    attributes: int


def _u32(data: bytes, what: str) -> int:
    if len(data) < 4:
        raise FormatError(f"firmware: footer table entry {what} is {len(data)} bytes, expected at least 4")
    value: int = struct.unpack_from("<I", data)[0]
    return value


def parse_footer_table(data: bytes) -> dict[bytes, bytes]:
    """The OVMF footer GUID table as {GUID bytes_le: entry data}; empty when the footer GUID is absent.

    An absent footer is not an error here (sev-snp-measure treats it as an empty table, spec §1.1); the
    callers that need an entry name it when it is missing.
    """
    footer_end = len(data) - RESET_VECTOR_SIZE
    footer_start = footer_end - TABLE_ENTRY_TAIL.size
    if footer_start < 0:
        raise FormatError(f"firmware is {len(data)} bytes, too short to hold the OVMF footer table")
    table_len, footer_guid = TABLE_ENTRY_TAIL.unpack_from(data, footer_start)
    if footer_guid != FOOTER_GUID:
        return {}
    body_len = table_len - TABLE_ENTRY_TAIL.size
    if body_len < 0 or body_len > footer_start:
        raise FormatError(f"firmware: footer table length {table_len} does not fit the file")
    table: dict[bytes, bytes] = {}
    end = footer_start
    start = footer_start - body_len
    while end - start >= TABLE_ENTRY_TAIL.size:
        entry_len, entry_guid = TABLE_ENTRY_TAIL.unpack_from(data, end - TABLE_ENTRY_TAIL.size)
        if entry_len < TABLE_ENTRY_TAIL.size or entry_len > end - start:
            raise FormatError(f"firmware: footer table entry length {entry_len} is invalid")
        table[entry_guid] = data[end - entry_len : end - TABLE_ENTRY_TAIL.size]
        end -= entry_len
    return table


def parse_sev_metadata(data: bytes, table: dict[bytes, bytes]) -> tuple[SevSection, ...]:
    """The ASEV sections in table order (order matters, spec §1.2); () when the firmware has none."""
    entry = table.get(SEV_METADATA_GUID)
    if entry is None:
        return ()
    offset = _u32(entry, "SEV metadata offset")
    start = len(data) - offset
    if offset > len(data) or start + ASEV_HEADER.size > len(data):
        raise FormatError(f"firmware: SEV metadata offset {offset:#x} points outside the file")
    magic, length, version, count = ASEV_HEADER.unpack_from(data, start)
    if magic != b"ASEV" or version != 1:
        raise FormatError("firmware: SEV metadata header is not 'ASEV' version 1")
    items_end = start + ASEV_HEADER.size + count * ASEV_SECTION.size
    if length < items_end - start or items_end > len(data):
        raise FormatError(f"firmware: SEV metadata with {count} sections does not fit its header or the file")
    sections = []
    for i in range(count):
        gpa, size, kind = ASEV_SECTION.unpack_from(data, start + ASEV_HEADER.size + i * ASEV_SECTION.size)
        try:
            section_type = SevSectionType(kind)
        except ValueError:
            raise FormatError(f"firmware: SEV metadata section {i} has unknown type {kind:#x}") from None
        sections.append(SevSection(gpa, size, section_type))
    return tuple(sections)


def parse_tdvf_metadata(data: bytes, table: dict[bytes, bytes]) -> tuple[TdvfSection, ...]:
    """The TDVF sections in table order (spec §3.1). Raises FormatError when there is no valid descriptor."""
    entry = table.get(TDX_METADATA_OFFSET_GUID)
    if entry is None:
        raise FormatError("firmware has no TDX metadata (footer entry e47a6535-…): not a TDVF image")
    offset = _u32(entry, "TDX metadata offset")
    start = len(data) - offset
    if offset > len(data) or start < 16 or start + TDVF_HEADER.size > len(data):
        raise FormatError(f"firmware: TDX metadata offset {offset:#x} points outside the file")
    if data[start - 16 : start] != TDVF_DESCRIPTOR_GUID:
        raise FormatError("firmware: TDX metadata descriptor GUID e9eaf9f3-… is missing")
    magic, length, version, count = TDVF_HEADER.unpack_from(data, start)
    end = start + TDVF_HEADER.size + count * TDVF_SECTION.size
    if magic != b"TDVF" or version != 1 or count == 0:
        raise FormatError("firmware: TDX metadata descriptor is not 'TDVF' version 1 with sections")
    if length != end - start or end > len(data):
        raise FormatError(f"firmware: TDX metadata with {count} sections does not fit its header or the file")
    return tuple(
        _tdvf_section(
            data, i, *TDVF_SECTION.unpack_from(data, start + TDVF_HEADER.size + i * TDVF_SECTION.size)
        )
        for i in range(count)
    )


def _tdvf_section(data: bytes, i: int, *fields: int) -> TdvfSection:
    data_offset, raw_size, gpa, mem_size, kind, attributes = fields
    try:
        section_type = TdvfSectionType(kind)
    except ValueError:
        raise FormatError(f"firmware: TDX metadata section {i} has unknown type {kind}") from None
    if gpa % PAGE_SIZE or mem_size % PAGE_SIZE or mem_size < raw_size:
        raise FormatError(f"firmware: TDX metadata section {i} is not page aligned or smaller than its data")
    extended = mem_size if attributes & TDVF_ATTR_MR_EXTEND else raw_size
    if data_offset + extended > len(data):
        raise FormatError(f"firmware: TDX metadata section {i} data lies outside the file")
    return TdvfSection(data_offset, raw_size, gpa, mem_size, section_type, attributes)


@dataclass(frozen=True)
class Firmware:
    """A parsed OVMF image: its bytes (4 MiB for OVMF; read once) and what the measurements need from it."""

    data: bytes
    table: dict[bytes, bytes]
    sev_sections: tuple[SevSection, ...]
    end_at: int = FOUR_GB

    @classmethod
    def parse(cls, data: bytes, *, end_at: int = FOUR_GB) -> Firmware:
        table = parse_footer_table(data)
        return cls(data, table, parse_sev_metadata(data, table), end_at)

    @property
    def gpa(self) -> int:
        """Guest physical address of the first byte (the image ends at `end_at`, spec §1.1)."""
        return self.end_at - len(self.data)

    def entry_u32(self, entry_guid: bytes, what: str) -> int:
        entry = self.table.get(entry_guid)
        if entry is None:
            raise FormatError(f"firmware has no {what} entry in its OVMF footer table")
        return _u32(entry, what)

    def sev_es_reset_eip(self) -> int:
        """AP reset address from the SEV-ES reset block (spec §1.1)."""
        return self.entry_u32(SEV_ES_RESET_BLOCK_GUID, "SEV-ES reset block")

    def svsm_entry_eip(self) -> int:
        """SVSM entry point: the SVSM info offset relative to this image's GPA (spec §1.9)."""
        return self.gpa + self.entry_u32(SVSM_INFO_GUID, "SVSM info")

    def sev_hashes_table_gpa(self) -> int:
        """GPA of the SEV hashes table; 0 when absent or unset (spec §1.1: supported iff base != 0)."""
        entry = self.table.get(SEV_HASH_TABLE_RV_GUID)
        return 0 if entry is None else _u32(entry, "SEV hashes table")

    def has_section(self, kind: SevSectionType) -> bool:
        return any(s.type == kind for s in self.sev_sections)

    def tdvf_sections(self) -> tuple[TdvfSection, ...]:
        return parse_tdvf_metadata(self.data, self.table)

"""The Authenticode hash plan of a PE/COFF image (an EFI-stub Linux kernel), as EDK2 measures it into RTMR1.

Spec: measurement.md §3.5 "Authenticode" (PE/COFF ranges). This module only computes *which byte ranges* are
hashed, from the image's headers; `digest.py` feeds them to SHA-384 while streaming the file once. EDK2
(Tcg2Dxe MeasureBootPeCoff.c HashPeImageByType) hashes the data after the last section whether or not a
certificate table exists, and pads nothing; the dstack quirks noted in the spec are not reproduced.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cwbuild.errors import FormatError

#: IMAGE_DOS_HEADER.e_lfanew (PE/COFF spec §2 "MS-DOS stub").
E_LFANEW = 0x3C
PE_SIGNATURE = b"PE\0\0"
#: COFF file header after the signature: Machine, NumberOfSections, TimeDateStamp, PointerToSymbolTable,
#: NumberOfSymbols, SizeOfOptionalHeader, Characteristics (PE/COFF spec §3.3).
COFF_HEADER = struct.Struct("<HHIIIHH")
#: Optional header magic (PE/COFF spec §3.4).
PE32_MAGIC = 0x10B
PE32PLUS_MAGIC = 0x20B
#: Offsets inside the optional header (PE/COFF spec §3.4.2): CheckSum, SizeOfHeaders; data directories
#: start at 96 (PE32) or 112 (PE32+), NumberOfRvaAndSizes just before them.
OPT_CHECKSUM = 64
OPT_SIZE_OF_HEADERS = 60
#: The certificate table is data directory 4 (PE/COFF spec §3.4.3).
SECURITY_DIRECTORY = 4
#: Section header: 40 bytes, SizeOfRawData at 16, PointerToRawData at 20 (PE/COFF spec §4).
SECTION_HEADER_SIZE = 40
#: Refuse headers larger than this: kernels keep them in the first page (bounds every read).
MAX_HEADERS = 1 << 20


@dataclass(frozen=True)
class HashPlan:
    """Byte ranges [start, end) to hash, ascending and non-overlapping, and the bytes needed to build it."""

    ranges: tuple[tuple[int, int], ...]


def _u16(data: bytes, off: int) -> int:
    value: int = struct.unpack_from("<H", data, off)[0]
    return value


def _u32(data: bytes, off: int) -> int:
    value: int = struct.unpack_from("<I", data, off)[0]
    return value


def _header_fields(head: bytes) -> tuple[int, int, int, int, int, int]:
    """(checksum offset, cert-dir offset or 0, SizeOfHeaders, section table, sections, optional hdr)."""
    if len(head) < E_LFANEW + 4 or head[:2] != b"MZ":
        raise FormatError(
            "kernel is not a PE/COFF image (no MZ header): cannot compute its Authenticode hash"
        )
    pe = _u32(head, E_LFANEW)
    opt = pe + 4 + COFF_HEADER.size
    if opt + 2 > len(head) or head[pe : pe + 4] != PE_SIGNATURE:
        raise FormatError("kernel has no PE signature: not an EFI-stub kernel")
    _, nsections, _, _, _, opt_size, _ = COFF_HEADER.unpack_from(head, pe + 4)
    magic = _u16(head, opt)
    if magic not in (PE32_MAGIC, PE32PLUS_MAGIC):
        raise FormatError(f"kernel PE optional header has unknown magic {magic:#x}")
    dirs = opt + (112 if magic == PE32PLUS_MAGIC else 96)
    if dirs > len(head) or opt + opt_size + nsections * SECTION_HEADER_SIZE > len(head):
        raise FormatError("kernel PE headers are truncated")
    ndirs = _u32(head, dirs - 4)
    certdir = dirs + SECURITY_DIRECTORY * 8 if ndirs > SECURITY_DIRECTORY else 0
    if certdir and certdir + 8 > opt + opt_size:
        raise FormatError("kernel PE certificate directory lies outside the optional header")
    return opt + OPT_CHECKSUM, certdir, _u32(head, opt + OPT_SIZE_OF_HEADERS), opt + opt_size, nsections, opt


def plan(head: bytes, file_size: int) -> HashPlan:
    """The Authenticode ranges of a PE image whose first bytes are `head` (at least its headers)."""
    checksum, certdir, size_of_headers, table, nsections, _ = _header_fields(head)
    if size_of_headers > min(file_size, MAX_HEADERS) or size_of_headers < table:
        raise FormatError(f"kernel PE SizeOfHeaders {size_of_headers:#x} is invalid")
    if certdir:
        ranges = [(0, checksum), (checksum + 4, certdir), (certdir + 8, size_of_headers)]
        cert_size = _u32(head, certdir + 4)
    else:
        ranges = [(0, checksum), (checksum + 4, size_of_headers)]
        cert_size = 0
    sections = []
    for i in range(nsections):
        raw_size = _u32(head, table + i * SECTION_HEADER_SIZE + 16)
        raw_ptr = _u32(head, table + i * SECTION_HEADER_SIZE + 20)
        if raw_size:
            sections.append((raw_ptr, raw_size))
    hashed = size_of_headers
    for ptr, size in sorted(sections):
        if ptr < ranges[-1][1] or ptr + size > file_size:
            raise FormatError(
                f"kernel PE section at {ptr:#x} overlaps another or runs past the end of the file"
            )
        ranges.append((ptr, ptr + size))
        hashed += size
    if cert_size > file_size - hashed:
        raise FormatError("kernel PE certificate table is larger than the data after the sections")
    if file_size > hashed + cert_size:
        if hashed < ranges[-1][1]:
            raise FormatError("kernel PE trailing data overlaps its sections (sections have gaps)")
        ranges.append((hashed, file_size - cert_size))
    return HashPlan(tuple((a, b) for a, b in ranges if b > a))

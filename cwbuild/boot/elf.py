"""The few ELF facts a kit needs: a program's interpreter and DT_NEEDED libraries, a module's .modinfo.

Layouts from the System V gABI (ELF-64 Object File Format, version 1.5): the file header (§"ELF Header",
64 bytes for ELFCLASS64), program headers (56 bytes), section headers (64 bytes) and dynamic entries
(16 bytes). Only ELFCLASS64 little-endian x86-64 files are accepted; every offset read is bounds-checked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cwbuild.errors import FormatError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2  # gABI e_ident[EI_CLASS]
ELFDATA2LSB = 1  # gABI e_ident[EI_DATA]
EM_X86_64 = 62  # gABI e_machine

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # gABI Elf64_Ehdr
_PHDR = struct.Struct("<IIQQQQQQ")  # gABI Elf64_Phdr
_SHDR = struct.Struct("<IIQQQQIIQQ")  # gABI Elf64_Shdr
_DYN = struct.Struct("<qQ")  # gABI Elf64_Dyn
if (_EHDR.size, _PHDR.size, _SHDR.size, _DYN.size) != (64, 56, 64, 16):  # sizes from the gABI
    raise ImportError("ELF struct layouts do not match the gABI sizes")

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3  # gABI "Segment Types"
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5  # gABI "Dynamic Array Tags"
MAX_PHNUM = 256
MAX_SHNUM = 1 << 16


@dataclass(frozen=True)
class Header:
    phoff: int
    shoff: int
    phentsize: int
    phnum: int
    shentsize: int
    shnum: int
    shstrndx: int


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    vaddr: int
    filesz: int


@dataclass(frozen=True)
class Dynamic:
    """What the dynamic loader needs to run a program or a library."""

    interpreter: str | None
    needed: tuple[str, ...]


def _header(data: bytes, name: str) -> Header:
    if len(data) < _EHDR.size or not data.startswith(ELF_MAGIC):
        raise FormatError(f"{name}: not an ELF file")
    (
        ident,
        _type,
        machine,
        _ver,
        _entry,
        phoff,
        shoff,
        _flags,
        _ehsize,
        phentsize,
        phnum,
        shentsize,
        shnum,
        shstrndx,
    ) = _EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise FormatError(f"{name}: not a little-endian x86-64 ELF file")
    return Header(phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx)


def _slice(data: bytes, offset: int, size: int, name: str) -> bytes:
    if offset < 0 or size < 0 or offset + size > len(data):
        raise FormatError(f"{name}: ELF structure out of bounds")
    return data[offset : offset + size]


def _segments(data: bytes, hdr: Header, name: str) -> list[Segment]:
    if hdr.phnum > MAX_PHNUM or (hdr.phnum and hdr.phentsize != _PHDR.size):
        raise FormatError(f"{name}: bad program header table")
    out = []
    for i in range(hdr.phnum):
        raw = _slice(data, hdr.phoff + i * _PHDR.size, _PHDR.size, name)
        p_type, _flags, offset, vaddr, _paddr, filesz, _memsz, _align = _PHDR.unpack(raw)
        out.append(Segment(p_type, offset, vaddr, filesz))
    return out


def _vaddr_to_offset(segments: list[Segment], vaddr: int, name: str) -> int:
    for seg in segments:
        if seg.type == PT_LOAD and seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
            return seg.offset + (vaddr - seg.vaddr)
    raise FormatError(f"{name}: address {vaddr:#x} is not in a loaded segment")


def _cstring(data: bytes, offset: int, name: str) -> str:
    end = data.find(b"\0", offset)
    if offset < 0 or offset >= len(data) or end < 0:
        raise FormatError(f"{name}: string out of bounds")
    return data[offset:end].decode("utf-8", "strict")


def dynamic(data: bytes, name: str = "ELF file") -> Dynamic:
    """The interpreter (PT_INTERP) and DT_NEEDED entries of an executable or shared library."""
    hdr = _header(data, name)
    segments = _segments(data, hdr, name)
    interp = None
    for seg in segments:
        if seg.type == PT_INTERP:
            interp = _slice(data, seg.offset, seg.filesz, name).rstrip(b"\0").decode("utf-8")
    dyn = next((s for s in segments if s.type == PT_DYNAMIC), None)
    if dyn is None:
        return Dynamic(interp, ())  # statically linked
    table = _slice(data, dyn.offset, dyn.filesz, name)
    entries = [_DYN.unpack_from(table, i) for i in range(0, len(table) - _DYN.size + 1, _DYN.size)]
    strtab = None
    needed_offsets: list[int] = []
    for tag, value in entries:
        if tag == DT_NULL:
            break
        if tag == DT_STRTAB:
            strtab = _vaddr_to_offset(segments, value, name)
        elif tag == DT_NEEDED:
            needed_offsets.append(value)
    if needed_offsets and strtab is None:
        raise FormatError(f"{name}: DT_NEEDED without DT_STRTAB")
    needed = tuple(_cstring(data, (strtab or 0) + off, name) for off in needed_offsets)
    return Dynamic(interp, needed)


def section(data: bytes, wanted: str, name: str = "ELF file") -> bytes | None:
    """The contents of the section called `wanted`, or None."""
    hdr = _header(data, name)
    if hdr.shnum > MAX_SHNUM or hdr.shentsize != _SHDR.size or hdr.shstrndx >= hdr.shnum:
        raise FormatError(f"{name}: bad section header table")
    shdrs = [
        _SHDR.unpack(_slice(data, hdr.shoff + i * _SHDR.size, _SHDR.size, name)) for i in range(hdr.shnum)
    ]
    names_hdr = shdrs[hdr.shstrndx]
    names = _slice(data, names_hdr[4], names_hdr[5], name)
    for sh in shdrs:
        if _cstring(names, sh[0], name) == wanted:
            return _slice(data, sh[4], sh[5], name)
    return None


def modinfo(data: bytes, name: str = "module") -> dict[str, list[str]]:
    """A kernel module's .modinfo section: NUL-separated `key=value` strings (include/linux/moduleparam.h)."""
    raw = section(data, ".modinfo", name)
    if raw is None:
        raise FormatError(f"{name}: no .modinfo section")
    out: dict[str, list[str]] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            out.setdefault(key, []).append(value)
    return out

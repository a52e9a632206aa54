"""krun / libkrunfw-sev launch measurements (SNP, SEV-ES, SEV), as buildah mkcw gets them.

Spec: measurement.md §2.1 (measured layout, boot_params page, VMSAs), §2.2 (pitfalls), §2.3 (mkcw's mapping).
The payloads are read from the library *file* (its dynamic symbol table names the QBOOT/KERNEL/INITRD bundles,
libkrunfw bin2cbundle.py), never by loading it. Each deviation between libkrunfw's tool and libkrun is a named
option; the defaults reproduce `krunfw_measurement`. Nothing here has been checked on hardware.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import struct
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64
from dataclasses import dataclass

from cwbuild.errors import FormatError, MeasurementError
from cwbuild.measure.layout import build, check_size
from cwbuild.measure.sev import LaunchDigest, PageType
from cwbuild.measure.vmsa import FCW_INIT2, G_PAT_DEFAULT, MXCSR_INIT2, SaveArea, seg

PAGE_SIZE = 4096
# Guest layout (KRUN builder.rs / arch x86_64 layout.rs; KRUNFW krunfw_measurement.c; spec §2.1).
QBOOT_GPA = 0xFFFF_0000  # FIRMWARE_START
INITRD_GPA = 0xA0_0000  # INITRD_SEV_START
ZERO_PAGE_GPA = 0x7000  # boot_params
SECRETS_GPA = 0x5000
CPUID_GPA = 0x6000
STACK_GPA, STACK_SIZE = 0x8000, 0x7000  # firmware stack and page tables, ZERO pages
#: x86 vmlinux load address used when the library does not say (libkrunfw: first p_vaddr & 0xfffffff).
DEFAULT_KERNEL_LOAD_ADDR = 0x100_0000
#: qboot's SEV AP entry point (KRUN RESET_VECTOR_SEV_AP; spec §2.1).
AP_RIP = 0xFFF3
BSP_RIP = 0xFFF0
BSP_STACK = 0x8FF0
# boot_params / setup header constants (Linux Documentation/arch/x86/boot.rst; KRUNFW setup_bootp).
EBDA_START = 0x9FC00
HIMEM_START = 0x10_0000
MMIO_MEM_START = 0xD000_0000
FIRST_ADDR_PAST_32BITS = 0x1_0000_0000
E820_RAM = 1


class E820Entry(ctypes.LittleEndianStructure):
    """struct boot_e820_entry: u64 addr, u64 size, u32 type (Linux asm/bootparam.h)."""

    _pack_ = 1
    _fields_ = (("addr", c_uint64), ("size", c_uint64), ("type", c_uint32))


check_size(E820Entry, 20)


class BootParams(ctypes.LittleEndianStructure):
    """struct boot_params (the "zero page"), the fields libkrun sets; offsets from Linux asm/bootparam.h."""

    _pack_ = 1
    _fields_ = (
        ("reserved_0x000", c_uint8 * 0x1E8),
        ("e820_entries", c_uint8),  # 0x1e8
        ("reserved_0x1e9", c_uint8 * 0xB),
        ("syssize", c_uint32),  # 0x1f4 hdr.syssize
        ("reserved_0x1f8", c_uint8 * 6),
        ("boot_flag", c_uint16),  # 0x1fe
        ("reserved_0x200", c_uint8 * 2),
        ("header", c_uint32),  # 0x202 "HdrS"
        ("reserved_0x206", c_uint8 * 0xA),
        ("type_of_loader", c_uint8),  # 0x210
        ("reserved_0x211", c_uint8 * 7),
        ("ramdisk_image", c_uint32),  # 0x218
        ("ramdisk_size", c_uint32),  # 0x21c
        ("reserved_0x220", c_uint8 * 8),
        ("cmd_line_ptr", c_uint32),  # 0x228
        ("reserved_0x22c", c_uint8 * 4),
        ("kernel_alignment", c_uint32),  # 0x230
        ("reserved_0x234", c_uint8 * 4),
        ("cmdline_size", c_uint32),  # 0x238
        ("reserved_0x23c", c_uint8 * 0x94),
        ("e820_table", E820Entry * 128),  # 0x2d0
        ("reserved_0xcd0", c_uint8 * (PAGE_SIZE - 0xCD0)),
    )


check_size(BootParams, PAGE_SIZE)
if BootParams.e820_table.offset != 0x2D0 or BootParams.cmdline_size.offset != 0x238:
    raise ImportError("BootParams offsets disagree with asm/bootparam.h")


class E820Sizes(enum.StrEnum):
    """How the RAM entries are sized (spec §2.1: "check these +1s")."""

    KRUNFW = "krunfw"  # krunfw_measurement: mem - start + 1
    LIBKRUN = "libkrun"  # libkrun: last_addr - start + 1 with last_addr = end - 1, i.e. mem - start


class VmsaFpu(enum.StrEnum):
    """FPU fields of the VMSA (spec §2.2 "Stale VMSA dumps")."""

    KRUNFW = "krunfw"  # krunfw_measurement's dumps from a Linux 5.14 host: mxcsr 0, fcw 0
    INIT2 = "init2"  # KVM_SEV_INIT2 hosts sync libkrun's FPU setup: mxcsr 0x1f80, fcw 0x37f


@dataclass(frozen=True)
class KrunPayload:
    qboot: bytes
    kernel: bytes
    kernel_load_addr: int
    initrd: bytes


@dataclass(frozen=True)
class KrunOptions:
    cpus: int
    memory_mib: int
    e820: E820Sizes = E820Sizes.KRUNFW
    fpu: VmsaFpu = VmsaFpu.KRUNFW


def boot_params(opts: KrunOptions, initrd_size: int) -> bytes:
    """The boot_params page libkrun writes at 0x7000 (KRUNFW setup_bootp; spec §2.1)."""
    mem = opts.memory_mib * 1024 * 1024
    plus = 1 if opts.e820 is E820Sizes.KRUNFW else 0
    bp = build(
        BootParams,
        type_of_loader=0xFF,  # KERNEL_LOADER_OTHER
        boot_flag=0xAA55,
        header=0x53726448,  # "HdrS"
        kernel_alignment=0x0100_0000,
        cmd_line_ptr=0x20000,
        cmdline_size=0x200,
        ramdisk_image=INITRD_GPA,
        ramdisk_size=initrd_size,
        syssize=opts.cpus,  # libkrun's TEE hack: the vCPU count travels in hdr.syssize
    )
    entries = [(0, EBDA_START)]
    if mem <= MMIO_MEM_START:
        entries.append((HIMEM_START, mem - HIMEM_START + plus))
    else:
        entries += [
            (HIMEM_START, MMIO_MEM_START - HIMEM_START),
            (FIRST_ADDR_PAST_32BITS, mem - MMIO_MEM_START + plus),
        ]
    for i, (addr, size) in enumerate(entries):
        bp.e820_table[i] = build(E820Entry, addr=addr, size=size, type=E820_RAM)
    bp.e820_entries = len(entries)
    return bytes(bp)


def vmsa(*, bsp: bool, sev_features: int, fpu: VmsaFpu) -> bytes:
    """libkrun's vCPU state at launch (decoded from KRUNFW utils/vmsa.h; spec §2.1)."""
    data = seg(0, 0x93, 0xFFFF, 0)
    area = build(
        SaveArea,
        es=data,
        cs=seg(0xF000, 0x9A, 0xFFFF, 0xFFFF_0000),
        ss=seg(0, 0x92, 0xFFFF, 0),
        ds=data,
        fs=data,
        gs=data,
        gdtr=seg(0, 0, 0xFFFF, 0),
        idtr=seg(0, 0, 0xFFFF, 0),
        ldtr=seg(0, 0x82, 0xFFFF, 0),
        tr=seg(0, 0x83, 0xFFFF, 0),
        efer=0x1000,
        cr4=0x40,
        cr0=0x10,
        dr7=0x400,
        dr6=0xFFFF0FF0,
        rflags=0x2,
        rip=BSP_RIP if bsp else AP_RIP,
        g_pat=G_PAT_DEFAULT,
        sev_features=sev_features,
        xcr0=0x1,
    )
    if bsp:
        area.rsp = area.rbp = BSP_STACK
        area.rsi = ZERO_PAGE_GPA
    if fpu is VmsaFpu.INIT2:
        area.mxcsr, area.x87_fcw = MXCSR_INIT2, FCW_INIT2
    return bytes(area)


def _padded(blob: bytes) -> bytes:
    return blob + bytes(-len(blob) % PAGE_SIZE)


def _check(opts: KrunOptions) -> None:
    if opts.cpus < 1 or opts.memory_mib < 4:
        raise MeasurementError("krun needs at least one vCPU and 4 MiB of memory")


def snp(p: KrunPayload, opts: KrunOptions) -> bytes:
    """SNP launch digest in libkrun's SNP_LAUNCH_UPDATE order (spec §2.1 steps 1-9)."""
    _check(opts)
    ld = LaunchDigest()
    ld.normal_pages(QBOOT_GPA, _padded(p.qboot))
    ld.normal_pages(p.kernel_load_addr, _padded(p.kernel))
    ld.normal_pages(INITRD_GPA, _padded(p.initrd))
    ld.normal_pages(ZERO_PAGE_GPA, boot_params(opts, len(p.initrd)))
    ld.empty_pages(PageType.ZERO, 0, PAGE_SIZE)
    ld.empty_pages(PageType.SECRETS, SECRETS_GPA, PAGE_SIZE)
    ld.empty_pages(PageType.CPUID, CPUID_GPA, PAGE_SIZE)
    ld.empty_pages(PageType.ZERO, STACK_GPA, STACK_SIZE)
    ld.vmsa(hashlib.sha384(vmsa(bsp=True, sev_features=1, fpu=opts.fpu)).digest())
    ap = hashlib.sha384(vmsa(bsp=False, sev_features=1, fpu=opts.fpu)).digest()
    for _ in range(opts.cpus - 1):
        ld.vmsa(ap)
    return ld.ld


def sev(p: KrunPayload, opts: KrunOptions, *, es: bool) -> bytes:
    """SEV: SHA-256(qboot || kernel || initrd || boot_params); SEV-ES appends the VMSAs (spec §2.1)."""
    _check(opts)
    digest = hashlib.sha256(p.qboot)
    digest.update(p.kernel)
    digest.update(p.initrd)
    digest.update(boot_params(opts, len(p.initrd)))
    if es:
        digest.update(vmsa(bsp=True, sev_features=0, fpu=opts.fpu))
        ap = vmsa(bsp=False, sev_features=0, fpu=opts.fpu)
        for _ in range(opts.cpus - 1):
            digest.update(ap)
    return digest.digest()


# --- reading the payloads out of libkrunfw-sev.so without loading it (ELF64 little-endian, System V gABI) ---
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
check_size(ELF_HEADER, 64)
SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
check_size(SECTION_HEADER, 64)
SYMBOL = struct.Struct("<IBBHQQ")
check_size(SYMBOL, 24)
SHT_NOBITS = 8
SHT_DYNSYM = 11
BUNDLES = {"qboot": b"QBOOT_BUNDLE", "kernel": b"KERNEL_BUNDLE", "initrd": b"INITRD_BUNDLE"}


def _sections(elf: bytes) -> list[tuple[int, ...]]:
    if len(elf) < ELF_HEADER.size or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise FormatError("libkrunfw library is not a 64-bit little-endian ELF file")
    fields = ELF_HEADER.unpack_from(elf)
    shoff, shentsize, shnum = fields[6], fields[11], fields[12]
    if shentsize != SECTION_HEADER.size or shoff + shnum * shentsize > len(elf):
        raise FormatError("libkrunfw library section headers are truncated")
    return [SECTION_HEADER.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]


def _slice(elf: bytes, sec: tuple[int, ...], start: int, size: int, what: str) -> bytes:
    _, sh_type, _, _, sh_offset, sh_size, *_ = sec
    if sh_type == SHT_NOBITS or start < 0 or start + size > sh_size or sh_offset + sh_size > len(elf):
        raise FormatError(f"libkrunfw library: {what} lies outside its section")
    return elf[sh_offset + start : sh_offset + start + size]


def read_libkrunfw(elf: bytes, *, kernel_load_addr: int = DEFAULT_KERNEL_LOAD_ADDR) -> KrunPayload:
    """The qboot, kernel and initrd bundles exported by a libkrunfw-sev library.

    Each bundle is a NUL-terminated C array; its getter reports sizeof - 1 (libkrunfw bin2cbundle.py).
    The kernel load address lives in the getter's code, so it is an input (default 0x1000000 for x86).
    """
    sections = _sections(elf)
    dynsym = next((s for s in sections if s[1] == SHT_DYNSYM), None)
    if dynsym is None or dynsym[6] >= len(sections):
        raise FormatError("libkrunfw library has no dynamic symbol table")
    symtab = _slice(elf, dynsym, 0, dynsym[5], "the dynamic symbol table")
    strtab_sec = sections[dynsym[6]]
    strtab = _slice(elf, strtab_sec, 0, strtab_sec[5], "the dynamic string table")
    found: dict[bytes, bytes] = {}
    for off in range(0, len(symtab) - SYMBOL.size + 1, SYMBOL.size):
        name_off, _, _, shndx, value, size = SYMBOL.unpack_from(symtab, off)
        name = strtab[name_off : strtab.find(b"\0", name_off)]
        if name in BUNDLES.values() and 0 < shndx < len(sections) and size > 0:
            sec = sections[shndx]
            found[name] = _slice(elf, sec, value - sec[3], size - 1, name.decode())
    missing = [n.decode() for n in BUNDLES.values() if n not in found]
    if missing:
        raise FormatError(
            f"libkrunfw library does not export {', '.join(missing)}: not a libkrunfw-sev build"
        )
    return KrunPayload(
        qboot=found[BUNDLES["qboot"]],
        kernel=found[BUNDLES["kernel"]],
        kernel_load_addr=kernel_load_addr,
        initrd=found[BUNDLES["initrd"]],
    )

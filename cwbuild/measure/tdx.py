"""Intel TDX: MRTD from the TDVF metadata, RTMR1 and RTMR2 for measured direct boot, and QEMU's kernel patch.

Spec: measurement.md §3.2 (MRTD, page orders), §3.3 (RTMR extension, fixed events), §3.5 (RTMR1, kernel
header patching), §3.6 (RTMR2, LoadOptions placement). RTMR0 depends on the ACPI tables of the exact QEMU
command line and the firmware's event layout; it is reported as not predicted (None), never guessed.
"""

from __future__ import annotations

import enum
import hashlib
import struct

from cwbuild.errors import MeasurementError
from cwbuild.measure.firmware import PAGE_SIZE, TDVF_ATTR_MR_EXTEND, TDVF_ATTR_PAGE_AUG, TdvfSection

RTMR_SIZE = 48
#: TDH.MEM.PAGE.ADD / TDH.MR.EXTEND records: 128-byte blocks, ASCII tag at 0, u64 GPA at 16 (spec §3.2).
MRTD_BLOCK = struct.Struct("<16sQ104x")
if MRTD_BLOCK.size != 128:
    raise ImportError("MRTD block layout must be 128 bytes (spec §3.2)")
PAGE_ADD_TAG = b"MEM.PAGE.ADD"
MR_EXTEND_TAG = b"MR.EXTEND"
#: TDH.MR.EXTEND measures 256-byte chunks (spec §3.2).
MR_EXTEND_CHUNK = 256

#: Fixed RTMR1 events after the kernel image (spec §3.5; EDK2 TdTcg2Dxe / CONTRAST rtmr.go).
EV_CALLING_EFI_APP = b"Calling EFI Application from Boot Option"
EV_EXIT_BOOT_SERVICES = b"Exit Boot Services Invocation"
EV_EXIT_BOOT_SERVICES_OK = b"Exit Boot Services Returned with Success"
#: EV_SEPARATOR data (spec §3.3).
SEPARATOR = b"\0\0\0\0"


class PageOrder(enum.StrEnum):
    """How QEMU adds and extends TDVF pages (spec §3.2 "Order variants"; pitfall §5.8)."""

    SINGLE = "single"  # ADD a page, then EXTEND it (QEMU >= 9)
    TWO_PASS = "two-pass"  # noqa: S105 - not a password; ADD every page of a section, then EXTEND them (QEMU 8.x)


class InitrdPlacement(enum.StrEnum):
    """Where edk2 puts "initrd=initrd" into the LoadOptions the Linux EFI stub measures (spec §3.6)."""

    PREFIX = "prefix"  # "initrd=initrd " + cmdline (edk2 >= stable202508, commit a2ac0fea49)
    SUFFIX = "suffix"  # cmdline + " initrd=initrd" (before stable202508)


def _page_add(gpa: int) -> bytes:
    return MRTD_BLOCK.pack(PAGE_ADD_TAG, gpa)


def _extend_page(out: hashlib._Hash, data: memoryview, gpa: int) -> None:
    for c in range(0, PAGE_SIZE, MR_EXTEND_CHUNK):
        out.update(MRTD_BLOCK.pack(MR_EXTEND_TAG, gpa + c))
        out.update(data[c : c + MR_EXTEND_CHUNK])


def mrtd(firmware: bytes, sections: tuple[TdvfSection, ...], order: PageOrder = PageOrder.SINGLE) -> bytes:
    """MRTD: one SHA-384 over PAGE.ADD and MR.EXTEND records, sections in table order (spec §3.2)."""
    out = hashlib.sha384()
    view = memoryview(firmware)
    for s in sections:
        pages = range(s.mem_size // PAGE_SIZE)
        add = not s.attributes & TDVF_ATTR_PAGE_AUG
        extend = bool(s.attributes & TDVF_ATTR_MR_EXTEND)
        if order is PageOrder.TWO_PASS:
            if add:
                out.update(b"".join(_page_add(s.gpa + p * PAGE_SIZE) for p in pages))
            if extend:
                for p in pages:
                    off = s.data_offset + p * PAGE_SIZE
                    _extend_page(out, view[off : off + PAGE_SIZE], s.gpa + p * PAGE_SIZE)
            continue
        for p in pages:
            if add:
                out.update(_page_add(s.gpa + p * PAGE_SIZE))
            if extend:
                off = s.data_offset + p * PAGE_SIZE
                _extend_page(out, view[off : off + PAGE_SIZE], s.gpa + p * PAGE_SIZE)
    return out.digest()


def extend(rtmr: bytes, event_digest: bytes) -> bytes:
    """RTMR_new = SHA-384(RTMR_old || digest) (spec §3.3)."""
    return hashlib.sha384(rtmr + event_digest).digest()


def replay(event_digests: list[bytes]) -> bytes:
    rtmr = bytes(RTMR_SIZE)
    for d in event_digests:
        rtmr = extend(rtmr, d)
    return rtmr


def _sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def rtmr1(kernel_authenticode_sha384: bytes) -> bytes:
    """RTMR1 for direct boot: the kernel's Authenticode digest, then the fixed events (spec §3.5)."""
    return replay(
        [
            kernel_authenticode_sha384,
            _sha384(EV_CALLING_EFI_APP),
            _sha384(SEPARATOR),
            _sha384(EV_EXIT_BOOT_SERVICES),
            _sha384(EV_EXIT_BOOT_SERVICES_OK),
        ]
    )


def load_options(cmdline: str | None, has_initrd: bool, placement: InitrdPlacement) -> str:
    """The LoadOptions string OVMF gives the kernel (EDK2 X86QemuLoadImageLib.c; spec §3.6)."""
    text = cmdline or ""
    if not has_initrd:
        return text
    if placement is InitrdPlacement.PREFIX:
        return "initrd=initrd " + text
    return text + " initrd=initrd"


def rtmr2(options: str, initrd_sha384: bytes | None) -> bytes:
    """RTMR2, from the Linux EFI stub (>= 6.9): UTF-16LE LoadOptions + NUL, then the initrd (spec §3.6)."""
    events = [_sha384(options.encode("utf-16-le") + b"\0\0")]
    if initrd_sha384 is not None:
        events.append(initrd_sha384)
    return replay(events)


# Linux boot protocol setup header offsets (Documentation/arch/x86/boot.rst; spec §3.5 "Patch").
_PROTOCOL = 0x206
_TYPE_OF_LOADER = 0x210
_LOADFLAGS = 0x211
_HEAP_END_PTR = 0x224
_RAMDISK_IMAGE = 0x218
_RAMDISK_SIZE = 0x21C
_CMD_LINE_PTR = 0x228
_INITRD_ADDR_MAX = 0x22C
_XLOADFLAGS = 0x236
_OLD_CMDLINE_MAGIC = 0x20
#: QEMU's acpi_data_size for TDX guests (spec §3.5: DMR/FTDX patch_kernel).
ACPI_DATA_SIZE = 0x28000
HEADER_END = 0x240


def patch_kernel_header(head: bytearray, *, initrd_size: int | None, memory: int) -> None:
    """Apply QEMU <= 10.1's x86_load_linux setup-header edits (TDX only; spec §3.5 "Kernel bytes")."""
    if len(head) < HEADER_END:
        raise MeasurementError("kernel is too small to hold a Linux setup header")
    protocol = struct.unpack_from("<H", head, _PROTOCOL)[0]
    loaded_high = protocol >= 0x200 and head[_LOADFLAGS] & 1
    real, cmd = (0x10000, 0x20000) if loaded_high else (0x90000, 0x9A000)
    if protocol >= 0x200:
        head[_TYPE_OF_LOADER] = 0xB0
    if protocol >= 0x201:
        head[_LOADFLAGS] |= 0x80
        struct.pack_into("<I", head, _HEAP_END_PTR, cmd - real - 0x200)
    if protocol >= 0x202:
        struct.pack_into("<I", head, _CMD_LINE_PTR, cmd)
    else:
        struct.pack_into("<HH", head, _OLD_CMDLINE_MAGIC, 0xA33F, cmd - real)
    if initrd_size is None:
        return
    xload = struct.unpack_from("<H", head, _XLOADFLAGS)[0]
    if protocol >= 0x20C and xload & 0x40:
        initrd_max = 0xFFFF_FFFF
    else:
        initrd_max = struct.unpack_from("<I", head, _INITRD_ADDR_MAX)[0] if protocol >= 0x203 else 0
        initrd_max = initrd_max or 0x37FF_FFFF
    below_4g = min(memory, 0x8000_0000 if memory >= 0xB000_0000 else 0xB000_0000)
    initrd_max = min(initrd_max, below_4g - ACPI_DATA_SIZE - 1)
    if initrd_size > initrd_max:
        raise MeasurementError("initrd does not fit below the kernel's initrd_addr_max in guest memory")
    struct.pack_into("<II", head, _RAMDISK_IMAGE, (initrd_max - initrd_size) & ~0xFFF, initrd_size)

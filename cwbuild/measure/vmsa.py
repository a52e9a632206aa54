"""The initial VMSA (VM save area) page of an SEV-ES / SNP vCPU, per VMM, and the vCPU signature table.

Spec: measurement.md §1.7 (byte offsets, per-VMM values), §1.9 (SVSM), §2.1 (krun). Offsets follow AMD APM
vol. 2 table B-4 (struct sev_es_save_area in Linux arch/x86/include/asm/svm.h). Fields cwbuild never sets are
zero at launch and declared as `reserved_0xNNN` ranges named by their offset.
"""

from __future__ import annotations

import ctypes
import enum
import functools
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64
from dataclasses import dataclass

from cwbuild.errors import UsageError
from cwbuild.measure.layout import build, check_size

PAGE_SIZE = 4096
#: The BSP starts at the x86 reset vector (spec §1.7: cs.base 0xffff0000, rip 0xfff0).
BSP_EIP = 0xFFFF_FFF0


class VmcbSeg(ctypes.LittleEndianStructure):
    """struct vmcb_seg: u16 selector, u16 attrib, u32 limit, u64 base (spec §1.7)."""

    _pack_ = 1
    _fields_ = (("selector", c_uint16), ("attrib", c_uint16), ("limit", c_uint32), ("base", c_uint64))


check_size(VmcbSeg, 16)


class SaveArea(ctypes.LittleEndianStructure):
    """The 4096-byte VMSA page; offsets from spec §1.7 (VERIFIED there against SSM's ctypes layout)."""

    _pack_ = 1
    _fields_ = (
        ("es", VmcbSeg),  # 0x000
        ("cs", VmcbSeg),  # 0x010
        ("ss", VmcbSeg),  # 0x020
        ("ds", VmcbSeg),  # 0x030
        ("fs", VmcbSeg),  # 0x040
        ("gs", VmcbSeg),  # 0x050
        ("gdtr", VmcbSeg),  # 0x060
        ("ldtr", VmcbSeg),  # 0x070
        ("idtr", VmcbSeg),  # 0x080
        ("tr", VmcbSeg),  # 0x090
        ("reserved_0x0a0", c_uint8 * 0x30),
        ("efer", c_uint64),  # 0x0d0
        ("reserved_0x0d8", c_uint8 * 0x68),
        ("xss", c_uint64),  # 0x140
        ("cr4", c_uint64),  # 0x148
        ("cr3", c_uint64),  # 0x150
        ("cr0", c_uint64),  # 0x158
        ("dr7", c_uint64),  # 0x160
        ("dr6", c_uint64),  # 0x168
        ("rflags", c_uint64),  # 0x170
        ("rip", c_uint64),  # 0x178
        ("reserved_0x180", c_uint8 * 0x58),
        ("rsp", c_uint64),  # 0x1d8
        ("reserved_0x1e0", c_uint8 * 0x88),
        ("g_pat", c_uint64),  # 0x268
        ("reserved_0x270", c_uint8 * 0xA0),
        ("rdx", c_uint64),  # 0x310
        ("reserved_0x318", c_uint8 * 0x10),
        ("rbp", c_uint64),  # 0x328
        ("rsi", c_uint64),  # 0x330
        ("reserved_0x338", c_uint8 * 0x78),
        ("sev_features", c_uint64),  # 0x3b0
        ("reserved_0x3b8", c_uint8 * 0x30),
        ("xcr0", c_uint64),  # 0x3e8
        ("reserved_0x3f0", c_uint8 * 0x18),
        ("mxcsr", c_uint32),  # 0x408
        ("reserved_0x40c", c_uint8 * 4),
        ("x87_fcw", c_uint16),  # 0x410
        ("reserved_0x412", c_uint8 * (PAGE_SIZE - 0x412)),
    )


check_size(SaveArea, PAGE_SIZE)
for _name, _offset in (
    ("efer", 0xD0),
    ("rip", 0x178),
    ("rdx", 0x310),
    ("sev_features", 0x3B0),
    ("x87_fcw", 0x410),
):
    if getattr(SaveArea, _name).offset != _offset:
        raise ImportError(f"SaveArea.{_name} is not at {_offset:#x} (spec §1.7)")

#: PAT MSR reset value (AMD APM vol. 2 §A.3; spec §1.7 table).
G_PAT_DEFAULT = 0x0007_0406_0007_0406
#: GCE's hypervisor overwrites g_pat (spec §1.7 table, SSM vmsa.py).
G_PAT_GCE = 0x0007_0106
#: Values set by KVM at reset (spec §1.7 "Common values"): EFER.SVME, CR4.MCE, CR0.ET, DR7/DR6 reset values.
EFER_SVME = 0x1000
CR4_MCE = 0x40
CR0_ET = 0x10
DR7_RESET = 0x400
DR6_RESET = 0xFFFF0FF0
RFLAGS_RESET = 0x2
XCR0_X87 = 0x1
#: FPU state that KVM_SEV_INIT2 syncs into the VMSA (spec §1.7, SSM ae95e59; pitfall §5.2).
MXCSR_INIT2 = 0x1F80
FCW_INIT2 = 0x37F
#: EC2 and GCE put this into rdx regardless of the vCPU model (spec §1.7 table; SSM 4a02bf0).
RDX_FIXED = 0x600


class VmmType(enum.StrEnum):
    """Who creates the VM; each sets slightly different initial registers (spec §1.7 table)."""

    QEMU = "qemu"
    EC2 = "ec2"
    GCE = "gce"
    #: EC2 as modelled before sev-snp-measure 0.0.13 (rdx 0), as the Go and Rust ports still do (spec §5.3)
    EC2_LEGACY = "ec2-rdx0"

    @property
    def needs_vcpu_sig(self) -> bool:
        """Only QEMU puts the vCPU signature into rdx (spec §5.4)."""
        return self is VmmType.QEMU

    @property
    def is_ec2(self) -> bool:
        return self in (VmmType.EC2, VmmType.EC2_LEGACY)

    @property
    def fixed_rdx(self) -> int:
        """rdx for VMMs that ignore the vCPU model (spec §1.7 table)."""
        return 0 if self is VmmType.EC2_LEGACY else RDX_FIXED


def cpu_sig(family: int, model: int, stepping: int) -> int:
    """CPUID Fn0000_0001_EAX from family/model/stepping (AMD pub. 25481; spec §1.7 formula)."""
    fam_lo, fam_hi = (0xF, (family - 0xF) & 0xFF) if family > 0xF else (family, 0)
    return fam_hi << 20 | (model >> 4 & 0xF) << 16 | fam_lo << 8 | (model & 0xF) << 4 | (stepping & 0xF)


_EPYC = cpu_sig(23, 1, 2)
_ROME = cpu_sig(23, 49, 0)
_MILAN = cpu_sig(25, 1, 1)
_GENOA = cpu_sig(25, 17, 0)
#: QEMU -cpu model → signature (spec §1.7 "vcpu_sig table"; SSM vcpu_types.py 0.0.13).
VCPU_TYPES: dict[str, int] = {
    **dict.fromkeys(("EPYC", "EPYC-v1", "EPYC-v2", "EPYC-v3", "EPYC-v4", "EPYC-IBPB"), _EPYC),
    **dict.fromkeys(("EPYC-Rome", "EPYC-Rome-v1", "EPYC-Rome-v2", "EPYC-Rome-v3"), _ROME),
    **dict.fromkeys(("EPYC-Milan", "EPYC-Milan-v1", "EPYC-Milan-v2"), _MILAN),
    **dict.fromkeys(("EPYC-Genoa", "EPYC-Genoa-v1"), _GENOA),
    "EPYC-Turin": cpu_sig(26, 0, 0),
}


def vcpu_sig_for(name: str) -> int:
    try:
        return VCPU_TYPES[name]
    except KeyError:
        raise UsageError(
            f"unknown vCPU type {name!r}", hint=f"one of: {', '.join(VCPU_TYPES)}; or pass --vcpu-sig"
        ) from None


def seg(selector: int, attrib: int, limit: int, base: int) -> VmcbSeg:
    return build(VmcbSeg, selector=selector, attrib=attrib, limit=limit, base=base)


@dataclass(frozen=True)
class _VmmRegs:
    cs_attr_bsp: int
    cs_attr_ap: int
    ss_attr: int
    tr_attr: int
    mxcsr: int
    fcw: int
    g_pat: int


#: Per-VMM register values (spec §1.7 table).
_VMM_REGS = {
    VmmType.QEMU: _VmmRegs(0x9B, 0x9B, 0x93, 0x8B, MXCSR_INIT2, FCW_INIT2, G_PAT_DEFAULT),
    VmmType.EC2: _VmmRegs(0x9A, 0x9B, 0x92, 0x83, 0, 0, G_PAT_DEFAULT),
    VmmType.GCE: _VmmRegs(0x9B, 0x9B, 0x93, 0x8B, 0, 0, G_PAT_GCE),
    VmmType.EC2_LEGACY: _VmmRegs(0x9A, 0x9B, 0x92, 0x83, 0, 0, G_PAT_DEFAULT),
}


def _real_mode_area(eip: int, cs_attr: int, ss_attr: int, tr_attr: int) -> SaveArea:
    """The register state every VMM shares at the reset vector (spec §1.7 "Common values")."""
    data = seg(0, 0x93, 0xFFFF, 0)
    return build(
        SaveArea,
        es=data,
        cs=seg(0xF000, cs_attr, 0xFFFF, eip & 0xFFFF0000),
        ss=seg(0, ss_attr, 0xFFFF, 0),
        ds=data,
        fs=data,
        gs=data,
        gdtr=seg(0, 0, 0xFFFF, 0),
        idtr=seg(0, 0, 0xFFFF, 0),
        ldtr=seg(0, 0x82, 0xFFFF, 0),
        tr=seg(0, tr_attr, 0xFFFF, 0),
        efer=EFER_SVME,
        cr4=CR4_MCE,
        cr0=CR0_ET,
        dr7=DR7_RESET,
        dr6=DR6_RESET,
        rflags=RFLAGS_RESET,
        rip=eip & 0xFFFF,
        xcr0=XCR0_X87,
    )


@functools.lru_cache(maxsize=64)
def vmsa_page(*, eip: int, vmm: VmmType, vcpu_sig: int, sev_features: int) -> bytes:
    """The VMSA page of a vCPU starting at `eip` (BSP_EIP for the BSP, the reset block for APs)."""
    regs = _VMM_REGS[vmm]
    area = _real_mode_area(
        eip, regs.cs_attr_bsp if eip == BSP_EIP else regs.cs_attr_ap, regs.ss_attr, regs.tr_attr
    )
    area.g_pat = regs.g_pat
    area.rdx = vcpu_sig if vmm.needs_vcpu_sig else vmm.fixed_rdx
    area.sev_features = sev_features
    area.mxcsr = regs.mxcsr
    area.x87_fcw = regs.fcw
    return bytes(area)


@functools.lru_cache(maxsize=16)
def svsm_vmsa_page(*, eip: int, vcpu_sig: int) -> bytes:
    """The VMSA every vCPU gets in SVSM mode (spec §1.9): 32-bit flat segments, full EIP, SNP active only."""
    flat_data = seg(16, 0xC93, 0xFFFF_FFFF, 0)
    area = build(
        SaveArea,
        es=flat_data,
        cs=seg(8, 0xC9B, 0xFFFF_FFFF, 0),
        ss=flat_data,
        ds=flat_data,
        fs=flat_data,
        gs=seg(0, 0x93, 0xFFFF, 0),
        gdtr=seg(0, 0, 0xFFFF, 0),
        idtr=seg(0, 0, 0xFFFF, 0),
        ldtr=seg(0, 0x82, 0xFFFF, 0),
        tr=seg(0, 0x8B, 0xFFFF, 0),
        efer=EFER_SVME,
        cr4=CR4_MCE,
        cr0=CR0_ET | 0x1,  # protected mode (spec §1.9: cr0 0x11)
        dr7=DR7_RESET,
        dr6=DR6_RESET,
        rflags=RFLAGS_RESET,
        rip=eip,
        g_pat=G_PAT_DEFAULT,
        rdx=vcpu_sig,
        sev_features=0x1,  # fixed SNPActive; guest features are ignored (spec §1.9)
        xcr0=XCR0_X87,
        mxcsr=MXCSR_INIT2,
        # x87_fcw stays 0: sev-snp-measure passes `fcw=` (not a field) and real-hardware vectors agree (§1.9).
    )
    return bytes(area)

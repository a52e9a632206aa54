"""AMD SEV, SEV-ES and SEV-SNP launch digests (QEMU, EC2, GCE; SVSM) from parsed firmware and input digests.

Spec: measurement.md §1.3 (hashes table), §1.4 (SEV/SEV-ES), §1.5-§1.6 (SNP PAGE_INFO chain), §1.8 (OVMF
hash seed), §1.9 (SVSM). Bit-identical to sev-snp-measure 0.0.13. Kernel, initrd and cmdline enter only
through their SHA-256 digests, so large files are hashed elsewhere, streaming, once.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from cwbuild.errors import MeasurementError
from cwbuild.measure.firmware import PAGE_SIZE, Firmware, SevSection, SevSectionType
from cwbuild.measure.layout import check_size, guid
from cwbuild.measure.vmsa import BSP_EIP, VmmType, svsm_vmsa_page, vmsa_page

LD_SIZE = 48

# SEV hashes table GUIDs (spec §1.3; QEMU target/i386/sev.c).
HASH_TABLE_HEADER_GUID = guid("9438d606-4f22-4cc9-b479-a793d411fd21")
HASH_TABLE_CMDLINE_GUID = guid("97d02dd8-bd20-4c94-aa78-e7714d36ab2a")
HASH_TABLE_INITRD_GUID = guid("44baf731-3a2f-4bd7-9af1-41e29169781d")
HASH_TABLE_KERNEL_GUID = guid("4de79437-abd2-427f-b835-d5b172d2045b")
#: One entry: GUID, u16 length (50), sha256 (spec §1.3).
HASH_TABLE_ENTRY = struct.Struct("<16sH32s")
check_size(HASH_TABLE_ENTRY, 50)
#: The table: GUID, u16 length (168), then the cmdline, initrd and kernel entries (spec §1.3).
HASH_TABLE = struct.Struct("<16sH50s50s50s")
check_size(HASH_TABLE, 168)
#: QEMU pads the table to a multiple of 16 (PaddedSevHashTable, spec §1.3).
HASH_TABLE_PADDED_SIZE = 176

#: PAGE_INFO tail after the two 48-byte digests: u16 length, u8 page_type, u8 is_imi, u8 vmpl3/2/1 perms,
#: u8 reserved, u64 gpa (SNP ABI §8.17.2 table 67; spec §1.5).
PAGE_INFO_TAIL = struct.Struct("<HBBBBBBQ")
check_size(PAGE_INFO_TAIL, 16)
PAGE_INFO_SIZE = 2 * LD_SIZE + PAGE_INFO_TAIL.size  # 0x70
#: VMSA pages are recorded at GPA -1, page aligned, bits above 51 cleared (spec §1.5; SSM GCTX.VMSA_GPA).
VMSA_GPA = 0x0000_FFFF_FFFF_F000
_ZERO_CONTENTS = bytes(LD_SIZE)


class PageType(enum.IntEnum):
    """SNP page types (spec §1.5)."""

    NORMAL = 1
    VMSA = 2
    ZERO = 3
    UNMEASURED = 4
    SECRETS = 5
    CPUID = 6


class SevMode(enum.StrEnum):
    SEV = "sev"
    SEV_ES = "sev-es"
    SNP = "snp"


@dataclass(frozen=True)
class BootHashes:
    """What measured direct boot hashes: SHA-256 of kernel, initrd (of b"" if none), and the cmdline."""

    kernel_sha256: bytes
    initrd_sha256: bytes
    cmdline: str | None

    def cmdline_bytes(self) -> bytes:
        """QEMU passes a NUL-terminated cmdline, also when none is given (spec §1.3)."""
        return (self.cmdline or "").encode() + b"\0"

    def table(self) -> bytes:
        """The padded 176-byte hashes table (spec §1.3): cmdline, initrd, kernel entries, in that order."""

        def entry(entry_guid: bytes, digest: bytes) -> bytes:
            return HASH_TABLE_ENTRY.pack(entry_guid, HASH_TABLE_ENTRY.size, digest)

        table = HASH_TABLE.pack(
            HASH_TABLE_HEADER_GUID,
            HASH_TABLE.size,
            entry(HASH_TABLE_CMDLINE_GUID, hashlib.sha256(self.cmdline_bytes()).digest()),
            entry(HASH_TABLE_INITRD_GUID, self.initrd_sha256),
            entry(HASH_TABLE_KERNEL_GUID, self.kernel_sha256),
        )
        return table + bytes(HASH_TABLE_PADDED_SIZE - len(table))

    def page(self, offset: int) -> bytes:
        """A zero page with the padded table at `offset` (the hashes table GPA & 0xfff; spec §1.3)."""
        table = self.table()
        if offset + len(table) > PAGE_SIZE:
            raise MeasurementError(f"SEV hashes table at page offset {offset:#x} does not fit in one page")
        return bytes(offset) + table + bytes(PAGE_SIZE - offset - len(table))


class LaunchDigest:
    """The SNP launch digest: LD = SHA-384(PAGE_INFO) per measured page (spec §1.5)."""

    def __init__(self, seed: bytes = _ZERO_CONTENTS) -> None:
        if len(seed) != LD_SIZE:
            raise MeasurementError(f"SNP OVMF hash seed must be {LD_SIZE} bytes, got {len(seed)}")
        self.ld = seed

    def update(self, page_type: PageType, gpa: int, contents: bytes) -> None:
        tail = PAGE_INFO_TAIL.pack(PAGE_INFO_SIZE, page_type, 0, 0, 0, 0, 0, gpa)
        self.ld = hashlib.sha384(self.ld + contents + tail).digest()

    def normal_pages(self, gpa: int, data: bytes | memoryview) -> None:
        if len(data) % PAGE_SIZE:
            raise MeasurementError(f"measured region at {gpa:#x} is not a whole number of pages")
        view = memoryview(data)
        for off in range(0, len(view), PAGE_SIZE):
            self.update(PageType.NORMAL, gpa + off, hashlib.sha384(view[off : off + PAGE_SIZE]).digest())

    def empty_pages(self, page_type: PageType, gpa: int, size: int) -> None:
        """ZERO, UNMEASURED, SECRETS and CPUID pages contribute 48 zero bytes as contents (spec §1.5)."""
        if size % PAGE_SIZE:
            raise MeasurementError(f"metadata section at {gpa:#x} is not a whole number of pages")
        for off in range(0, size, PAGE_SIZE):
            self.update(page_type, gpa + off, _ZERO_CONTENTS)

    def vmsa(self, page_digest: bytes) -> None:
        self.update(PageType.VMSA, VMSA_GPA, page_digest)


def ovmf_pages_digest(fw: Firmware) -> bytes:
    """The `snp:ovmf-hash` value: the LD after the firmware's NORMAL pages only (spec §1.8)."""
    ld = LaunchDigest()
    ld.normal_pages(fw.gpa, fw.data)
    return ld.ld


def _snp_section(
    ld: LaunchDigest, fw: Firmware, s: SevSection, boot: BootHashes | None, vmm: VmmType
) -> None:
    """One ASEV section (spec §1.6 step 4)."""
    if s.type is SevSectionType.SNP_SEC_MEM:
        ld.empty_pages(PageType.UNMEASURED if vmm is VmmType.GCE else PageType.ZERO, s.gpa, s.size)
    elif s.type is SevSectionType.SNP_SECRETS:
        ld.empty_pages(PageType.SECRETS, s.gpa, PAGE_SIZE)
    elif s.type is SevSectionType.CPUID:
        if not vmm.is_ec2:  # EC2 adds the CPUID pages after all sections (step 5)
            ld.empty_pages(PageType.CPUID, s.gpa, PAGE_SIZE)
    elif s.type is SevSectionType.SNP_KERNEL_HASHES:
        if boot is None:
            ld.empty_pages(PageType.ZERO, s.gpa, s.size)
        else:
            if s.size != PAGE_SIZE:
                raise MeasurementError(f"SNP_KERNEL_HASHES section is {s.size:#x} bytes, expected one page")
            ld.normal_pages(s.gpa, boot.page(fw.sev_hashes_table_gpa() & (PAGE_SIZE - 1)))
    else:  # SVSM_CAA
        ld.empty_pages(PageType.ZERO, s.gpa, s.size)


def snp_metadata_pages(ld: LaunchDigest, fw: Firmware, boot: BootHashes | None, vmm: VmmType) -> None:
    """All ASEV sections in table order, then EC2's CPUID pages (spec §1.6 steps 4-6)."""
    if boot is not None and not fw.has_section(SevSectionType.SNP_KERNEL_HASHES):
        raise MeasurementError(
            "a kernel was given but the firmware's SEV metadata has no SNP_KERNEL_HASHES section",
            hint="use an AmdSev OVMF build (OvmfPkg/AmdSev/AmdSevX64.dsc), e.g. Debian's OVMF.amdsev.fd",
        )
    for section in fw.sev_sections:
        _snp_section(ld, fw, section, boot, vmm)
    if vmm.is_ec2:
        for section in fw.sev_sections:
            if section.type is SevSectionType.CPUID:
                ld.empty_pages(PageType.CPUID, section.gpa, PAGE_SIZE)


@dataclass(frozen=True)
class VcpuConfig:
    count: int
    vmm: VmmType
    vcpu_sig: int
    guest_features: int = 0x1


def _vmsa_pages(fw: Firmware, cpu: VcpuConfig, sev_features: int) -> tuple[bytes, bytes | None]:
    """The BSP page and (with APs) the AP page; APs start at the SEV-ES reset block (spec §1.6 step 7)."""
    if cpu.count < 1:
        raise MeasurementError("at least one vCPU is needed")
    bsp = vmsa_page(eip=BSP_EIP, vmm=cpu.vmm, vcpu_sig=cpu.vcpu_sig, sev_features=sev_features)
    if cpu.count == 1:
        return bsp, None
    ap_eip = fw.sev_es_reset_eip()
    if ap_eip == 0:
        raise MeasurementError("firmware's SEV-ES reset block is 0: application processors cannot start")
    return bsp, vmsa_page(eip=ap_eip, vmm=cpu.vmm, vcpu_sig=cpu.vcpu_sig, sev_features=sev_features)


def snp_launch_digest(
    fw: Firmware, boot: BootHashes | None, cpu: VcpuConfig, *, ovmf_hash: bytes | None = None
) -> bytes:
    """SNP launch digest (spec §1.6). `ovmf_hash` seeds the chain instead of hashing the firmware pages."""
    ld = LaunchDigest(ovmf_hash if ovmf_hash is not None else ovmf_pages_digest(fw))
    snp_metadata_pages(ld, fw, boot, cpu.vmm)
    bsp, ap = _vmsa_pages(fw, cpu, cpu.guest_features)
    ld.vmsa(hashlib.sha384(bsp).digest())
    if ap is not None:
        ap_digest = hashlib.sha384(ap).digest()  # one digest per distinct VMSA
        for _ in range(cpu.count - 1):
            ld.vmsa(ap_digest)
    return ld.ld


def _sev_prefix(fw: Firmware, boot: BootHashes | None) -> hashlib._Hash:
    digest = hashlib.sha256(fw.data)
    if boot is not None:
        if fw.sev_hashes_table_gpa() == 0:
            raise MeasurementError(
                "a kernel was given but the firmware has no SEV hashes table (no measured direct boot)",
                hint="use an AmdSev OVMF build, e.g. Debian's OVMF.amdsev.fd",
            )
        digest.update(boot.table())
    return digest


def sev_launch_digest(fw: Firmware, boot: BootHashes | None) -> bytes:
    """SEV launch digest: SHA-256(firmware || hashes table if a kernel is measured) (spec §1.4)."""
    return _sev_prefix(fw, boot).digest()


def sev_es_launch_digest(fw: Firmware, boot: BootHashes | None, cpu: VcpuConfig) -> bytes:
    """SEV-ES: the SEV digest extended with every vCPU's VMSA; sev_features is 0 (spec §1.4)."""
    digest = _sev_prefix(fw, boot)
    bsp, ap = _vmsa_pages(fw, cpu, 0)
    digest.update(bsp)
    for _ in range(cpu.count - 1):
        digest.update(ap or b"")
    return digest.digest()


def svsm_launch_digest(fw: Firmware, svsm_data: bytes, *, vars_size: int, vcpus: int, vcpu_sig: int) -> bytes:
    """SNP with a COCONUT SVSM below the OVMF and its variable store (QEMU only; spec §1.9)."""
    if vcpus < 1:
        raise MeasurementError("at least one vCPU is needed")
    svsm = Firmware.parse(svsm_data, end_at=fw.gpa - vars_size)
    ld = LaunchDigest(ovmf_pages_digest(fw))
    ld.normal_pages(svsm.gpa, svsm.data)
    snp_metadata_pages(ld, svsm, None, VmmType.QEMU)  # the SVSM's own metadata, not the OVMF's
    page_digest = hashlib.sha384(svsm_vmsa_page(eip=svsm.svsm_entry_eip(), vcpu_sig=vcpu_sig)).digest()
    for _ in range(vcpus):
        ld.vmsa(page_digest)
    return ld.ld

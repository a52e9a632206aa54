"""What a launch configuration says: the TEE kind and every value the VMM is told (a frozen `LaunchSpec`).

Everything measured (firmware, kernel, initrd, command line, vCPU count and model, SEV policy) must reach QEMU
exactly as `cwbuild measure` assumed it, so the spec is the one place those values live; the renderers in
`cwbuild.launch.render` only format it. Values are checked here once, so every renderer may rely on them:
bundle-relative file names from a small character set, no control characters anywhere, bounded numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from cwbuild.errors import UsageError

# --- SEV guest policy bits (AMD SEV API spec 56860 §3 Table 2; QEMU target/i386/sev.h SEV_POLICY_*) ---
SEV_POLICY_NODBG = 0x01
SEV_POLICY_NOKS = 0x02
SEV_POLICY_ES = 0x04
# --- SEV-SNP guest policy (SNP ABI spec 56860 §4.3 Table 9): bit 16 SMT allowed, bit 17 reserved and must
# be one, bit 19 DEBUG. 0x30000 is QEMU's default (docs/system/i386/amd-memory-encryption.rst). ---
SNP_POLICY_SMT = 1 << 16
SNP_POLICY_RESERVED_MBO = 1 << 17
SNP_POLICY_DEBUG = 1 << 19
SNP_POLICY_DEFAULT = SNP_POLICY_SMT | SNP_POLICY_RESERVED_MBO
# --- SNP VMSA SEV_FEATURES the measurement assumes (spec/measurement.md §1.7: 0x1 = SNPActive, the
# sev-snp-measure default since 0.0.10 and what KVM sets on host kernels >= 6.8). QEMU has no property for it:
# it is recorded, not passed. ---
SNP_GUEST_FEATURES_DEFAULT = 0x1
# --- C-bit position / reduced physical bits on Milan, Genoa and Turin (QEMU amd-memory-encryption.rst;
# CPUID 0x8000001F EBX). ---
CBITPOS_DEFAULT = 51
REDUCED_PHYS_BITS_DEFAULT = 1
# --- The Intel Quote Generation Service listens on vsock port 4050 of the host (cid 2) by default
# (QEMU docs/system/i386/tdx.rst "quote-generation-socket"). ---
TDX_QGS_VSOCK_CID = 2
TDX_QGS_VSOCK_PORT_DEFAULT = 4050
# --- libkrun's TeeConfig.cpus is a u8 (spec/cw-format.md §1.4); q35 without an IOMMU also stops at 255. ---
MAX_CPUS = 255
MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 4 * 1024 * 1024
# --- x86 boot protocol: cmdline_size is 2047 for protocol >= 2.06 (Documentation/arch/x86/boot.rst). ---
MAX_CMDLINE_BYTES = 2047
MAX_TEXT = 1024
#: The virtio-serial port name the simulated-TEE signer answers on (guest: /dev/virtio-ports/<name>).
SIM_PORT_NAME = "org.cwbuild.simtee.0"
#: SNP generations krun-sev.json may name (buildah SnpWorkloadData comment; spec/cw-format.md §1.4).
SNP_GENERATIONS = ("milan", "genoa", "turin")
#: Where libvirt.xml expects the bundle unless told otherwise (libvirt needs absolute paths, and this is the
#: directory its security drivers label for guests).
LIBVIRT_IMAGES_DIR = "/var/lib/libvirt/images"

_REL_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*")
_ABS_DIR = re.compile(r"(/[A-Za-z0-9_][A-Za-z0-9._+-]*)+")
_CPU_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Tee(StrEnum):
    """The TEE kinds a bundle can be launched as (DESIGN.md `--tee`)."""

    SNP = "snp"
    SEV_ES = "sev-es"
    SEV = "sev"
    TDX = "tdx"
    SIM = "sim"

    @classmethod
    def from_buildah_type(cls, word: str) -> Tee:
        """buildah's `--type` words with buildah's meaning: `sev` is SEV-ES, `sev_no_es` is SEV."""
        table = {"snp": cls.SNP, "sev": cls.SEV_ES, "sev_no_es": cls.SEV}
        if word.lower() not in table:
            raise UsageError(f"unknown --type {word!r}", hint="use snp, sev or sev_no_es")
        return table[word.lower()]

    @property
    def is_amd(self) -> bool:
        """Booted with the AmdSev OVMF and SEV kernel hashes (SIM builds like SNP)."""
        return self in (Tee.SNP, Tee.SEV_ES, Tee.SEV, Tee.SIM)

    @property
    def default_firmware(self) -> str:
        """Bundle-relative firmware file (Debian ovmf-amdsev / ovmf-inteltdx; spec/measurement.md §0 DEB)."""
        return "firmware/OVMF.inteltdx.ms.fd" if self is Tee.TDX else "firmware/OVMF.amdsev.fd"

    @property
    def default_vcpu_model(self) -> str:
        """EPYC-v4 is sev-snp-measure's reference model (signature 0x800f12); TDX takes the host CPU."""
        return "host" if self is Tee.TDX else "EPYC-v4"

    @property
    def default_policy(self) -> int:
        """Debug off everywhere; SEV and SEV-ES also forbid key sharing."""
        return {
            Tee.SNP: SNP_POLICY_DEFAULT,
            Tee.SIM: SNP_POLICY_DEFAULT,
            Tee.SEV_ES: SEV_POLICY_NODBG | SEV_POLICY_NOKS | SEV_POLICY_ES,
            Tee.SEV: SEV_POLICY_NODBG | SEV_POLICY_NOKS,
            Tee.TDX: 0,
        }[self]


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """Everything the launch configs state. `None` fields take the TEE's default (see `Tee`)."""

    tee: Tee
    workload_id: str
    cmdline: str
    cpus: int = 2
    memory_mib: int = 2048
    vcpu_model: str | None = None
    policy: int | None = None
    guest_features: int = SNP_GUEST_FEATURES_DEFAULT
    cbitpos: int = CBITPOS_DEFAULT
    reduced_phys_bits: int = REDUCED_PHYS_BITS_DEFAULT
    firmware: str | None = None
    kernel: str = "vmlinuz"
    initrd: str = "initrd.img"
    disk: str = "disk.img"
    disk_format: str = "raw"
    attestation_url: str = ""
    snp_gen: str = "milan"
    tdx_qgs_port: int | None = TDX_QGS_VSOCK_PORT_DEFAULT
    bundle_dir: str | None = None

    def __post_init__(self) -> None:
        _check_spec(self)

    @property
    def firmware_path(self) -> str:
        return self.firmware if self.firmware is not None else self.tee.default_firmware

    @property
    def cpu_model(self) -> str:
        return self.vcpu_model if self.vcpu_model is not None else self.tee.default_vcpu_model

    @property
    def policy_value(self) -> int:
        return self.policy if self.policy is not None else self.tee.default_policy

    @property
    def vm_name(self) -> str:
        """A VM name safe everywhere (libvirt forbids '/', QEMU's -name parses commas)."""
        return "cwbuild-" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.workload_id)[:64]

    @property
    def libvirt_dir(self) -> str:
        if self.bundle_dir is not None:
            return self.bundle_dir
        return f"{LIBVIRT_IMAGES_DIR}/{self.vm_name}"


def _fail(what: str, hint: str | None = None) -> UsageError:
    return UsageError(f"launch config: {what}", hint=hint)


def _check_text(name: str, value: str, limit: int) -> None:
    if _CONTROL.search(value):
        raise _fail(f"{name} contains a control character")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _fail(f"{name} is not valid UTF-8") from exc
    if len(encoded) > limit:
        raise _fail(f"{name} is longer than {limit} bytes")


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_policy(spec: LaunchSpec) -> None:
    policy = spec.policy_value
    if spec.tee in (Tee.SNP, Tee.SIM):
        _check_range("SNP policy", policy, 0, (1 << 64) - 1)
        if not policy & SNP_POLICY_RESERVED_MBO:
            raise _fail(f"SNP policy {policy:#x} lacks bit 17 (reserved, must be one)")
        if policy & SNP_POLICY_DEBUG:
            raise _fail(f"SNP policy {policy:#x} allows debugging", hint="clear bit 19")
    elif spec.tee in (Tee.SEV, Tee.SEV_ES):
        _check_range("SEV policy", policy, 0, (1 << 32) - 1)
        if not policy & SEV_POLICY_NODBG:
            raise _fail(f"SEV policy {policy:#x} allows debugging", hint="set bit 0 (NODBG)")
        if bool(policy & SEV_POLICY_ES) != (spec.tee is Tee.SEV_ES):
            raise _fail(f"SEV policy {policy:#x}: bit 2 (ES) must be set exactly for sev-es")
    elif spec.policy not in (None, 0):
        raise _fail("TDX takes no policy value")


def _check_paths(spec: LaunchSpec) -> None:
    for name in ("firmware_path", "kernel", "initrd", "disk"):
        value = getattr(spec, name)
        if not _REL_PATH.fullmatch(value) or len(value) > 255:
            raise _fail(
                f"{name} {value!r} is not a plain bundle-relative path",
                hint="use letters, digits, ._+- and /",
            )
    if spec.bundle_dir is not None and (
        not _ABS_DIR.fullmatch(spec.bundle_dir) or len(spec.bundle_dir) > 200
    ):
        raise _fail(f"bundle_dir {spec.bundle_dir!r} is not a plain absolute directory")


def _check_spec(spec: LaunchSpec) -> None:
    if not isinstance(spec.tee, Tee):
        raise _fail(f"unknown TEE {spec.tee!r}")
    _check_range("cpus", spec.cpus, 1, MAX_CPUS)
    _check_range("memory (MiB)", spec.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB)
    _check_range("guest features", spec.guest_features, 0, (1 << 64) - 1)
    _check_range("cbitpos", spec.cbitpos, 32, 63)
    _check_range("reduced-phys-bits", spec.reduced_phys_bits, 0, 63)
    if spec.tdx_qgs_port is not None:
        _check_range("TDX QGS vsock port", spec.tdx_qgs_port, 1, 0xFFFFFFFF)
    if not _CPU_MODEL.fullmatch(spec.cpu_model) or len(spec.cpu_model) > 64:
        raise _fail(f"vCPU model {spec.cpu_model!r} is not a QEMU CPU model name")
    if spec.disk_format not in ("raw", "qcow2"):
        raise _fail(f"disk format {spec.disk_format!r} is not raw or qcow2")
    if spec.snp_gen not in SNP_GENERATIONS:
        raise _fail(f"SNP generation {spec.snp_gen!r} unknown", hint="use " + ", ".join(SNP_GENERATIONS))
    if not spec.workload_id:
        raise _fail("workload id is empty")
    _check_text("workload id", spec.workload_id, 256)
    _check_text("kernel command line", spec.cmdline, MAX_CMDLINE_BYTES)
    _check_text("attestation URL", spec.attestation_url, MAX_TEXT)
    _check_paths(spec)
    _check_policy(spec)

"""The QEMU command line of a bundle, as data (`qemu_args`) and as a POSIX sh script (`qemu_script_lines`).

One list of (option, value) pairs serves both: `cwbuild run` can hand `qemu_args(...)` to QEMU directly, and
`launch/qemu.sh` is the same list with every word quoted by `shlex.quote`. Option strings follow QEMU's
keyval syntax (a comma inside a value is written twice); the measured values (firmware, kernel, initrd,
`-append`, `-smp`, `-cpu`, SEV policy, `kernel-hashes=on`) are exactly the spec's.

Sources for the options: QEMU docs/system/i386/amd-memory-encryption.rst (sev-guest, sev-snp-guest,
kernel-hashes), docs/system/i386/tdx.rst (tdx-guest, quote-generation-socket, split irqchip), and the
property lists of Debian sid's QEMU 11.1, which the tests check every option against.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence

from cwbuild.launch.spec import SIM_PORT_NAME, TDX_QGS_VSOCK_CID, LaunchSpec, Tee

#: Stands for the simulated-TEE signer's socket inside `launch/qemu.sh`, where the shell expands it. NUL can
#: never occur in a spec value (control characters are refused), so no value can forge it.
SHELL_SIM_SOCKET = "\0SIM_SOCKET\0"
#: The socket's default path, relative to the bundle directory.
SIM_SOCKET_DEFAULT = "sim-signer.sock"
#: Under TCG the vCPU model is not measured by anything (the host signer uses the spec's model for the
#: simulated digest), so SIM runs TCG's own full model: named AMD models warn about every feature TCG lacks,
#: and bookworm's QEMU 7.2 does not even know EPYC-v4.
SIM_CPU = "max"

Line = tuple[str, ...]


def escape(value: str) -> str:
    """A value inside a QEMU option string: a comma is written twice (QemuOpts/keyval syntax)."""
    return value.replace(",", ",,")


def keyval(head: str, props: dict[str, str]) -> str:
    """`head,key=value,...` in QEMU's option syntax, property names exactly as QEMU spells them."""
    return ",".join([head, *(f"{k}={escape(v)}" for k, v in props.items())])


def _confidential_lines(spec: LaunchSpec) -> list[Line]:
    """Machine, accelerator and the TEE object for each kind."""
    policy = f"{spec.policy_value:#x}"
    cbit = {"cbitpos": str(spec.cbitpos), "reduced-phys-bits": str(spec.reduced_phys_bits)}
    if spec.tee is Tee.SNP:
        size = f"{spec.memory_mib}M"
        return [
            ("-machine", keyval("q35", {"confidential-guest-support": "sev0", "memory-backend": "ram1"})),
            ("-accel", "kvm"),
            (
                "-object",
                keyval(
                    "memory-backend-memfd", {"id": "ram1", "size": size, "share": "on", "prealloc": "off"}
                ),
            ),
            (
                "-object",
                keyval("sev-snp-guest", {"id": "sev0", "policy": policy, **cbit, "kernel-hashes": "on"}),
            ),
        ]
    if spec.tee in (Tee.SEV, Tee.SEV_ES):
        return [
            ("-machine", keyval("q35", {"confidential-guest-support": "sev0"})),
            ("-accel", "kvm"),
            ("-object", keyval("sev-guest", {"id": "sev0", "policy": policy, **cbit, "kernel-hashes": "on"})),
        ]
    if spec.tee is Tee.TDX:
        return [
            ("-machine", keyval("q35", {"confidential-guest-support": "tdx0"})),
            ("-accel", keyval("kvm", {"kernel-irqchip": "split"})),
            ("-object", _tdx_object(spec)),
        ]
    # SIM: plain q35 under TCG, so it runs on any CI machine; the signer sits on the host.
    return [("-machine", "q35"), ("-accel", "tcg")]


def _tdx_object(spec: LaunchSpec) -> str:
    """tdx-guest; with a QGS the nested SocketAddress needs QEMU's JSON form of -object."""
    if spec.tdx_qgs_port is None:
        return keyval("tdx-guest", {"id": "tdx0", "sept-ve-disable": "on"})
    obj = {
        "qom-type": "tdx-guest",
        "id": "tdx0",
        "sept-ve-disable": True,
        "quote-generation-socket": {
            "type": "vsock",
            "cid": str(TDX_QGS_VSOCK_CID),
            "port": str(spec.tdx_qgs_port),
        },
    }
    return json.dumps(obj, separators=(",", ":"))


def _device_lines(spec: LaunchSpec, sim_socket: str) -> list[Line]:
    """virtio disk and user networking (ACCESS_PLATFORM on, which confidential guests require), console."""
    virtio = {"disable-legacy": "on", "iommu_platform": "on"}
    lines: list[Line] = [
        (
            "-drive",
            keyval(f"file={escape(spec.disk)}", {"if": "none", "id": "disk0", "format": spec.disk_format}),
        ),
        ("-device", keyval("virtio-blk-pci", {"drive": "disk0", **virtio})),
        ("-netdev", keyval("user", {"id": "net0"})),
        ("-device", keyval("virtio-net-pci", {"netdev": "net0", "romfile": "", **virtio})),
    ]
    if spec.tee is Tee.SIM:
        socket = sim_socket if sim_socket == SHELL_SIM_SOCKET else escape(sim_socket)
        lines += [
            ("-device", keyval("virtio-serial-pci", virtio)),
            ("-chardev", f"socket,id=simtee,path={socket}"),
            ("-device", keyval("virtserialport", {"chardev": "simtee", "name": SIM_PORT_NAME})),
        ]
    lines.append(("-serial", "mon:stdio"))
    return lines


def _firmware_lines(spec: LaunchSpec) -> list[Line]:
    """The measured firmware as -bios. SIM boots QEMU's default SeaBIOS instead: the AmdSev OVMF does not
    direct-boot a kernel without SEV (seen under TCG with Debian's 2026.08 build: "No bootable option"), and
    nothing in a TCG guest checks the firmware anyway; the host signer still measures the bundle's file."""
    return [] if spec.tee is Tee.SIM else [("-bios", spec.firmware_path)]


def qemu_lines(spec: LaunchSpec, *, sim_socket: str = SIM_SOCKET_DEFAULT) -> list[Line]:
    """The command line (without the program), one option and its value per line."""
    return [
        ("-name", spec.vm_name),
        ("-nodefaults",),
        ("-no-user-config",),
        ("-display", "none"),
        ("-no-reboot",),
        *_confidential_lines(spec),
        ("-cpu", SIM_CPU if spec.tee is Tee.SIM else spec.cpu_model),
        ("-smp", str(spec.cpus)),
        ("-m", f"{spec.memory_mib}M"),
        *_firmware_lines(spec),
        ("-kernel", spec.kernel),
        ("-initrd", spec.initrd),
        ("-append", spec.cmdline),
        *_device_lines(spec, sim_socket),
    ]


def qemu_args(spec: LaunchSpec, *, sim_socket: str = SIM_SOCKET_DEFAULT) -> list[str]:
    """The argv after the program name; paths are relative to the bundle directory (run QEMU there)."""
    return [word for line in qemu_lines(spec, sim_socket=sim_socket) for word in line]


def shell_word(arg: str) -> str:
    """`arg` as one POSIX sh word: single-quoted pieces, with the signer socket as "$SIM_SOCKET"."""
    pieces = arg.split(SHELL_SIM_SOCKET)
    quoted = [shlex.quote(p) if p else "" for p in pieces]
    word = '"$SIM_SOCKET"'.join(quoted)
    return word if word else "''"


def qemu_script_lines(spec: LaunchSpec) -> list[str]:
    """The option lines of launch/qemu.sh, each already quoted for the shell."""
    return [" ".join(shell_word(w) for w in line) for line in qemu_lines(spec, sim_socket=SHELL_SIM_SOCKET)]


def needs(spec: LaunchSpec) -> Sequence[str]:
    """What the host must provide, for the script's header and `launch_assumptions`."""
    return {
        Tee.SNP: ("QEMU >= 9.1 with KVM SEV-SNP (host kernel >= 6.11)",),
        Tee.SEV_ES: ("QEMU >= 9.1 with KVM SEV-ES (KVM_SEV_INIT2, host kernel >= 6.10)",),
        Tee.SEV: ("QEMU >= 6.2 with KVM SEV",),
        Tee.TDX: ("QEMU >= 10.1 with KVM TDX (host kernel >= 6.16)", "a QGS for quotes"),
        Tee.SIM: ("QEMU >= 7.2 (TCG)", "the cwbuild simulated-TEE signer on CWBUILD_SIM_SOCKET"),
    }[spec.tee]

"""Render a bundle's launch configs from a `LaunchSpec` (pure: no files, no programs; STYLE.md rule 6).

`render_launch(spec)` returns {bundle-relative file name: content} for `launch/qemu.sh`, `launch/libvirt.xml`
and (not for `tee: sim`, which krun cannot run) `launch/krun-sev.json`. The templates live in
templates/launch/; values reach them pre-quoted (sh) or through jinja2's `|e` (XML).
"""

from __future__ import annotations

from typing import Any

from cwbuild import __version__
from cwbuild.errors import UsageError
from cwbuild.launch.qemu import SIM_SOCKET_DEFAULT, needs, qemu_script_lines
from cwbuild.launch.spec import SIM_PORT_NAME, LaunchSpec, Tee
from cwbuild.resources import render

QEMU_SH = "launch/qemu.sh"
LIBVIRT_XML = "launch/libvirt.xml"
KRUN_SEV_JSON = "launch/krun-sev.json"

_TITLES = {
    Tee.SNP: "an AMD SEV-SNP guest",
    Tee.SEV_ES: "an AMD SEV-ES guest",
    Tee.SEV: "an AMD SEV guest",
    Tee.TDX: "an Intel TDX guest",
    Tee.SIM: "a simulated-TEE guest (development only, QEMU TCG)",
}
#: libvirt's TDX <policy> is the TD attributes word; bit 28 is SEPT_VE_DISABLE (Intel TDX module ABI
#: TDX_ATTRIBUTES; libvirt formatdomain "Launch Security" tdx), which QEMU's sept-ve-disable=on also sets.
_TDX_ATTR_SEPT_VE_DISABLE = 1 << 28
#: krun guests build "%s/kbs/v0/key/%s" into a 100-byte buffer (spec/cw-format.md §4.4 hard limits).
_KRUN_KEY_URL_LIMIT = 99
_KRUN_KEY_PATH = len("/kbs/v0/key/")


def render_launch(spec: LaunchSpec) -> dict[str, str]:
    """The launch configs of a bundle, file name (relative to the bundle) → content."""
    files = {
        QEMU_SH: render_qemu_sh(spec),
        LIBVIRT_XML: render("launch/libvirt.xml.j2", **libvirt_context(spec)),
    }
    if spec.tee is not Tee.SIM:
        files[KRUN_SEV_JSON] = render_krun_sev_json(spec)
    return files


def render_qemu_sh(spec: LaunchSpec) -> str:
    """launch/qemu.sh: a POSIX sh script that cds to the bundle and execs QEMU; extra arguments pass on."""
    return render(
        "launch/qemu.sh.j2",
        version=__version__,
        title=_TITLES[spec.tee],
        vm_name=spec.vm_name,
        cpus=spec.cpus,
        cpu_model=spec.cpu_model,
        policy=f"{spec.policy_value:#x}" if spec.tee is not Tee.TDX else None,
        guest_features=f"{spec.guest_features:#x}" if spec.tee in (Tee.SNP, Tee.SIM) else None,
        needs=needs(spec),
        sim=spec.tee is Tee.SIM,
        sim_socket_default=SIM_SOCKET_DEFAULT,
        lines=qemu_script_lines(spec),
    )


def _launch_security(spec: LaunchSpec) -> dict[str, Any] | None:
    cbit = {"cbitpos": spec.cbitpos, "reducedPhysBits": spec.reduced_phys_bits}
    if spec.tee is Tee.SNP:
        return {"type": "sev-snp", "policy": f"{spec.policy_value:#010x}", **cbit}
    if spec.tee in (Tee.SEV, Tee.SEV_ES):
        return {"type": "sev", "policy": f"{spec.policy_value:#06x}", **cbit}
    if spec.tee is Tee.TDX:
        return {
            "type": "tdx",
            "policy": f"{_TDX_ATTR_SEPT_VE_DISABLE:#x}",
            "qgs": spec.tdx_qgs_port is not None,
        }
    return None


def libvirt_context(spec: LaunchSpec) -> dict[str, Any]:
    """Values for templates/launch/libvirt.xml.j2 (escaped there). libvirt wants absolute paths: the bundle is
    expected at `spec.libvirt_dir`."""
    base = spec.libvirt_dir
    return {
        "domain_type": "qemu" if spec.tee is Tee.SIM else "kvm",
        "vm_name": spec.vm_name,
        "description": f"cwbuild {__version__} workload {spec.workload_id} ({_TITLES[spec.tee]})",
        "memory_mib": spec.memory_mib,
        "cpus": spec.cpus,
        "memfd": spec.tee is Tee.SNP,
        "loader": f"{base}/{spec.firmware_path}",
        "kernel": f"{base}/{spec.kernel}",
        "initrd": f"{base}/{spec.initrd}",
        "cmdline": spec.cmdline,
        "split_irqchip": spec.tee is Tee.TDX,
        "cpu_model": None if spec.cpu_model == "host" else spec.cpu_model,
        "disk": f"{base}/{spec.disk}",
        "disk_format": spec.disk_format,
        "sim_socket": f"{base}/{SIM_SOCKET_DEFAULT}" if spec.tee is Tee.SIM else None,
        "sim_port": SIM_PORT_NAME,
        "launch_security": _launch_security(spec),
    }


def go_json_string(value: str) -> str:
    """A JSON string encoded as Go's encoding/json.Marshal does it (buildah writes krun-sev.json that way):
    '<', '>', '&', U+2028 and U+2029 as \\u escapes, other non-ASCII as UTF-8."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "<>&\u2028\u2029" or ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{go_json_string(k)}:{go_json_string(v)}" for k, v in pairs) + "}"


def krun_tee_words(spec: LaunchSpec) -> tuple[str, str]:
    """(tee, tee_data) as buildah mkcw writes them (spec/cw-format.md §1.4): SEV-ES and SEV are both "sev";
    no SEV certificate chain is shipped, so vendor_chain is empty."""
    if spec.tee in (Tee.SNP, Tee.SIM):
        return "snp", _go_object([("gen", spec.snp_gen)])
    sev_data = _go_object([("vendor_chain", ""), ("attestation_server_pubkey", "")])
    return ("tdx" if spec.tee is Tee.TDX else "sev"), sev_data


def render_krun_sev_json(spec: LaunchSpec) -> str:
    """launch/krun-sev.json, byte-compatible with `buildah mkcw` (keys and order of WorkloadConfig)."""
    tee, tee_data = krun_tee_words(spec)
    return render(
        "launch/krun-sev.json.j2",
        tee=go_json_string(tee),
        tee_data=go_json_string(tee_data),
        workload_id=go_json_string(spec.workload_id),
        cpus=spec.cpus,
        ram_mib=spec.memory_mib,
        attestation_url=go_json_string(spec.attestation_url),
    )


def check_krun_limits(spec: LaunchSpec) -> None:
    """Refuse what a krun guest cannot take (spec/cw-format.md §4.2, §4.4): call before `--target krun`."""
    if spec.tee not in (Tee.SNP, Tee.SEV_ES, Tee.SEV):
        raise UsageError(f"--target krun cannot run a {spec.tee} workload", hint="use --tee snp")
    total = len(spec.attestation_url.encode()) + _KRUN_KEY_PATH + len(spec.workload_id.encode())
    if spec.attestation_url and total > _KRUN_KEY_URL_LIMIT:
        raise UsageError(
            f"attestation URL + workload id are {total} characters of key URL; krun's guest takes at most "
            f"{_KRUN_KEY_URL_LIMIT}",
            hint="use a shorter --attestation-url or --workload-id",
        )


def launch_assumptions(spec: LaunchSpec) -> dict[str, Any]:
    """What the launch configs assume about the host, for measurement.json (no paths, no times)."""
    result: dict[str, Any] = {
        "tee": str(spec.tee),
        "machine": "q35",
        "vcpus": spec.cpus,
        "vcpu_model": spec.cpu_model,
        "memory_mib": spec.memory_mib,
        "host": list(needs(spec)),
    }
    if spec.tee is not Tee.TDX:
        result |= {"policy": f"{spec.policy_value:#x}", "kernel_hashes": True}
    if spec.tee in (Tee.SNP, Tee.SIM):
        result["guest_features"] = f"{spec.guest_features:#x}"
    return result

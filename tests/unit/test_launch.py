"""Launch configs: rendering per TEE kind, qemu.sh parsed back and executed by real shells, escaping."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cwbuild.errors import UsageError
from cwbuild.launch import qemu_args, render_launch
from cwbuild.launch.render import check_krun_limits, go_json_string, launch_assumptions, libvirt_context
from cwbuild.launch.spec import SIM_PORT_NAME, Tee
from tests.launchutil import HOSTILE_CMDLINE, HOSTILE_ID, options, script_argv, spec_for, split_keyval

SHELLS = [s for s in ("sh", "dash", "bash") if shutil.which(s)]


def _object(argv: list[str], qom_type: str) -> dict[str, Any]:
    for value in options(argv, "-object"):
        if value.startswith("{"):
            obj = json.loads(value)
            if obj["qom-type"] == qom_type:
                return {k: v for k, v in obj.items() if k != "qom-type"}
        else:
            head, props = split_keyval(value)
            if head == qom_type:
                return props
    raise AssertionError(f"no -object {qom_type} in {argv}")


@pytest.mark.parametrize("tee", list(Tee))
def test_every_kind_renders_its_files(tee: Tee) -> None:
    files = render_launch(spec_for(tee))
    expected = {"launch/qemu.sh", "launch/libvirt.xml"} | (
        {"launch/krun-sev.json"} if tee is not Tee.SIM else set()
    )
    assert set(files) == expected
    assert files["launch/qemu.sh"].startswith("#!/bin/sh\n")


@pytest.mark.parametrize("tee", list(Tee))
def test_script_words_are_the_argv(tee: Tee) -> None:
    spec = spec_for(tee, cmdline=HOSTILE_CMDLINE)
    argv = script_argv(render_launch(spec)["launch/qemu.sh"])
    assert argv == qemu_args(spec, sim_socket="$SIM_SOCKET")
    # the measured inputs, exactly
    assert options(argv, "-append") == [HOSTILE_CMDLINE]
    assert options(argv, "-kernel") == ["vmlinuz"]
    assert options(argv, "-initrd") == ["initrd.img"]
    assert options(argv, "-smp") == ["4"]
    assert options(argv, "-m") == ["1536M"]
    if tee is not Tee.SIM:
        assert options(argv, "-bios") == [spec.firmware_path]
        assert options(argv, "-cpu") == [spec.cpu_model]


def test_snp_arguments() -> None:
    spec = spec_for(Tee.SNP, policy=0x30000, vcpu_model="EPYC-Milan", cbitpos=51, reduced_phys_bits=1)
    argv = qemu_args(spec)
    assert _object(argv, "sev-snp-guest") == {
        "id": "sev0",
        "policy": "0x30000",
        "cbitpos": "51",
        "reduced-phys-bits": "1",
        "kernel-hashes": "on",
    }
    assert _object(argv, "memory-backend-memfd") == {
        "id": "ram1",
        "size": "1536M",
        "share": "on",
        "prealloc": "off",
    }
    assert split_keyval(options(argv, "-machine")[0]) == (
        "q35",
        {"confidential-guest-support": "sev0", "memory-backend": "ram1"},
    )
    assert options(argv, "-bios") == ["firmware/OVMF.amdsev.fd"]
    assert options(argv, "-cpu") == ["EPYC-Milan"]
    assert options(argv, "-accel") == ["kvm"]


@pytest.mark.parametrize(("tee", "policy"), [(Tee.SEV_ES, "0x7"), (Tee.SEV, "0x3")])
def test_sev_and_sev_es_arguments(tee: Tee, policy: str) -> None:
    argv = qemu_args(spec_for(tee))
    assert _object(argv, "sev-guest") == {
        "id": "sev0",
        "policy": policy,
        "cbitpos": "51",
        "reduced-phys-bits": "1",
        "kernel-hashes": "on",
    }
    assert split_keyval(options(argv, "-machine")[0]) == ("q35", {"confidential-guest-support": "sev0"})


def test_tdx_arguments() -> None:
    argv = qemu_args(spec_for(Tee.TDX))
    obj = _object(argv, "tdx-guest")
    assert obj["id"] == "tdx0"
    assert obj["quote-generation-socket"] == {"type": "vsock", "cid": "2", "port": "4050"}
    assert split_keyval(options(argv, "-machine")[0]) == ("q35", {"confidential-guest-support": "tdx0"})
    assert options(argv, "-accel") == ["kvm,kernel-irqchip=split"]
    assert options(argv, "-bios") == ["firmware/OVMF.inteltdx.ms.fd"]
    assert options(argv, "-cpu") == ["host"]
    no_qgs = qemu_args(spec_for(Tee.TDX, tdx_qgs_port=None))
    assert _object(no_qgs, "tdx-guest") == {"id": "tdx0", "sept-ve-disable": "on"}


def test_sim_arguments() -> None:
    argv = qemu_args(spec_for(Tee.SIM), sim_socket="/run/a,b.sock")
    assert options(argv, "-machine") == ["q35"]
    assert options(argv, "-accel") == ["tcg"]
    assert options(argv, "-object") == []
    assert options(argv, "-bios") == []
    assert "socket,id=simtee,path=/run/a,,b.sock" in options(argv, "-chardev")
    assert f"virtserialport,chardev=simtee,name={SIM_PORT_NAME}" in options(argv, "-device")
    # the same disk, kernel, initrd and command line as SNP
    snp = qemu_args(spec_for(Tee.SNP))
    for opt in ("-kernel", "-initrd", "-append", "-drive", "-smp", "-m"):
        assert options(argv, opt) == options(snp, opt)


@pytest.mark.parametrize("tee", list(Tee))
@pytest.mark.parametrize("shell", SHELLS)
def test_shell_syntax(tee: Tee, shell: str, tmp_path: Path) -> None:
    script = tmp_path / "qemu.sh"
    script.write_text(render_launch(spec_for(tee, cmdline=HOSTILE_CMDLINE))["launch/qemu.sh"])
    subprocess.run([shell, "-n", str(script)], check=True)


@pytest.mark.parametrize("tee", list(Tee))
@pytest.mark.parametrize("shell", SHELLS)
def test_script_runs_qemu_with_exact_argv(tee: Tee, shell: str, tmp_path: Path) -> None:
    """Run qemu.sh with a stub QEMU: it must see exactly qemu_args, from the bundle directory, and no
    hostile value may run anything."""
    spec = spec_for(tee, cmdline=HOSTILE_CMDLINE, workload_id=HOSTILE_ID, attestation_url=HOSTILE_CMDLINE)
    bundle = tmp_path / "bundle dir"
    (bundle / "launch").mkdir(parents=True)
    for name, content in render_launch(spec).items():
        (bundle / name).write_text(content)
    out = tmp_path / "argv"
    stub = tmp_path / "stub-qemu"
    stub.write_text(f'#!/bin/sh\npwd > "{out}.cwd"\nfor a; do printf "%s\\0" "$a"; done > "{out}"\n')
    stub.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ["PATH"], "QEMU": str(stub), "CWBUILD_SIM_SOCKET": "/tmp/x.sock"}
    subprocess.run(
        [shell, "../bundle dir/launch/qemu.sh", "-S", "extra arg"], cwd=elsewhere, env=env, check=True
    )
    seen = out.read_bytes().split(b"\0")[:-1]
    assert [w.decode() for w in seen] == [*qemu_args(spec, sim_socket="/tmp/x.sock"), "-S", "extra arg"]
    assert Path(out.with_suffix(".cwd").read_text().strip()) == bundle
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("shell", SHELLS)
def test_sim_script_refuses_comma_socket(shell: str, tmp_path: Path) -> None:
    script = tmp_path / "launch" / "qemu.sh"
    script.parent.mkdir()
    script.write_text(render_launch(spec_for(Tee.SIM))["launch/qemu.sh"])
    env = {"PATH": os.environ["PATH"], "QEMU": "/bin/false", "CWBUILD_SIM_SOCKET": "a,b"}
    proc = subprocess.run([shell, str(script)], env=env, capture_output=True, check=False)
    assert proc.returncode == 2
    assert b"must not contain a comma" in proc.stderr


@pytest.mark.parametrize("tee", list(Tee))
def test_libvirt_values_are_escaped(tee: Tee) -> None:
    spec = spec_for(tee, cmdline=HOSTILE_CMDLINE + " </cmdline><x>&amp;", workload_id=HOSTILE_ID)
    root = ET.fromstring(render_launch(spec)["launch/libvirt.xml"])
    assert root.findtext("os/cmdline") == spec.cmdline
    assert HOSTILE_ID in (root.findtext("description") or "")
    name = root.findtext("name") or ""
    assert name.startswith("cwbuild-")
    assert "/" not in name
    assert root.find("os/kernel") is not None
    assert (root.findtext("os/kernel") or "").endswith("/vmlinuz")
    security = root.find("launchSecurity")
    kinds = {Tee.SNP: "sev-snp", Tee.SEV_ES: "sev", Tee.SEV: "sev", Tee.TDX: "tdx"}
    if tee is Tee.SIM:
        assert security is None
        assert root.get("type") == "qemu"
    else:
        assert security is not None
        assert security.get("type") == kinds[tee]


def test_libvirt_paths_follow_bundle_dir() -> None:
    ctx = libvirt_context(spec_for(Tee.SNP, bundle_dir="/srv/cw/b1"))
    assert ctx["kernel"] == "/srv/cw/b1/vmlinuz"
    assert ctx["loader"] == "/srv/cw/b1/firmware/OVMF.amdsev.fd"
    default = libvirt_context(spec_for(Tee.SNP))
    assert default["disk"] == "/var/lib/libvirt/images/cwbuild-0123456789abcdef0123456789abcdef/disk.img"


@pytest.mark.parametrize(
    "overrides",
    [
        {"kernel": "../vmlinuz"},
        {"kernel": "/boot/vmlinuz"},
        {"initrd": "-initrd"},
        {"disk": "disk.img;reboot"},
        {"disk": "a,b.img"},
        {"firmware": "firmware/$(x).fd"},
        {"firmware": "firmware/../../etc/passwd"},
        {"cmdline": "a\nb"},
        {"cmdline": "a\0b"},
        {"cmdline": "x" * 2048},
        {"workload_id": ""},
        {"workload_id": "a\rb"},
        {"attestation_url": "http://x/\x1b[31m"},
        {"vcpu_model": "EPYC,+x"},
        {"vcpu_model": "-machine"},
        {"cpus": 0},
        {"cpus": 256},
        {"memory_mib": 64},
        {"disk_format": "vmdk"},
        {"snp_gen": "naples"},
        {"bundle_dir": "relative/dir"},
        {"bundle_dir": "/srv/with space"},
    ],
)
def test_bad_values_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        spec_for(Tee.SNP, **overrides)


@pytest.mark.parametrize(
    ("tee", "policy"),
    [
        (Tee.SNP, 0x10000),  # reserved bit 17 clear
        (Tee.SNP, 0xB0000),  # debug bit 19 set
        (Tee.SIM, 0x80000 | 0x30000),
        (Tee.SEV_ES, 0x6),  # NODBG clear
        (Tee.SEV_ES, 0x3),  # ES clear
        (Tee.SEV, 0x7),  # ES set
        (Tee.SEV, 1 << 32),
        (Tee.TDX, 0x1),
    ],
)
def test_bad_policies_are_refused(tee: Tee, policy: int) -> None:
    with pytest.raises(UsageError):
        spec_for(tee, policy=policy)


def test_buildah_type_words() -> None:
    assert Tee.from_buildah_type("snp") is Tee.SNP
    assert Tee.from_buildah_type("sev") is Tee.SEV_ES
    assert Tee.from_buildah_type("SEV_NO_ES") is Tee.SEV
    with pytest.raises(UsageError):
        Tee.from_buildah_type("tdx")


def test_krun_limits() -> None:
    # spec/cw-format.md §4.4: with a 64-hex id, at most 23 characters of URL
    url23 = "http://10.0.0.5:8000/kb"
    assert len(url23) == 23
    check_krun_limits(spec_for(Tee.SNP, attestation_url=url23, workload_id="a" * 64))
    with pytest.raises(UsageError, match="99"):
        check_krun_limits(spec_for(Tee.SNP, attestation_url=url23 + "s", workload_id="a" * 64))
    with pytest.raises(UsageError):
        check_krun_limits(spec_for(Tee.TDX))


def test_assumptions_follow_the_spec() -> None:
    base = launch_assumptions(spec_for(Tee.SNP))
    assert base["guest_features"] == "0x1"
    assert base["vcpu_model"] == "EPYC-v4"
    assert launch_assumptions(spec_for(Tee.SNP, guest_features=0x21))["guest_features"] == "0x21"
    assert launch_assumptions(spec_for(Tee.SNP, cpus=8))["vcpus"] == 8
    assert "policy" not in launch_assumptions(spec_for(Tee.TDX))


@given(st.text(alphabet=st.characters(codec="utf-8")))
def test_go_json_string_round_trips(value: str) -> None:
    encoded = go_json_string(value)
    assert json.loads(encoded) == value
    assert not set("<>&\u2028\u2029") & set(encoded)


@pytest.mark.parametrize("tee", [Tee.SNP, Tee.SEV_ES, Tee.SEV, Tee.TDX])
def test_krun_json_is_json_with_hostile_values(tee: Tee) -> None:
    spec = spec_for(tee, workload_id=HOSTILE_ID, attestation_url=HOSTILE_CMDLINE)
    doc = json.loads(render_launch(spec)["launch/krun-sev.json"])
    assert list(doc) == ["tee", "tee_data", "workload_id", "cpus", "ram_mib", "attestation_url"]
    assert doc["workload_id"] == HOSTILE_ID
    assert doc["attestation_url"] == HOSTILE_CMDLINE
    assert doc["tee"] == {Tee.SNP: "snp", Tee.SEV_ES: "sev", Tee.SEV: "sev", Tee.TDX: "tdx"}[tee]
    assert isinstance(json.loads(doc["tee_data"]), dict)

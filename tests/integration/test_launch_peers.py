"""Launch configs against real peers newer than bookworm's (whose QEMU 7.2 / libvirt 9.0 know neither SNP
nor TDX): libvirt.xml against Debian sid's libvirt domain.rng (xmllint --relaxng), every option and property
in qemu.sh against Debian sid's QEMU (its QMP property lists), and the SIM script started for real by the
host's QEMU. scripts/setup.sh unpacks sid's libvirt-common and qemu-system-x86 (+ libraries) under ASSETS.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cwbuild.launch import qemu_args, render_launch
from cwbuild.launch.spec import SIM_PORT_NAME, LaunchSpec, Tee
from tests.conftest import ASSETS
from tests.launchutil import HOSTILE_CMDLINE, HOSTILE_ID, spec_for, split_keyval

pytestmark = pytest.mark.integration

DOMAIN_RNG = ASSETS / "sid-libvirt/usr/share/libvirt/schemas/domain.rng"
SID_QEMU = ASSETS / "sid-qemu"
PROPS_CACHE = SID_QEMU / "cwbuild-qemu-props.json"
OBJECT_TYPES = ("sev-snp-guest", "sev-guest", "tdx-guest", "memory-backend-memfd", "kvm-accel", "tcg-accel")
DEVICE_TYPES = ("virtio-blk-pci", "virtio-net-pci", "virtio-serial-pci", "virtserialport")


def _specs() -> list[LaunchSpec]:
    return [spec_for(tee, cmdline=HOSTILE_CMDLINE, workload_id=HOSTILE_ID) for tee in Tee] + [
        spec_for(Tee.TDX, tdx_qgs_port=None),
        spec_for(Tee.SNP, vcpu_model="EPYC-Genoa", bundle_dir="/srv/cw/b-1"),
    ]


# --- libvirt ---


def _xmllint(path: Path) -> subprocess.CompletedProcess[bytes]:
    if not DOMAIN_RNG.is_file():
        pytest.fail(f"{DOMAIN_RNG} missing: run scripts/setup.sh")
    return subprocess.run(
        ["xmllint", "--noout", "--relaxng", str(DOMAIN_RNG), str(path)], capture_output=True, check=False
    )


@pytest.mark.parametrize("spec", _specs(), ids=lambda s: f"{s.tee}-{s.cpu_model}")
def test_libvirt_xml_validates_against_sid_schema(spec: LaunchSpec, tmp_path: Path) -> None:
    path = tmp_path / "libvirt.xml"
    path.write_text(render_launch(spec)["launch/libvirt.xml"])
    proc = _xmllint(path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"validates" in proc.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("<policy>0x00030000</policy>", "<policy>0xZZ</policy>"),
        ("<cbitpos>51</cbitpos>", "<cbitpos>51</cbitpos><bogus/>"),
        ("type='sev-snp'", "type='sev-snpx'"),
    ],
)
def test_schema_check_can_fail(old: str, new: str, tmp_path: Path) -> None:
    """Negative control: the schema does reject a broken launchSecurity."""
    xml = render_launch(spec_for(Tee.SNP))["launch/libvirt.xml"]
    assert old in xml
    path = tmp_path / "libvirt.xml"
    path.write_text(xml.replace(old, new))
    assert _xmllint(path).returncode != 0


# --- sid's QEMU: property lists over QMP, captured once into a cache beside the binary ---


def _sid_qemu_argv() -> list[str]:
    binary = SID_QEMU / "usr/bin/qemu-system-x86_64"
    loader = SID_QEMU / "usr/lib64/ld-linux-x86-64.so.2"
    if not binary.is_file() or not loader.exists():
        pytest.fail(f"{binary} missing: run scripts/setup.sh")
    libs = f"{SID_QEMU}/usr/lib/x86_64-linux-gnu:{SID_QEMU}/lib/x86_64-linux-gnu"
    return [str(loader), "--library-path", libs, str(binary)]


class _Qmp:
    """A QMP session over stdio with `-machine none` (no guest, no accelerator needed)."""

    def __init__(self) -> None:
        env = {"PATH": os.environ["PATH"], "QEMU_MODULE_DIR": str(SID_QEMU / "usr/lib/x86_64-linux-gnu/qemu")}
        argv = [*_sid_qemu_argv(), "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
        )
        self.greeting = self._read()
        self.call("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, "QEMU closed the QMP stream"
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def call(self, command: str, **arguments: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        assert "return" in reply, f"{command}: {reply}"
        return reply["return"]

    def close(self) -> None:
        self.call("quit")
        self.proc.wait(timeout=30)


def _capture() -> dict[str, Any]:
    qmp = _Qmp()
    try:
        props: dict[str, list[str]] = {}
        for name in OBJECT_TYPES:
            props[f"object:{name}"] = [p["name"] for p in qmp.call("qom-list-properties", typename=name)]
        for name in DEVICE_TYPES:
            props[f"device:{name}"] = [p["name"] for p in qmp.call("device-list-properties", typename=name)]
        q35 = next(m for m in qmp.call("query-machines") if m.get("alias") == "q35")
        props["machine:q35"] = [
            p["name"] for p in qmp.call("qom-list-properties", typename=f"{q35['name']}-machine")
        ]
        props["cpu-models"] = [c["name"] for c in qmp.call("query-cpu-definitions")]
        drive = qmp.call("query-command-line-options", option="drive")
        props["option:drive"] = [p["name"] for opt in drive for p in opt["parameters"]]
        version = qmp.greeting["QMP"]["version"]
    finally:
        qmp.close()
    return {"qemu": version, "props": props}


@pytest.fixture(scope="session")
def sid_qemu_props() -> dict[str, Any]:
    binary = SID_QEMU / "usr/bin/qemu-system-x86_64"
    stamp = f"{binary.stat().st_size}:{binary.stat().st_mtime_ns}:{OBJECT_TYPES}:{DEVICE_TYPES}"
    if PROPS_CACHE.is_file():
        cached: dict[str, Any] = json.loads(PROPS_CACHE.read_text())
        if cached.get("stamp") == stamp:
            return cached
    captured = {"stamp": stamp, **_capture()}
    try:
        tmp = PROPS_CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps(captured, indent=1, sort_keys=True))
        tmp.replace(PROPS_CACHE)
    except OSError:
        pass  # a read-only asset directory: capture again next time
    return captured


def unknown_properties(argv: list[str], props: dict[str, list[str]]) -> list[str]:
    """Every option value in `argv` whose type or property sid's QEMU does not know."""
    problems: list[str] = []

    def check(kind: str, head: str, keys: set[str]) -> None:
        known = props.get(f"{kind}:{head}")
        if known is None:
            problems.append(f"{kind} {head} not captured")
            return
        problems.extend(f"{kind} {head} has no property {k}" for k in sorted(keys - set(known) - {"id"}))

    for opt, value in itertools.pairwise(argv):
        if opt == "-object":
            if value.startswith("{"):
                obj = json.loads(value)
                check("object", obj["qom-type"], set(obj) - {"qom-type"})
            else:
                head, kv = split_keyval(value)
                check("object", head, set(kv))
        elif opt in ("-machine", "-device"):
            head, kv = split_keyval(value)
            check(opt[1:], head, set(kv))
        elif opt == "-accel":
            head, kv = split_keyval(value)
            check("object", f"{head}-accel", set(kv))
        elif opt == "-drive":
            head, kv = split_keyval(value)
            keys = set(kv) | {head.partition("=")[0]}
            problems.extend(f"-drive has no {k}" for k in sorted(keys - set(props["option:drive"]) - {"id"}))
        elif opt == "-cpu" and value not in props["cpu-models"]:
            problems.append(f"no CPU model {value}")
    return problems


@pytest.mark.parametrize("spec", _specs(), ids=lambda s: f"{s.tee}-{s.cpu_model}")
def test_qemu_properties_exist_in_sid_qemu(spec: LaunchSpec, sid_qemu_props: dict[str, Any]) -> None:
    assert sid_qemu_props["qemu"]["qemu"]["major"] >= 10  # TDX arrived in 10.1
    assert unknown_properties(qemu_args(spec), sid_qemu_props["props"]) == []


def test_property_check_can_fail(sid_qemu_props: dict[str, Any]) -> None:
    """Negative control: misspelt properties, types and models are caught."""
    props = sid_qemu_props["props"]
    bad = [
        "-object",
        "sev-snp-guest,id=sev0,kernel-hash=on",
        "-object",
        '{"qom-type":"tdx-guest","id":"t","sept-ve-disabled":true}',
        "-machine",
        "q35,confidential-guest=sev0",
        "-accel",
        "kvm,kernel_irqchip=split",
        "-device",
        "virtio-blk-pci,iommu-platform=on",
        "-cpu",
        "EPYC-v9",
        "-object",
        "sev-snp-guestx,id=x",
    ]
    assert len(unknown_properties(bad, props)) == 7
    # and the SNP properties cwbuild relies on are really there
    for name in ("policy", "cbitpos", "reduced-phys-bits", "kernel-hashes"):
        assert name in props["object:sev-snp-guest"]


# --- the SIM script, started for real by the host's QEMU (bookworm's 7.2 runs sim bundles) ---


def _sim_bundle(tmp: Path, spec: LaunchSpec) -> Path:
    bundle = tmp / "b"
    (bundle / "launch").mkdir(parents=True)
    for name, content in render_launch(spec).items():
        (bundle / name).write_text(content)
    kernels = sorted((ASSETS / "kernel/boot").glob("vmlinuz-*"))
    assert kernels, "kernel asset missing: run scripts/setup.sh"
    (bundle / "vmlinuz").symlink_to(kernels[0])
    (bundle / "initrd.img").write_bytes(b"07070100000000")
    with (bundle / "disk.img").open("wb") as f:
        f.truncate(1 << 20)
    return bundle


def _qmp_unix(path: Path, *commands: dict[str, Any]) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as sock:
        for _ in range(200):
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.05)
        stream = sock.makefile("rw")
        json.loads(stream.readline())
        replies = []
        for command in ({"execute": "qmp_capabilities"}, *commands):
            stream.write(json.dumps(command) + "\n")
            stream.flush()
            while "event" in (reply := json.loads(stream.readline())):
                pass
            replies.append(reply)
        return replies[1:]


def test_sim_script_starts_host_qemu(tmp_path: Path) -> None:
    spec = spec_for(Tee.SIM, cmdline="console=ttyS0,115200 " + HOSTILE_CMDLINE)
    bundle = _sim_bundle(tmp_path, spec)
    signer = socket.socket(socket.AF_UNIX)
    signer.bind(str(tmp_path / "s.sock"))
    signer.listen(1)
    qmp_path = tmp_path / "q.sock"
    env = {"PATH": os.environ["PATH"], "CWBUILD_SIM_SOCKET": str(tmp_path / "s.sock")}
    extra = ["-S", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(
        ["sh", str(bundle / "launch/qemu.sh"), *extra],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        machine = [
            {"execute": "qom-get", "arguments": {"path": "/machine", "property": p}}
            for p in ("kernel", "initrd", "append")
        ]
        queries = [{"execute": c} for c in ("query-status", "query-chardev", "query-block")]
        replies = _qmp_unix(qmp_path, *machine, *queries, {"execute": "quit"})
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        signer.close()
    kernel, initrd, append, status, chardevs, block, _ = replies
    # QEMU holds the measured inputs exactly as the spec states them
    assert (kernel["return"], initrd["return"], append["return"]) == ("vmlinuz", "initrd.img", spec.cmdline)
    assert status["return"]["status"] == "prelaunch"
    labels = {c["label"]: c["filename"] for c in chardevs["return"]}
    assert labels["simtee"].startswith("unix:")
    assert any(b["device"] == "disk0" and b["inserted"]["file"] == "disk.img" for b in block["return"])
    assert SIM_PORT_NAME in render_launch(spec)["launch/qemu.sh"]

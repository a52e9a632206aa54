"""`cwbuild run` without a guest: the simulated-TEE signer's line protocol over a real unix socket (reports
checked by the endpoint's own SNP verifier), bundle reading, host refusals, console parsing, CLI errors."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cwbuild.attest.policy import Policy
from cwbuild.attest.sim import generate_sim_key
from cwbuild.attest.snp import verify_snp
from cwbuild.errors import ConfigError, FormatError, SecretFileError, UsageError
from cwbuild.launch.spec import SNP_POLICY_DEFAULT, Tee
from cwbuild.runner import host
from cwbuild.runner.bundle import Bundle
from cwbuild.runner.signer import MAX_REQUESTS, SimSigner, load_sim_key
from cwbuild.runner.vm import GuestError, Outcome, _result, qemu_argv, stream_console
from tests.conftest import cwbuild

MEASUREMENT = bytes(range(48))


@pytest.fixture
def signer(tmp_path: Path) -> Iterator[tuple[SimSigner, ec.EllipticCurvePrivateKey]]:
    key = generate_sim_key()
    s = SimSigner(tmp_path / "s.sock", key=key, measurement=MEASUREMENT, policy=SNP_POLICY_DEFAULT)
    s.start()
    yield s, key
    s.close()


def _readline(f: io.BufferedReader) -> bytes:
    return f.readline(8192)


def test_signer_signs_report_data_with_the_fixed_measurement(
    signer: tuple[SimSigner, ec.EllipticCurvePrivateKey],
) -> None:
    s, key = signer
    report_data = hashlib.sha512(b"x").digest()
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(s.socket_path))
        f = c.makefile("rb")
        c.sendall(report_data.hex().encode() + b"\n")
        report = base64.b64decode(_readline(f).rstrip(b"\n"), validate=True)
    policy = Policy.from_dict({"measurements": [MEASUREMENT.hex()]}).with_report_data(report_data)
    verdict = verify_snp(report, policy=policy, now=datetime.now(UTC), sim_key=key.public_key())
    assert verdict.ok, verdict.to_json()
    other = verify_snp(report, policy=policy, now=datetime.now(UTC), sim_key=generate_sim_key().public_key())
    assert not other.ok


@pytest.mark.parametrize(
    "line",
    [b"", b"00" * 63, b"00" * 65, b"zz" * 64, b" " + b"00" * 64, b"00" * 64 + b" ", b"\xff" * 128],
)
def test_signer_refuses_malformed_lines(
    signer: tuple[SimSigner, ec.EllipticCurvePrivateKey], line: bytes
) -> None:
    s, _ = signer
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(s.socket_path))
        f = c.makefile("rb")
        c.sendall(line + b"\n")
        assert _readline(f).startswith(b"error malformed")
        c.sendall(b"ab" * 64 + b"\n")  # the connection stays usable
        assert len(base64.b64decode(_readline(f))) == 1184
    assert s.served == 1


def test_signer_bounds_line_length_and_request_count(
    signer: tuple[SimSigner, ec.EllipticCurvePrivateKey],
) -> None:
    s, _ = signer
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(s.socket_path))
        f = c.makefile("rb")
        c.sendall(b"a" * 5000 + b"\n")
        assert _readline(f) == b"error request line too long\n"
        for _ in range(MAX_REQUESTS - 1):
            c.sendall(b"cd" * 64 + b"\n")
            assert len(base64.b64decode(_readline(f))) == 1184
        c.sendall(b"cd" * 64 + b"\n")
        assert _readline(f) == b"error too many requests\n"
    assert (s.served, s.refused) == (MAX_REQUESTS - 1, 2)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_sim_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(_pem(generate_sim_key()))
    path.chmod(0o600)
    assert isinstance(load_sim_key(path), ec.EllipticCurvePrivateKey)
    path.chmod(0o644)
    with pytest.raises(SecretFileError, match="group or others"):
        load_sim_key(path)
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    p256.chmod(0o600)
    with pytest.raises(ConfigError, match="P-384"):
        load_sim_key(p256)


def _bundle(tmp: Path, *, measurements: dict[str, object], manifest: dict[str, object] | None = None) -> Path:
    root = tmp / "b"
    (root / "firmware").mkdir(parents=True)
    (root / "firmware/OVMF.amdsev.fd").write_bytes(b"fw")
    doc = {"format": 1, "cmdline": "console=ttyS0", "inputs": {}, "measurements": measurements}
    (root / "measurement.json").write_text(json.dumps(doc))
    if manifest is not None:
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


FW_SHA = hashlib.sha256(b"fw").hexdigest()
SNP_ENTRY = {
    "firmware_sha256": FW_SHA,
    "measurement": "00" * 48,
    "assumptions": {"vcpus": 3, "vcpu_type": "EPYC-v4", "guest_features": "0x1"},
}


def test_bundle_spec_from_measurement_and_manifest(tmp_path: Path) -> None:
    root = _bundle(
        tmp_path,
        measurements={"snp": SNP_ENTRY},
        manifest={"workload_id": "w1", "launch": {"tee": "sim", "memory_mib": 640}},
    )
    b = Bundle.load(root)
    assert b.default_tee() is Tee.SIM
    spec = b.spec(Tee.SIM)
    assert (spec.cpus, spec.memory_mib, spec.cmdline, spec.workload_id) == (3, 640, "console=ttyS0", "w1")
    assert spec.firmware_path == "firmware/OVMF.amdsev.fd"
    assert b.spec(Tee.SIM, memory_mib=256).memory_mib == 256
    argv = qemu_argv(spec, qemu="qemu-system-x86_64", accel="kvm", sim_socket=tmp_path / "s.sock")
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert f"socket,id=simtee,path={tmp_path}/s.sock" in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0"


def test_bundle_tee_must_be_known(tmp_path: Path) -> None:
    root = _bundle(tmp_path, measurements={"snp": SNP_ENTRY, "tdx": {"firmware_sha256": FW_SHA}})
    with pytest.raises(UsageError, match="which TEE") as exc:
        Bundle.load(root).default_tee()
    assert exc.value.hint == "pass --tee snp|tdx|sim"
    with pytest.raises(UsageError, match="no tdx measurement"):
        Bundle.load(_bundle(tmp_path / "x", measurements={"snp": SNP_ENTRY})).spec(Tee.TDX)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        Bundle.load(tmp_path)
    (tmp_path / "measurement.json").write_text("[]")
    with pytest.raises(FormatError):
        Bundle.load(tmp_path)


def test_host_refusals(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="/dev/kvm"):
        host.check_tee_host(Tee.SNP, root=tmp_path)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").write_bytes(b"")
    with pytest.raises(UsageError, match="/dev/sev"):
        host.check_tee_host(Tee.SNP, root=tmp_path)
    (tmp_path / "dev/sev").write_bytes(b"")
    params = tmp_path / "sys/module/kvm_amd/parameters"
    params.mkdir(parents=True)
    (params / "sev_snp").write_text("N\n")
    with pytest.raises(UsageError, match="SEV-SNP disabled"):
        host.check_tee_host(Tee.SNP, root=tmp_path)
    (params / "sev_snp").write_text("Y\n")
    host.check_tee_host(Tee.SNP, root=tmp_path)
    with pytest.raises(UsageError, match="TDX"):
        host.check_tee_host(Tee.TDX, root=tmp_path)


def test_qemu_and_firmware_checks(tmp_path: Path) -> None:
    host.check_qemu((9, 2, 0), {"host": ["QEMU >= 9.1 with KVM SEV-SNP (host kernel >= 6.11)"]})
    with pytest.raises(ConfigError, match=r">= 9\.1"):
        host.check_qemu((7, 2, 22), {"host": ["QEMU >= 9.1 with KVM SEV-SNP (host kernel >= 6.11)"]})
    with pytest.raises(ConfigError, match=r"10\.1\.0"):
        host.check_qemu((10, 0, 0), {"qemu_version": "10.1.0"})
    root = _bundle(tmp_path, measurements={"snp": SNP_ENTRY})
    b = Bundle.load(root)
    host.check_firmware(b, Tee.SNP, "firmware/OVMF.amdsev.fd")
    (root / "firmware/OVMF.amdsev.fd").write_bytes(b"other")
    assert b.firmware_for(Tee.SNP) == "firmware/OVMF.amdsev.fd"  # the default name when none matches
    with pytest.raises(ConfigError, match="not the firmware"):
        host.check_firmware(b, Tee.SNP, "firmware/OVMF.amdsev.fd")


def test_real_qemu_version_parses() -> None:
    major, _, _ = host.qemu_version("qemu-system-x86_64")
    assert major >= 7


def test_console_parsing() -> None:
    console = (
        b"[    1.0] kernel line\r\n"
        b"cwbuild-agent: attested\r\n"
        b"noise cwbuild-agent: key released\n"
        b"cwbuild-agent: exit 42\r\n"
    )
    sink = io.BytesIO()
    out = stream_console(io.BytesIO(console), sink)
    assert sink.getvalue() == console
    assert out.milestones == ["attested", "key released"]
    assert _result(out, 0) == 42
    failed = stream_console(io.BytesIO(b"cwbuild-agent: error: disk.unlock_failed: no key\n"), io.BytesIO())
    with pytest.raises(GuestError, match=r"disk\.unlock_failed: no key") as exc:
        _result(failed, 0)
    assert exc.value.reason == "disk.unlock_failed"
    with pytest.raises(GuestError, match="before the workload finished"):
        _result(Outcome(), 1)


def test_cli_refusals(tmp_path: Path) -> None:
    root = _bundle(tmp_path, measurements={"snp": SNP_ENTRY})
    proc = cwbuild(["run", root, "--tee", "sim"], env={"CWBUILD_SIM_KEY": ""})
    assert proc.returncode == 2
    assert b"--sim-key" in proc.stderr
    proc = cwbuild(["run", root, "--tee", "snp"])
    assert proc.returncode == 2
    assert b"this host" in proc.stderr
    proc = cwbuild(["run", root, "--tee", "sim", "--accel", "kvm", "--console", "--log", tmp_path / "l"])
    assert proc.returncode == 2
    proc = cwbuild(["run", tmp_path / "missing"])
    assert proc.returncode == 2
    assert not os.path.exists(tmp_path / "l")

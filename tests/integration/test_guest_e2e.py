"""End to end: a sim bundle boots under QEMU TCG (`cwbuild run --tee sim`), the guest agent attests to a real
`cwbuild serve` over TLS (the endpoint on 127.0.0.1 is 10.0.2.2 to the guest), gets the disk key, the kernel's
dm-crypt opens the LUKS disk, switch_root, and the image's entrypoint runs with its Env, WorkingDir and User;
`cwbuild run` exits with the entrypoint's status. The expected values come from the image config itself and
from the endpoint's audit log; the console and logs are grepped for the secret."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cwbuild.attest.api import Registration
from cwbuild.attest.client import register_workload
from cwbuild.boot.kit import Kit
from cwbuild.disk.footer import read as read_footer
from cwbuild.disk.luks import LuksFormat, read_header
from tests.conftest import cwbuild, report_timing
from tests.integration.guest_support import (
    GUEST_HOST,
    EndpointCA,
    TlsServer,
    Workload,
    make_bundle,
    make_ca,
    random_passphrase,
    tls_server,
)
from tests.kits import cached_kit

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

ENTRY = b"""#!/bin/sh
echo "workload says: greeting=$GREETING cwd=$(pwd) uid=$(id -u) gid=$(id -g) home=$HOME args=$*"
echo "workload data: $(sha256sum /app/data.bin)"
exit 3
"""
DATA = bytes(range(256)) * 64  # 16 KiB: four 4096-byte sectors
WORKLOAD = Workload(
    config={
        "Entrypoint": ["/app/entry.sh"],
        "Cmd": ["one", "two words"],
        "Env": ["PATH=/bin", "GREETING=hello from the image"],
        "WorkingDir": "/srv/data",
        "User": "app",
    },
    files={"app/entry.sh": (ENTRY, 0o755), "app/data.bin": (DATA, 0o644)},
)
EXPECTED_LINE = (
    "workload says: greeting=hello from the image cwd=/srv/data uid=1000 gid=1000 home=/home/app"
    " args=one two words"
)
DATA_LINE = f"workload data: {hashlib.sha256(DATA).hexdigest()}  /app/data.bin"
MILESTONES = ["attested", "key released", "disk opened", "switch_root"]
RUN_TIMEOUT = 300
CSUM = 0x1C0  # offset of the LUKS2 binary header checksum (LUKS2 on-disk format §2.1)


@pytest.fixture(scope="module")
def kit() -> Kit:
    return cached_kit()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> EndpointCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ca: EndpointCA) -> Iterator[TlsServer]:
    srv = tls_server(tmp_path_factory.mktemp("serve"), ca)
    srv.start()
    yield srv
    srv.kill()


def _agent_lines(console: str) -> list[str]:
    return [ln.strip() for ln in console.splitlines() if ln.strip().startswith("cwbuild-agent:")]


@dataclass
class Booted:
    status: int
    console: str
    stderr: str
    secret: bytes

    @property
    def lines(self) -> list[str]:
        return _agent_lines(self.console)

    def refused_with(self, reason: str) -> None:
        """One error line naming `reason`, and nothing unlocked."""
        errors = [ln for ln in self.lines if ln.startswith("cwbuild-agent: error:")]
        assert len(errors) == 1, self.console[-3000:]
        assert errors[0].startswith(f"cwbuild-agent: error: {reason}: "), errors
        unlocked = re.compile(r"cwbuild-agent: (key released|disk opened|switch_root|exit \d+)")
        assert not any(unlocked.fullmatch(ln) for ln in self.lines), self.lines
        assert self.status == 1
        assert reason in self.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bundle(
    kit: Kit,
    ca_pem: bytes,
    tmp: Path,
    *,
    workload_id: str,
    port: int,
    luks: LuksFormat = LuksFormat.LUKS2,
    krun: bool = False,
) -> tuple[Path, str, bytes]:
    secret = random_passphrase()
    bundle = tmp / "bundle"
    url = f"https://{GUEST_HOST}:{port}"
    footer = json.dumps({"type": "snp", "workload_id": workload_id}).encode() if krun else None
    measurement, blocks = make_bundle(
        kit,
        bundle,
        url=url,
        ca_pem=ca_pem,
        workload_id=workload_id,
        passphrase=secret,
        workload=WORKLOAD,
        luks=luks,
        krun_footer=footer,
        blocks_of="app/data.bin",
    )
    (tmp / "data-blocks").write_text(" ".join(map(str, blocks)))
    return bundle, measurement, secret


def _register(server: TlsServer, ca: EndpointCA, workload_id: str, measurement: str, secret: bytes) -> None:
    reg = Registration.build(
        workload_id=workload_id, tee="sim", reference_values=[measurement], policy={}, secret=secret
    )
    register_workload(server.url, server.token, reg, ca_file=ca.ca_pem)


def _run(server: TlsServer, bundle: Path, secret: bytes, tmp: Path) -> Booted:
    key = server.sim_key_pem(tmp / "sim.key")
    log = tmp / "console.log"
    argv = ["run", str(bundle), "--tee", "sim", "--accel", "tcg", "--sim-key", str(key), "--log", str(log)]
    started = time.monotonic()
    proc = cwbuild([*argv, "--timeout", str(RUN_TIMEOUT)], timeout=RUN_TIMEOUT + 60)
    report_timing("cwbuild run --tee sim, start to power-off under TCG", time.monotonic() - started)
    booted = Booted(proc.returncode, log.read_text("utf-8", "replace"), proc.stderr.decode(), secret)
    for text in (booted.console, booted.stderr, server.logs().decode("utf-8", "replace")):
        assert secret.decode() not in text  # the passphrase is hex text: grep for it as such
    return booted


def _attest_reasons(server: TlsServer, workload_id: str) -> list[str]:
    return [
        e["reason"] for e in server.audit() if e.get("workload_id") == workload_id and e["event"] == "attest"
    ]


@pytest.mark.parametrize("layout", ["luks2", "luks1", "krun"])
def test_sim_guest_attests_unlocks_and_runs_the_entrypoint(
    kit: Kit, server: TlsServer, ca: EndpointCA, tmp_path: Path, layout: str
) -> None:
    """LUKS2 (the default), LUKS1, and the krun layout's disk (LUKS1, the KRUN footer after the payload)."""
    wid = f"e2e-ok-{layout}"
    luks = LuksFormat.LUKS2 if layout == "luks2" else LuksFormat.LUKS1
    bundle, measurement, secret = _bundle(
        kit,
        ca.ca_pem.read_bytes(),
        tmp_path,
        workload_id=wid,
        port=server.port,
        luks=luks,
        krun=layout == "krun",
    )
    if layout == "krun":
        assert read_footer(bundle / "disk.img") is not None
    _register(server, ca, wid, measurement, secret)
    booted = _run(server, bundle, secret, tmp_path)
    done = [ln.removeprefix("cwbuild-agent: ") for ln in booted.lines]
    assert done[-6:] == [f"starting (workload {wid}, tee sim)", *MILESTONES, "exit 3"], booted.console[-4000:]
    assert EXPECTED_LINE in booted.console
    assert DATA_LINE in booted.console
    assert booted.status == 3, booted.stderr
    assert _attest_reasons(server, wid) == ["key.released"]


def test_wrong_measurement_is_refused_and_the_disk_stays_closed(
    kit: Kit, server: TlsServer, ca: EndpointCA, tmp_path: Path
) -> None:
    bundle, _, secret = _bundle(
        kit, ca.ca_pem.read_bytes(), tmp_path, workload_id="e2e-wrong", port=server.port
    )
    _register(server, ca, "e2e-wrong", "00" * 48, secret)
    booted = _run(server, bundle, secret, tmp_path)
    booted.refused_with("snp.measurement_mismatch")
    assert "attestation refused (HTTP 403)" in booted.lines[-1]
    assert _attest_reasons(server, "e2e-wrong") == ["snp.measurement_mismatch"]


def test_initrd_modified_after_the_build_is_refused(
    kit: Kit, server: TlsServer, ca: EndpointCA, tmp_path: Path
) -> None:
    bundle, measurement, secret = _bundle(
        kit, ca.ca_pem.read_bytes(), tmp_path, workload_id="e2e-initrd", port=server.port
    )
    _register(server, ca, "e2e-initrd", measurement, secret)
    with (bundle / "initrd.img").open("ab") as f:
        f.write(bytes(4096))  # zero padding between cpio archives is legal: the guest boots the same
    booted = _run(server, bundle, secret, tmp_path)
    booted.refused_with("snp.measurement_mismatch")
    assert _attest_reasons(server, "e2e-initrd") == ["snp.measurement_mismatch"]


@pytest.mark.parametrize("damage", ["keyslot", "digest", "both-headers"])
def test_corrupted_header_fails_to_unlock(
    kit: Kit, server: TlsServer, ca: EndpointCA, tmp_path: Path, damage: str
) -> None:
    wid = f"e2e-{damage}"
    bundle, measurement, secret = _bundle(
        kit, ca.ca_pem.read_bytes(), tmp_path, workload_id=wid, port=server.port
    )
    _register(server, ca, wid, measurement, secret)
    header = read_header(bundle / "disk.img")
    slot = header.keyslots[0]
    with (bundle / "disk.img").open("r+b") as f:
        if damage == "keyslot":  # the AF-split key material of the only active keyslot
            f.seek(slot.area_offset)
            f.write(bytes(slot.material_size))
        elif damage == "digest":  # the volume key digest in the JSON of both copies, checksums redone
            for copy in (0, header.metadata_size):
                f.seek(copy)
                area = bytearray(f.read(header.metadata_size))
                value = base64.b64encode(header.digest.value)
                at = area.find(value)
                assert at > 0
                area[at : at + len(value)] = base64.b64encode(bytes(len(header.digest.value)))
                area[CSUM : CSUM + 64] = bytes(64)  # LUKS2 spec §2.1: csum over hdr_size, field zeroed
                area[CSUM : CSUM + 32] = hashlib.sha256(area).digest()
                f.seek(copy)
                f.write(area)
        else:  # both LUKS2 binary headers (primary at 0, secondary at hdr_size; LUKS2 spec §2)
            for copy in (0, header.metadata_size):
                f.seek(copy)
                f.write(bytes(4096))
    booted = _run(server, bundle, secret, tmp_path)
    assert "cwbuild-agent: key released" in booted.lines  # the endpoint did its part
    errors = [ln for ln in booted.lines if "error:" in ln]
    assert len(errors) == 1, booted.lines
    assert errors[0].startswith("cwbuild-agent: error: disk.unlock_failed: "), errors
    # cryptsetup's own words: the header still parses (so the digest/keyslot check refused) or it does not
    why = (
        "is not a valid LUKS device" if damage == "both-headers" else "No key available with this passphrase"
    )
    assert why in errors[0]
    assert "disk opened" not in booted.console
    assert booted.status == 1


def test_endpoint_down_retries_then_powers_off(
    kit: Kit, ca: EndpointCA, server: TlsServer, tmp_path: Path
) -> None:
    bundle, _, secret = _bundle(
        kit, ca.ca_pem.read_bytes(), tmp_path, workload_id="e2e-down", port=_free_port()
    )
    booted = _run(server, bundle, secret, tmp_path)
    retries = [ln for ln in booted.lines if "endpoint not ready" in ln]
    assert len(retries) == 2  # retries=3 attempts in the bundle's agent config, back-off 1 s then 2 s
    booted.refused_with("endpoint.unreachable")
    assert "after 3 attempts" in booted.lines[-1]


def test_endpoint_with_a_certificate_from_another_ca_is_refused(
    kit: Kit, server: TlsServer, tmp_path: Path
) -> None:
    other = make_ca(tmp_path / "other", label="other")
    bundle, _, secret = _bundle(
        kit, other.ca_pem.read_bytes(), tmp_path, workload_id="e2e-tls", port=server.port
    )
    booted = _run(server, bundle, secret, tmp_path)
    booted.refused_with("endpoint.tls_refused")
    assert not [e for e in server.audit() if e.get("workload_id") == "e2e-tls"]  # nothing reached the API


def _corrupt_payload(bundle: Path, fs_block: int) -> None:
    """Zero one 4096-byte ciphertext sector: filesystem block `fs_block` of the LUKS2 payload."""
    header = read_header(bundle / "disk.img")
    assert header.sector_size == 4096
    with (bundle / "disk.img").open("r+b") as f:
        f.seek(header.payload_offset + fs_block * 4096)
        f.write(bytes(4096))


def test_corrupted_superblock_fails_to_mount(
    kit: Kit, server: TlsServer, ca: EndpointCA, tmp_path: Path
) -> None:
    bundle, measurement, secret = _bundle(
        kit, ca.ca_pem.read_bytes(), tmp_path, workload_id="e2e-sb", port=server.port
    )
    _register(server, ca, "e2e-sb", measurement, secret)
    _corrupt_payload(bundle, 0)  # block 0 holds the primary superblock at byte 1024
    booted = _run(server, bundle, secret, tmp_path)
    assert "cwbuild-agent: disk opened" in booted.lines
    errors = [ln for ln in booted.lines if "error:" in ln]
    assert len(errors) == 1, booted.lines
    assert errors[0].startswith("cwbuild-agent: error: disk.mount_failed: "), errors
    assert "switch_root" not in booted.console
    assert booted.status == 1


def test_corrupted_data_sector_is_not_detected(
    kit: Kit, server: TlsServer, ca: EndpointCA, tmp_path: Path
) -> None:
    """AES-XTS hides data but does not authenticate it (DESIGN.md "Integrity is the next step"): a host that
    overwrites a ciphertext sector turns the file's plaintext into garbage and nothing notices."""
    bundle, measurement, secret = _bundle(
        kit, ca.ca_pem.read_bytes(), tmp_path, workload_id="e2e-xts", port=server.port
    )
    _register(server, ca, "e2e-xts", measurement, secret)
    blocks = [int(b) for b in (tmp_path / "data-blocks").read_text().split()]
    assert len(blocks) == len(DATA) // 4096
    _corrupt_payload(bundle, blocks[1])
    booted = _run(server, bundle, secret, tmp_path)
    assert booted.status == 3, booted.console[-3000:]  # the workload ran to its end
    assert not [ln for ln in booted.lines if "error:" in ln]
    assert EXPECTED_LINE in booted.console
    assert DATA_LINE not in booted.console  # the data changed ...
    assert "workload data: " in booted.console  # ... and was read without any error

"""The guest agent's protocol steps, run by the kit's own busybox and openssl on the host, against the
endpoint's published wire vector (tests/vectors/attest-v1.json, made by make_attest_v1.py with openssl and
cross-checked by the endpoint's tests): the agent must compute the same report_data and unwrap the vector's
secret. The agent's functions are taken verbatim from the rendered /init (everything but its last line,
`main "$@"`); `poweroff` and `sync` are stubbed so a failing step can never touch the host."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cwbuild.boot.agent import AgentConfig, render_init
from cwbuild.boot.kit import Kit
from tests.conftest import REPO
from tests.kits import cached_kit

pytestmark = pytest.mark.integration

VECTOR = json.loads((REPO / "tests/vectors/attest-v1.json").read_text())
APPLETS = ("base64", "cat", "cut", "head", "od", "rm", "sed", "shred", "tr", "wc", "mkdir", "cp", "chmod")
HARNESS = r"""
poweroff() { echo "POWEROFF"; exit 99; }
sync() { :; }
W=$1
b64url_decode "$2" > "$W/nonce.bin"
report_data
od -An -v -tx1 "$W/rd.bin" | tr -d ' \n' > "$W/rd.hex"
unwrap
[ ! -e "$W/priv.pem" ] && [ ! -e "$W/wrapped.bin" ] && echo "scrubbed"
"""


@pytest.fixture(scope="module")
def kit() -> Kit:
    return cached_kit()


def _toolbox(kit: Kit, where: Path) -> tuple[Path, Path]:
    """A bin/ of the kit's busybox applets and an openssl wrapper running the kit's binary with its own
    ld.so and libraries; plus the busybox to run the shell with."""
    land = kit.userland()
    busybox = kit.path(land["usr/bin/busybox"])
    ldso = kit.path(land["usr/lib64/ld-linux-x86-64.so.2"])
    libdir = kit.path(land["usr/lib/x86_64-linux-gnu/libc.so.6"]).parent
    openssl = kit.path(land["usr/bin/openssl"])
    bindir = where / "bin"
    bindir.mkdir()
    for applet in APPLETS:
        (bindir / applet).symlink_to(busybox)
    (bindir / "openssl").write_text(f'#!{busybox} sh\nexec {ldso} --library-path {libdir} {openssl} "$@"\n')
    (bindir / "openssl").chmod(0o755)
    for stub in ("poweroff", "reboot", "sync"):
        (bindir / stub).write_text(f"#!{busybox} sh\nexit 0\n")
        (bindir / stub).chmod(0o755)
    return bindir, busybox


def _functions() -> str:
    config = AgentConfig(workload_id="wl", tee="sim", attestation_url="http://10.0.2.2:8080")
    text = render_init(config).decode()
    body, last = text.rstrip("\n").rsplit("\n", 1)
    assert last == 'main "$@"'
    return body


def _replay(kit: Kit, tmp: Path, *, wrapped: bytes, key_pem: str) -> subprocess.CompletedProcess[str]:
    bindir, busybox = _toolbox(kit, tmp)
    work = tmp / "w"
    work.mkdir()
    (work / "pub.der").write_bytes(__import__("base64").b64decode(VECTOR["pubkey_der_b64"]))
    (work / "priv.pem").write_text(key_pem)
    (work / "wrapped.bin").write_bytes(wrapped)
    script = tmp / "agent-steps.sh"
    script.write_text(_functions() + "\n" + HARNESS)
    env = {"PATH": str(bindir), "HOME": str(tmp)}
    return subprocess.run(
        [str(busybox), "sh", str(script), str(work), VECTOR["nonce_b64url"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_kit_openssl_computes_report_data_and_unwraps_the_vector(kit: Kit, tmp_path: Path) -> None:
    wrapped = __import__("base64").b64decode(VECTOR["wrapped_key_b64"])
    proc = _replay(kit, tmp_path, wrapped=wrapped, key_pem=VECTOR["private_key_pem"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scrubbed" in proc.stdout
    work = tmp_path / "w"
    assert (work / "nonce.bin").read_bytes().hex() == VECTOR["nonce_hex"]
    assert (work / "rd.hex").read_text() == VECTOR["report_data_hex"]
    assert (work / "key").read_bytes().hex() == VECTOR["secret_hex"]


def test_a_tampered_wrapped_key_is_one_error_line(kit: Kit, tmp_path: Path) -> None:
    wrapped = bytearray(__import__("base64").b64decode(VECTOR["wrapped_key_b64"]))
    wrapped[-1] ^= 1
    proc = _replay(kit, tmp_path, wrapped=bytes(wrapped), key_pem=VECTOR["private_key_pem"])
    assert proc.returncode == 99  # the stubbed poweroff
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("cwbuild-agent:")]
    assert lines == ["cwbuild-agent: error: key.unwrap_failed: cannot unwrap the released key"]
    assert not (tmp_path / "w" / "key").exists() or os.path.getsize(tmp_path / "w" / "key") == 0
    assert not (tmp_path / "w" / "priv.pem").exists()  # scrubbed before powering off

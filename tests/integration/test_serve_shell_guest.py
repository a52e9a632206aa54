"""The v1 flow as the POSIX-shell guest agent runs it: curl for HTTP, openssl for every cryptographic step.

Only the simulated TEE's signature comes from Python (in `cwbuild run --tee sim` the host signs too); the
guest side — RSA key generation, SubjectPublicKeyInfo DER, report_data = SHA-512(nonce || SHA-256(DER)) from
the base64url nonce, and the RSA-OAEP-SHA256 unwrap — is done by the openssl and curl CLIs in /bin/sh.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cwbuild.attest.sim import sim_report
from tests.integration.attest_support import Server, new_server, registration

pytestmark = pytest.mark.integration
MEASUREMENT = bytes(range(48))
SECRET = b"shell-" + os.urandom(12).hex().encode()

GUEST_KEY = """
set -eu
cd "$1"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out key.pem 2>/dev/null
openssl pkey -in key.pem -pubout -outform DER -out pub.der
"""
GUEST_CHALLENGE = """
set -eu
cd "$1"
curl -fsS -H 'Content-Type: application/json' -d "{\\"workload_id\\":\\"$3\\",\\"tee\\":\\"sim\\"}" \
  "$2/v1/challenge" > challenge.json
nonce=$(sed 's/.*"nonce":"\\([^"]*\\)".*/\\1/' challenge.json)
printf '%s' "$nonce" > nonce.b64url
# base64url -> base64 with padding -> bytes
pad=$(( (4 - ${#nonce} % 4) % 4 ))
b64=$(printf '%s' "$nonce" | tr '_-' '/+')
if [ "$pad" -gt 0 ]; then b64="$b64$(printf '%*s' "$pad" '' | tr ' ' '=')"; fi
printf '%s\\n' "$b64" | openssl base64 -d -A > nonce.bin
(cat nonce.bin; openssl dgst -sha256 -binary pub.der) | openssl dgst -sha512 -binary > report_data.bin
"""
GUEST_ATTEST = """
set -eu
cd "$1"
printf '{"workload_id":"%s","nonce":"%s","evidence":"%s","pubkey":"%s"}' "$3" "$(cat nonce.b64url)" \
  "$(openssl base64 -A -in report.bin)" "$(openssl base64 -A -in pub.der)" > attest.json
curl -fsS -H 'Content-Type: application/json' --data-binary @attest.json "$2/v1/attest" > answer.json
sed 's/.*"wrapped_key":"\\([^"]*\\)".*/\\1/' answer.json | openssl base64 -d -A > wrapped.bin
openssl pkeyutl -decrypt -inkey key.pem -in wrapped.bin -out secret.bin \
  -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = new_server(tmp_path_factory.mktemp("shell")).start()
    assert (
        srv.post("/v1/workloads", registration("shell-wl", MEASUREMENT, SECRET), admin=True).status_code
        == 201
    )
    yield srv
    srv.kill()


def sh(script: str, *args: str) -> None:
    subprocess.run(["sh", "-c", script, "sh", *args], check=True, capture_output=True, timeout=60)


def test_shell_guest_unlocks(server: Server, tmp_path: Path) -> None:
    assert shutil.which("curl"), "curl is in scripts/setup.sh's APT_PACKAGES"
    sh(GUEST_KEY, str(tmp_path))
    for _ in range(2):  # a second round: a fresh nonce, the same key
        sh(GUEST_CHALLENGE, str(tmp_path), server.url, "shell-wl")
        report_data = (tmp_path / "report_data.bin").read_bytes()
        assert len(report_data) == 64
        (tmp_path / "report.bin").write_bytes(
            sim_report(measurement=MEASUREMENT, report_data=report_data, key=server.sim_key)
        )
        sh(GUEST_ATTEST, str(tmp_path), server.url, "shell-wl")
        assert (tmp_path / "secret.bin").read_bytes() == SECRET
    challenge = json.loads((tmp_path / "challenge.json").read_text())
    assert len(base64.urlsafe_b64decode(challenge["nonce"] + "=")) == 32

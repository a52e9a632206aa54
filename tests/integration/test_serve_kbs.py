"""`cwbuild serve --kbs-compat`: the requests buildah mkcw and the krun C guest send, replayed byte for byte.

Request bytes follow spec/cw-format.md §2.1 (buildah's RegistrationRequest, field order and the JSON string
inside JSON) and §4.4 (the krun guest's /auth, /attest and /key, headers, cookie, report as 2368 uppercase
hex, report_data = SHA-512(nonce || n_b64 || e_b64)). Responses are checked the way the guest reads them:
attest succeeds only on an empty body; the key is the body minus its first and last character, hex, RSA
PKCS#1 v1.5.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cwbuild.attest.sim import sim_report
from tests.integration.attest_support import Server, new_server, registration

MEASUREMENT = bytes(range(48))
BUILDAH_ID = "0f" * 32  # buildah's workload ids are 64 hex characters
BUILDAH_PASS = "buildah-passphrase-" + os.urandom(8).hex()
SIM_SECRET = b"krun-sim-secret-" + os.urandom(8).hex().encode()
KRUN_HEADERS = {"Accept": "application/json", "Content-Type": "application/json; charset=utf-8"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = new_server(tmp_path_factory.mktemp("kbs"), extra=["--kbs-compat"]).start()
    yield srv
    srv.kill()


def buildah_register(server: Server, workload_id: str, passphrase: str) -> httpx.Response:
    tee_config = '{\\"flags\\":{\\"bits\\":15},\\"minfw\\":{\\"major\\":0,\\"minor\\":0}}'
    body = (
        f'{{"workload_id":"{workload_id}","launch_measurement":"{MEASUREMENT.hex()}",'
        f'"passphrase":"{passphrase}","tee_config":"{tee_config}"}}'
    ).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "Go-http-client/1.1"}
    return httpx.post(f"{server.url}/kbs/v0/register_workload", content=body, headers=headers)


class KrunGuest:
    """The old libkrun C init's client (§4.4 step 4), on one curl handle with its cookie engine."""

    def __init__(self, server: Server, workload_id: str) -> None:
        self.server = server
        self.workload_id = workload_id
        self.http = httpx.Client(base_url=server.url, timeout=20)
        self.key = rsa.generate_private_key(65537, 2048)
        numbers = self.key.public_key().public_numbers()
        self.n_b64 = base64.b64encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")).decode()
        self.e_b64 = base64.b64encode(numbers.e.to_bytes(3, "big")).decode()
        self.nonce = ""

    def auth(self) -> httpx.Response:
        extra = f'{{\\"workload_id\\":\\"{self.workload_id}\\"}}'
        body = f'{{"extra-params":"{extra}","tee":"snp","version":"0.0.0"}}'
        resp = self.http.post("/kbs/v0/auth", content=body.encode(), headers=KRUN_HEADERS)
        if resp.status_code == 200:
            self.nonce = resp.json()["nonce"]
        return resp

    def report(self, measurement: bytes = MEASUREMENT) -> bytes:
        report_data = hashlib.sha512((self.nonce + self.n_b64 + self.e_b64).encode()).digest()
        return sim_report(measurement=measurement, report_data=report_data, key=self.server.sim_key)

    def attest(self, report: bytes) -> httpx.Response:
        evidence = (
            f'{{\\"gen\\":\\"milan\\",\\"report\\":\\"{report.hex().upper()}\\",\\"cert_chain\\":\\"[]\\"}}'
        )
        body = (
            f'{{"tee-pubkey":{{"alg":"RSA","k-mod":"{self.n_b64}","k-exp":"{self.e_b64}"}},'
            f'"tee-evidence":"{evidence}"}}'
        )
        return self.http.post("/kbs/v0/attest", content=body.encode(), headers=KRUN_HEADERS)

    def get_key(self, workload_id: str | None = None) -> httpx.Response:
        return self.http.get(f"/kbs/v0/key/{workload_id or self.workload_id}")

    def unwrap(self, resp: httpx.Response) -> bytes:
        text = resp.text[1:-1]  # the guest strips the first and last character
        return self.key.decrypt(bytes.fromhex(text), padding.PKCS1v15())


@pytest.fixture(scope="module")
def sim_workloads(server: Server) -> tuple[str, str]:
    for wid in ("krun-a", "krun-b"):
        resp = server.post(
            "/v1/workloads", registration(wid, MEASUREMENT, SIM_SECRET + wid.encode()), admin=True
        )
        assert resp.status_code == 201, resp.text
    return "krun-a", "krun-b"


def test_buildah_registration(server: Server) -> None:
    resp = buildah_register(server, BUILDAH_ID, BUILDAH_PASS)
    assert resp.status_code == 200
    assert resp.content == b""
    info = httpx.get(f"{server.url}/v1/workloads/{BUILDAH_ID}", headers=server.admin()).json()
    assert info["tee"] == "snp"
    assert info["origin"] == "kbs"
    assert info["reference_values"] == [MEASUREMENT.hex()]
    assert info["policy"] == {}  # the server's default policy applies, not tee_config bits 15
    assert json.loads(info["tee_config"])["flags"]["bits"] == 15
    assert BUILDAH_PASS not in json.dumps(info)
    again = buildah_register(server, BUILDAH_ID, "another passphrase")
    assert again.status_code == 409  # never overwritten
    line = next(a for a in server.audit() if a["event"] == "kbs.register" and a["outcome"] == "allow")
    assert '\\"bits\\":15' in json.dumps(line["tee_config"])


def test_krun_guest_full_flow(server: Server, sim_workloads: tuple[str, str]) -> None:
    guest = KrunGuest(server, sim_workloads[0])
    resp = guest.auth()
    assert resp.status_code == 200
    assert resp.json() == {"nonce": guest.nonce, "extra-params": ""}
    assert "session_id" in resp.cookies
    resp = guest.attest(guest.report())
    assert resp.content == b"", resp.text  # any non-empty body is failure to the guest
    resp = guest.get_key()
    assert resp.status_code == 200
    assert resp.text.startswith('"')
    assert resp.text.endswith('"')
    assert len(resp.content) < 4096  # one curl chunk
    assert guest.unwrap(resp) == SIM_SECRET + b"krun-a"
    assert guest.get_key().status_code == 401  # once per session


def test_session_fetches_only_its_own_workload(server: Server, sim_workloads: tuple[str, str]) -> None:
    guest = KrunGuest(server, sim_workloads[0])
    guest.auth()
    assert guest.attest(guest.report()).content == b""
    resp = guest.get_key(sim_workloads[1])
    assert resp.status_code == 403
    assert resp.json()["error"] == "session.wrong_workload"
    assert SIM_SECRET not in resp.content
    other = KrunGuest(server, sim_workloads[1])  # a second session, attested for b, cannot fetch a's key
    other.auth()
    assert other.attest(other.report()).content == b""
    assert other.get_key(sim_workloads[0]).status_code == 403
    assert other.unwrap(other.get_key()) == SIM_SECRET + b"krun-b"


def test_krun_refusals(server: Server, sim_workloads: tuple[str, str]) -> None:
    guest = KrunGuest(server, sim_workloads[0])
    guest.auth()
    resp = guest.attest(guest.report(measurement=bytes(48)))
    assert resp.content != b""
    assert resp.json()["error"] == "snp.measurement_mismatch"
    assert guest.get_key().status_code == 401
    assert guest.attest(guest.report()).content != b""  # one attempt per session
    stranger = KrunGuest(server, sim_workloads[0])  # no /auth: no cookie
    assert stranger.attest(stranger.report()).status_code == 401
    assert stranger.get_key().status_code == 401
    debug = KrunGuest(server, sim_workloads[0])
    debug.auth()
    report_data = hashlib.sha512((debug.nonce + debug.n_b64 + debug.e_b64).encode()).digest()
    report = sim_report(measurement=MEASUREMENT, report_data=report_data, key=server.sim_key, policy=0xB0000)
    assert debug.attest(report).json()["error"] == "snp.policy_debug"  # reference-kbs never checked this


def test_buildah_workload_refuses_sim_evidence(server: Server) -> None:
    guest = KrunGuest(server, BUILDAH_ID)
    if guest.auth().status_code != 200:  # registered by test_buildah_registration when run alone too
        assert buildah_register(server, BUILDAH_ID, BUILDAH_PASS).status_code == 200
        guest.auth()
    resp = guest.attest(guest.report())
    assert resp.json()["error"] == "snp.cert_missing"
    assert guest.get_key().status_code == 401


def test_registration_only_from_allowed_networks(tmp_path: Path) -> None:
    srv = new_server(tmp_path, extra=["--kbs-compat", "--kbs-compat-allow", "10.0.0.0/8"]).start()
    try:
        resp = buildah_register(srv, BUILDAH_ID, BUILDAH_PASS)
        assert resp.status_code == 403
        assert httpx.get(f"{srv.url}/v1/workloads/{BUILDAH_ID}", headers=srv.admin()).status_code == 404
    finally:
        srv.kill()
    assert BUILDAH_PASS.encode() not in srv.logs()


def test_zz_no_secret_in_logs(server: Server) -> None:
    logs = server.logs()
    for form in (BUILDAH_PASS.encode(), SIM_SECRET, base64.b64encode(SIM_SECRET + b"krun-a")):
        assert form not in logs
    reasons = {a["reason"] for a in server.audit()}
    assert {"session.wrong_workload", "workload.exists", "key.released", "snp.policy_debug"} <= reasons

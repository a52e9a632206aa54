"""`cwbuild serve` on 127.0.0.1: the whole API v1 flow with the simulated TEE, and every refusal.

Acceptance (issue 5): register, challenge, attest, unwrap; each refusal (wrong measurement, debug policy, TCB
below minimum, wrong VMPL, replayed nonce, expired nonce, sim evidence for an SNP workload, wrong workload,
bad token, oversized body, malformed JSON) releases nothing, appears in the audit log with its id, and no log
holds the secret.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cwbuild.attest.snp_report import DEFAULT_GUEST_POLICY, POLICY_DEBUG
from tests.conftest import cwbuild
from tests.integration.attest_support import Guest, Server, new_server, registration

MEASUREMENT = bytes(range(48))
OTHER_MEASUREMENT = bytes(range(1, 49))
SECRET = b"v1-secret-" + os.urandom(16).hex().encode()
NONCE_TTL = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = new_server(tmp_path_factory.mktemp("serve"), nonce_ttl=NONCE_TTL).start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def workload(server: Server) -> str:
    resp = server.post("/v1/workloads", registration("wl-main", MEASUREMENT, SECRET), admin=True)
    assert resp.status_code == 201, resp.text
    return "wl-main"


def refused(resp: httpx.Response, status: int, reason: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == reason, body
    assert "wrapped_key" not in body


def test_full_flow_releases_the_secret(server: Server, workload: str) -> None:
    guest = Guest(server, MEASUREMENT)
    nonce = guest.nonce(workload)
    resp = guest.attest(workload, nonce, guest.evidence(nonce))
    assert resp.status_code == 200, resp.text
    assert guest.unwrap(resp) == SECRET
    assert any(a["reason"] == "key.released" and a["workload_id"] == workload for a in server.audit())


def test_get_shows_reference_values_never_the_secret(server: Server, workload: str) -> None:
    resp = httpx.get(f"{server.url}/v1/workloads/{workload}", headers=server.admin())
    assert resp.status_code == 200
    body = resp.json()
    assert body["reference_values"] == [MEASUREMENT.hex()]
    assert body["has_secret"] is True
    assert body["policy"] == {}
    assert base64.b64encode(SECRET).decode() not in resp.text
    assert SECRET.decode() not in resp.text


def test_register_conflict_and_replace(server: Server) -> None:
    reg = registration("wl-conflict", MEASUREMENT, b"first")
    assert server.post("/v1/workloads", reg, admin=True).status_code == 201
    refused(server.post("/v1/workloads", reg, admin=True), 409, "workload.exists")
    new = registration("wl-conflict", OTHER_MEASUREMENT, b"second", replace=True)
    assert server.post("/v1/workloads", new, admin=True).status_code == 201
    got = httpx.get(f"{server.url}/v1/workloads/wl-conflict", headers=server.admin()).json()
    assert got["reference_values"] == [OTHER_MEASUREMENT.hex()]


def test_delete(server: Server) -> None:
    assert (
        server.post("/v1/workloads", registration("wl-gone", MEASUREMENT, b"x"), admin=True).status_code
        == 201
    )
    assert httpx.delete(f"{server.url}/v1/workloads/wl-gone", headers=server.admin()).status_code == 204
    refused(
        httpx.get(f"{server.url}/v1/workloads/wl-gone", headers=server.admin()), 404, "workload.not_found"
    )
    refused(Guest(server, MEASUREMENT).challenge("wl-gone"), 404, "workload.not_found")


def _attest_refused(
    server: Server, workload: str, reason: str, *, guest: Guest | None = None, **fields: object
) -> None:
    guest = guest or Guest(server, MEASUREMENT)
    nonce = guest.nonce(workload)
    refused(guest.attest(workload, nonce, guest.evidence(nonce, **fields)), 403, reason)


def test_wrong_measurement(server: Server, workload: str) -> None:
    _attest_refused(server, workload, "snp.measurement_mismatch", guest=Guest(server, OTHER_MEASUREMENT))


def test_debug_policy(server: Server, workload: str) -> None:
    _attest_refused(server, workload, "snp.policy_debug", policy=DEFAULT_GUEST_POLICY | POLICY_DEBUG)


def test_wrong_vmpl(server: Server, workload: str) -> None:
    _attest_refused(server, workload, "snp.vmpl_mismatch", vmpl=1)


def test_tcb_below_minimum(server: Server) -> None:
    policy = {"min_tcb": {"*": {"bl": 3, "tee": 0, "snp": 9, "ucode": 115}}}  # sim TCB has snp 8
    reg = registration("wl-tcb", MEASUREMENT, SECRET, policy=policy)
    assert server.post("/v1/workloads", reg, admin=True).status_code == 201
    _attest_refused(server, "wl-tcb", "snp.tcb_below_minimum")


def test_report_data_must_bind_the_key(server: Server, workload: str) -> None:
    guest, thief = Guest(server, MEASUREMENT), Guest(server, MEASUREMENT)
    nonce = guest.nonce(workload)
    refused(thief.attest(workload, nonce, guest.evidence(nonce)), 403, "snp.report_data_mismatch")


def test_replayed_nonce(server: Server, workload: str) -> None:
    guest = Guest(server, MEASUREMENT)
    nonce = guest.nonce(workload)
    evidence = guest.evidence(nonce)
    assert guest.attest(workload, nonce, evidence).status_code == 200
    refused(guest.attest(workload, nonce, evidence), 403, "nonce.replayed")


def test_unknown_nonce(server: Server, workload: str) -> None:
    guest = Guest(server, MEASUREMENT)
    nonce = os.urandom(32)
    refused(guest.attest(workload, nonce, guest.evidence(nonce)), 403, "nonce.unknown")


def test_expired_nonce(server: Server, workload: str) -> None:
    guest = Guest(server, MEASUREMENT)
    nonce = guest.nonce(workload)
    time.sleep(NONCE_TTL + 0.5)
    refused(guest.attest(workload, nonce, guest.evidence(nonce)), 403, "nonce.expired")


def test_sim_evidence_for_an_snp_workload(server: Server) -> None:
    reg = registration("wl-snp", MEASUREMENT, SECRET, tee="snp")
    assert server.post("/v1/workloads", reg, admin=True).status_code == 201
    guest = Guest(server, MEASUREMENT)
    nonce = guest.nonce("wl-snp", tee="snp")
    resp = guest.attest("wl-snp", nonce, guest.evidence(nonce))
    refused(resp, 403, "snp.cert_missing")  # offline, no VCEK for the sim "chip": never trusted as SNP
    refused(guest.challenge("wl-snp", tee="sim"), 400, "workload.tee_mismatch")


def test_wrong_workload(server: Server, workload: str) -> None:
    reg = registration("wl-other", OTHER_MEASUREMENT, b"other secret")
    assert server.post("/v1/workloads", reg, admin=True).status_code == 201
    guest = Guest(server, MEASUREMENT)
    nonce = guest.nonce(workload)
    refused(guest.attest("wl-other", nonce, guest.evidence(nonce)), 403, "nonce.workload_mismatch")
    nonce = guest.nonce("wl-other")  # a fresh nonce for the other workload, evidence of this one
    refused(guest.attest("wl-other", nonce, guest.evidence(nonce)), 403, "snp.measurement_mismatch")


def test_bad_token(server: Server) -> None:
    reg = registration("wl-token", MEASUREMENT, SECRET)
    for headers in ({}, {"Authorization": "Bearer " + "x" * 40}, {"Authorization": server.token}):
        resp = httpx.post(f"{server.url}/v1/workloads", json=reg, headers=headers)
        refused(resp, 401, "auth.bad_token")
    refused(httpx.get(f"{server.url}/v1/workloads/wl-main"), 401, "auth.bad_token")
    refused(httpx.delete(f"{server.url}/v1/workloads/wl-main"), 401, "auth.bad_token")


def test_oversized_body(server: Server, workload: str) -> None:
    body = b'{"workload_id":"' + b"a" * 200_000 + b'"}'
    resp = httpx.post(f"{server.url}/v1/attest", content=body, headers={"Content-Type": "application/json"})
    refused(resp, 413, "request.too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(40):
            yield b" " * 8192

    resp = httpx.post(
        f"{server.url}/v1/challenge", content=chunks(), headers={"Content-Type": "application/json"}
    )
    refused(resp, 413, "request.too_large")


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'{"workload_id": 5, "tee": "sim"}', b'{"workload_id": "a", "tee": "sev"}', b"\xff\xfe"],
)
def test_malformed_json(server: Server, body: bytes) -> None:
    resp = httpx.post(
        f"{server.url}/v1/challenge", content=body, headers={"Content-Type": "application/json"}
    )
    refused(resp, 400, "request.malformed")


def test_malformed_attest_fields(server: Server, workload: str) -> None:
    guest = Guest(server, MEASUREMENT)
    base = {"workload_id": workload, "nonce": "AAAA", "evidence": "AAAA", "pubkey": "AAAA"}
    refused(server.post("/v1/attest", base), 400, "request.malformed")  # nonce is not 32 bytes
    nonce = guest.nonce(workload)
    body = {**base, "nonce": base64.urlsafe_b64encode(nonce).rstrip(b"=").decode()}
    refused(server.post("/v1/attest", body), 400, "pubkey.invalid")
    refused(server.post("/v1/attest", body), 403, "nonce.replayed")  # the nonce was spent by the bad attempt


def test_health_and_metrics(server: Server, workload: str) -> None:
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    text = httpx.get(f"{server.url}/metrics").text
    assert 'cwbuild_decisions_total{event="attest",outcome="allow",reason="key.released"}' in text
    assert "cwbuild_request_seconds_bucket" in text


def test_zz_audit_and_logs(server: Server) -> None:
    """Runs last in the module: every refusal above is in the audit log; no log holds the secret."""
    reasons = {a["reason"] for a in server.audit() if a["outcome"] == "refuse"}
    expected = {
        "snp.measurement_mismatch", "snp.policy_debug", "snp.tcb_below_minimum", "snp.vmpl_mismatch",
        "nonce.replayed", "nonce.expired", "nonce.unknown", "snp.cert_missing", "nonce.workload_mismatch",
        "auth.bad_token", "request.too_large", "request.malformed", "workload.exists",
        "snp.report_data_mismatch", "pubkey.invalid", "workload.tee_mismatch", "workload.not_found",
    }  # fmt: skip
    assert expected <= reasons, expected - reasons
    logs = server.logs()
    assert b"INSECURE" in server.stderr_path.read_bytes()
    for form in (SECRET, base64.b64encode(SECRET), SECRET.hex().encode(), server.token.encode()):
        assert form not in logs
    db = (server.workdir / "attest.db").read_bytes() + (server.workdir / "attest.db-wal").read_bytes()
    assert SECRET not in db


def test_sim_refused_without_insecure_flag(tmp_path: Path) -> None:
    srv = new_server(tmp_path, sim_trust=False).start()
    try:
        assert (
            srv.post("/v1/workloads", registration("wl", MEASUREMENT, SECRET), admin=True).status_code == 201
        )
        guest = Guest(srv, MEASUREMENT)
        nonce = guest.nonce("wl")
        refused(guest.attest("wl", nonce, guest.evidence(nonce)), 403, "sim.not_trusted")
    finally:
        srv.kill()


def test_refuses_to_start_unsafely(tmp_path: Path) -> None:
    srv = new_server(tmp_path)
    argv = srv.argv()[3:]
    no_key = [a for a in argv if a not in ("--master-key-file", str(tmp_path / "master.key"))]
    result = cwbuild(no_key, timeout=60)
    assert result.returncode == 2
    assert b"master key" in result.stderr
    public = [*argv, "--listen", "0.0.0.0:0"]
    result = cwbuild(public, timeout=60)
    assert result.returncode == 2
    assert b"plain HTTP" in result.stderr
    (tmp_path / "master.key").chmod(0o644)
    result = cwbuild(argv, timeout=60)
    assert result.returncode == 1
    assert b"group or others" in result.stderr


def test_state_files_are_private(server: Server, workload: str) -> None:
    for name in ("attest.db", "attest.db-wal", "audit.log"):
        assert (server.workdir / name).stat().st_mode & 0o077 == 0, name

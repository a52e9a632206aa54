"""The endpoint's state (cwbuild.attest.store) and the service rules that sit on it."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from cwbuild.attest import wrap
from cwbuild.attest.api import Registration, Service
from cwbuild.attest.audit import Audit
from cwbuild.attest.certsource import CertOptions, CertSource
from cwbuild.attest.evidence_gate import EvidenceGate
from cwbuild.attest.metrics import Metrics
from cwbuild.attest.ratelimit import Rate, RateLimiter
from cwbuild.attest.store import SCHEMA_VERSION, NonceState, SqliteStore, Workload, open_store
from cwbuild.errors import AttestError, AttestRefused, ConfigError

M = bytes(range(48)).hex()


def workload(wid: str = "w", secret: bytes = b"sealed") -> Workload:
    return Workload(wid, "sim", ({"measurement": M},), {"debug": False}, secret, created_at=1.0)


def test_schema_versioned_and_newer_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    SqliteStore(db).close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(AttestError, match="schema version"):
        SqliteStore(db)
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_workloads(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    assert store.put_workload(workload(), replace=False)
    assert not store.put_workload(workload(secret=b"other"), replace=False)
    assert store.get_workload("w") == workload()
    assert store.put_workload(workload(secret=b"other"), replace=True)
    got = store.get_workload("w")
    assert got is not None
    assert got.sealed_secret == b"other"
    assert store.count_workloads() == 1
    assert store.delete_workload("w")
    assert not store.delete_workload("w")
    assert store.get_workload("w") is None
    with pytest.raises(AttestError, match="PostgreSQL"):
        open_store("postgresql://db/attest")


def test_nonce_states(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    limits = (100, 10)
    assert store.add_nonce(b"a" * 32, workload_id="w", client="c", expires_at=160.0, now=100.0, limits=limits)
    assert store.add_nonce(b"b" * 32, workload_id="w", client="c", expires_at=160.0, now=100.0, limits=limits)
    assert store.take_nonce(b"x" * 32, now=101.0).state is NonceState.UNKNOWN
    taken = store.take_nonce(b"a" * 32, now=101.0)
    assert taken.state is NonceState.OK
    assert taken.workload_id == "w"
    assert store.take_nonce(b"a" * 32, now=102.0).state is NonceState.REPLAYED
    assert store.take_nonce(b"b" * 32, now=160.0).state is NonceState.EXPIRED
    assert store.take_nonce(b"b" * 32, now=161.0).state is NonceState.REPLAYED


def test_pending_nonces_are_bounded(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    limits = (5, 3)

    def add(i: int, client: str, now: float = 100.0) -> bool:
        nonce = i.to_bytes(32, "big")
        return store.add_nonce(
            nonce, workload_id="w", client=client, expires_at=now + 60, now=now, limits=limits
        )

    assert all(add(i, "a") for i in range(3))
    assert not add(3, "a")  # per client
    assert add(4, "b")
    assert add(5, "b")
    assert not add(6, "c")  # global
    assert store.take_nonce((0).to_bytes(32, "big"), now=101).state is NonceState.OK
    assert add(7, "c")  # a used nonce is no longer pending
    assert add(8, "a", now=200.0)  # expired ones no longer count


def make_service(tmp_path: Path, master: bytes) -> Service:
    return Service(
        store=open_store(tmp_path / "s.db"),
        master_key=master,
        audit=Audit(tmp_path / "audit.log"),
        metrics=Metrics(),
        gate=EvidenceGate(certs=CertSource(CertOptions(offline=True))),
    )


def test_master_key_must_match_the_database(tmp_path: Path) -> None:
    master = os.urandom(32)
    service = make_service(tmp_path, master)
    reg = Registration.build(workload_id="w", tee="sim", reference_values=[M], policy={}, secret=b"s3cret")
    service.register(reg, client="t")
    stored = service.store.get_workload("w")
    assert stored is not None
    assert b"s3cret" not in stored.sealed_secret
    assert wrap.unseal(master, "w", stored.sealed_secret) == b"s3cret"
    service.store.close()
    with pytest.raises(AttestError, match="master key does not open"):
        make_service(tmp_path, os.urandom(32))
    assert make_service(tmp_path, master).unseal(stored) == b"s3cret"


def test_registration_validation() -> None:
    ok = {"workload_id": "w", "tee": "snp", "reference_values": [M], "policy": {}, "secret": "c2VjcmV0"}
    assert Registration.from_json(ok).secret == b"secret"
    bad = [
        {"tee": "sev"},
        {"reference_values": []},
        {"reference_values": ["00" * 47]},
        {"policy": {"measurements": [M]}},
        {"policy": {"report_data": "00" * 64}},
        {"policy": {"debugg": True}},
        {"secret": "not base64!"},
        {"secret": "AAAA" * 70},
        {"replace": "yes"},
    ]
    for change in bad:
        with pytest.raises(ConfigError):
            Registration.from_json({**ok, **change})
    with pytest.raises(AttestRefused):
        Registration.from_json({**ok, "workload_id": "../etc"})
    assert "c2VjcmV0" not in repr(Registration.from_json(ok))


def test_rate_limiter_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(Rate(per_second=2.0, burst=3), max_keys=2, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.wait_time("a") == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.allow("a")
    assert not limiter.allow("a")
    limiter.allow("b")
    limiter.allow("c")  # evicts "a", the least recently used
    assert limiter.allow("a")


def test_audit_lines_are_json_and_bounded(tmp_path: Path) -> None:
    audit = Audit(tmp_path / "audit.log")
    audit.record(
        "attest", outcome="refuse", reason="nonce.replayed", workload_id="w", client="c", detail="x" * 999
    )
    audit.close()
    import json

    line = json.loads((tmp_path / "audit.log").read_text())
    assert line["reason"] == "nonce.replayed"
    assert len(line["detail"]) < 300
    assert oct((tmp_path / "audit.log").stat().st_mode & 0o777) == "0o600"


def test_metrics_exposition() -> None:
    metrics = Metrics()
    metrics.decision("attest", "refuse", "nonce.replayed")
    metrics.decision("attest", "refuse", "nonce.replayed")
    metrics.observe("attest", 0.003)
    metrics.gauge("cwbuild_workloads", "Registered workloads.", lambda: 7)
    text = metrics.render()
    assert 'cwbuild_decisions_total{event="attest",outcome="refuse",reason="nonce.replayed"} 2' in text
    assert 'cwbuild_request_seconds_bucket{route="attest",le="0.002"} 0' in text
    assert 'cwbuild_request_seconds_bucket{route="attest",le="0.005"} 1' in text
    assert 'cwbuild_request_seconds_bucket{route="attest",le="+Inf"} 1' in text
    assert "cwbuild_workloads 7" in text


def test_registration_policy_is_canonical_and_sparse() -> None:
    reg = Registration.build(
        workload_id="w",
        tee="tdx",
        reference_values=[M.upper()],
        policy={"rtmr1": ["AB" * 48], "debug": False},
        secret=b"s",
    )
    assert reg.reference_values == (M,)
    assert reg.policy == {"rtmr1": ["ab" * 48], "debug": False}  # server defaults still apply to the rest

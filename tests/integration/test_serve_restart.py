"""Durability: kill -9 the endpoint during a burst of registrations; after a restart every acknowledged
registration is there and intact (reference values, and a secret that still unseals and is released to a
valid attestation), and nothing is half-written (every id is either absent or complete)."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.attest_support import Guest, new_server, registration

WRITERS = 4


def measurement(i: int) -> bytes:
    return hashlib.sha384(f"m{i}".encode()).digest()


def secret(i: int) -> bytes:
    return hashlib.sha256(f"secret {i}".encode()).hexdigest().encode()


@pytest.mark.slow
def test_kill_9_during_registrations(tmp_path: Path) -> None:
    srv = new_server(tmp_path).start()
    acked: set[int] = set()
    attempted: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w: int) -> None:
        with httpx.Client(base_url=srv.url, headers=srv.admin(), timeout=5) as client:
            i = w
            while not stop.is_set():
                with lock:
                    attempted.add(i)
                try:
                    resp = client.post(
                        "/v1/workloads", json=registration(f"burst-{i}", measurement(i), secret(i))
                    )
                except httpx.HTTPError:
                    return
                if resp.status_code == 201:
                    with lock:
                        acked.add(i)
                i += WRITERS

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    srv.kill(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert len(acked) >= 10, "the burst registered too little to mean anything"

    srv.start()
    try:
        with httpx.Client(base_url=srv.url, headers=srv.admin(), timeout=10) as client:
            for i in sorted(attempted):
                resp = client.get(f"/v1/workloads/burst-{i}")
                if i in acked:
                    assert resp.status_code == 200, (i, resp.text)
                assert resp.status_code in (200, 404)
                if resp.status_code == 200:  # present means complete
                    body = resp.json()
                    assert body["reference_values"] == [measurement(i).hex()]
                    assert body["has_secret"] is True
        for i in sorted(acked)[:: max(1, len(acked) // 5)]:
            guest = Guest(srv, measurement(i))
            nonce = guest.nonce(f"burst-{i}")
            resp = guest.attest(f"burst-{i}", nonce, guest.evidence(nonce))
            assert resp.status_code == 200, resp.text
            assert guest.unwrap(resp) == secret(i)
    finally:
        srv.kill()

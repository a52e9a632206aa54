"""Helpers for the endpoint tests: run `cwbuild serve` as a user would, and play the guest.

The server runs as `python -m cwbuild serve` (like tests.conftest.cwbuild, but long-running), on 127.0.0.1
with port 0; the bound port is read from its first stderr line. The guest side builds real simulated
evidence with the evidence module's sim signer and real RSA keys, and unwraps with `cryptography`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from cwbuild.attest.sim import generate_sim_key, public_key_pem, sim_report

_LISTEN = re.compile(rb"listening on (https?://\S+)")


def write_secret(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@dataclass
class Server:
    """A running `cwbuild serve` subprocess and the files it uses."""

    workdir: Path
    token: str
    sim_key: ec.EllipticCurvePrivateKey
    extra: Sequence[str] = ()
    config: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    ca: Path | None = None  # CA file for an https server

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else True

    @property
    def audit_path(self) -> Path:
        return self.workdir / "audit.log"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "stderr.log"

    def argv(self) -> list[str]:
        cfg = self.workdir / "server.yaml"
        cfg.write_text(json.dumps(self.config))
        return [
            sys.executable, "-m", "cwbuild", "serve",
            "--config", str(cfg),
            "--listen", "127.0.0.1:0",
            "--db", str(self.workdir / "attest.db"),
            "--admin-token-file", str(self.workdir / "token"),
            "--master-key-file", str(self.workdir / "master.key"),
            "--audit-log", str(self.audit_path),
            "--offline",
            *self.extra,
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> Server:
        offset = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        err = self.stderr_path.open("ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTEN.search(self.stderr_path.read_bytes()[offset:])
            if match and self._healthy(match.group(1).decode()):
                self.url = match.group(1).decode()
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.stderr_path.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"server did not come up: {self.stderr_path.read_text()}")

    def _healthy(self, url: str) -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=2, verify=self.verify).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def post(self, path: str, body: Any, *, admin: bool = False) -> httpx.Response:
        headers = self.admin() if admin else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=20, verify=self.verify)

    def logs(self) -> bytes:
        return self.stderr_path.read_bytes() + (
            self.audit_path.read_bytes() if self.audit_path.exists() else b""
        )

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


def new_server(workdir: Path, *, sim_trust: bool = True, extra: Sequence[str] = (), **config: Any) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    token = base64.urlsafe_b64encode(os.urandom(30)).decode()
    write_secret(workdir / "token", token.encode() + b"\n")
    write_secret(workdir / "master.key", os.urandom(32).hex().encode())
    key = generate_sim_key()
    (workdir / "sim.pem").write_bytes(public_key_pem(key))
    args = [*extra, *(["--insecure-sim-trust", str(workdir / "sim.pem")] if sim_trust else [])]
    return Server(workdir, token, key, args, dict(config))


# --- the guest ---


@dataclass
class Guest:
    """A guest with an ephemeral RSA key, producing sim evidence for a measurement."""

    server: Server
    measurement: bytes
    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    @property
    def pubkey_der(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def challenge(self, workload_id: str, tee: str = "sim") -> httpx.Response:
        return self.server.post("/v1/challenge", {"workload_id": workload_id, "tee": tee})

    def nonce(self, workload_id: str, tee: str = "sim") -> bytes:
        resp = self.challenge(workload_id, tee)
        assert resp.status_code == 200, resp.text
        text = resp.json()["nonce"]
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    def evidence(self, nonce: bytes, **fields: Any) -> bytes:
        report_data = hashlib.sha512(nonce + hashlib.sha256(self.pubkey_der).digest()).digest()
        return sim_report(
            measurement=self.measurement, report_data=report_data, key=self.server.sim_key, **fields
        )

    def attest(self, workload_id: str, nonce: bytes, evidence: bytes) -> httpx.Response:
        body = {
            "workload_id": workload_id,
            "nonce": base64.urlsafe_b64encode(nonce).rstrip(b"=").decode(),
            "evidence": base64.b64encode(evidence).decode(),
            "pubkey": base64.b64encode(self.pubkey_der).decode(),
        }
        return self.server.post("/v1/attest", body)

    def unwrap(self, resp: httpx.Response) -> bytes:
        wrapped = base64.b64decode(resp.json()["wrapped_key"])
        oaep = padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
        return self.key.decrypt(wrapped, oaep)


def registration(
    workload_id: str, measurement: bytes, secret: bytes, tee: str = "sim", **extra: Any
) -> dict[str, Any]:
    return {
        "workload_id": workload_id,
        "tee": tee,
        "reference_values": [measurement.hex()],
        "secret": base64.b64encode(secret).decode(),
        **extra,
    }

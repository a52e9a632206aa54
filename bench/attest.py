"""Benchmark: full attestations per second against `cwbuild serve` (not run by pytest).

A full attestation is what a guest does: POST /v1/challenge, build evidence bound to the nonce, POST
/v1/attest, which the server answers after parsing the report, verifying the ECDSA P-384 signature,
applying the policy, consuming the nonce in SQLite and wrapping the secret with RSA-OAEP. The guests are
simulated (sim TEE): the load generator signs each report with ECDSA P-384, so it spends about as much CPU
per attestation as the server's verify. Both run on this machine; the figures are next to the raw
`openssl speed ecdsap384` verify rate, the floor of any verifier's cost.

    .venv/bin/python bench/attest.py [--seconds 15] [--clients 2] [--concurrency 4] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cwbuild.attest.sim import generate_sim_key, public_key_pem, sim_report  # noqa: E402

MEASUREMENT = bytes(range(48))
SECRET = b"bench-secret-0123456789abcdef"


def write_secret(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def start_server(work: Path, sim_pem: bytes, profile: str | None) -> tuple[subprocess.Popen[bytes], str, str]:
    token = base64.urlsafe_b64encode(os.urandom(30)).decode()
    write_secret(work / "token", token.encode())
    write_secret(work / "mk", os.urandom(32).hex().encode())
    (work / "sim.pem").write_bytes(sim_pem)
    cfg = {"rate_per_second": 1e6, "rate_burst": 1000000, "max_pending_per_client": 100000}
    (work / "server.yaml").write_text(json.dumps(cfg))
    argv = [
        sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []), "-m", "cwbuild", "serve",
        "--config", str(work / "server.yaml"), "--listen", "127.0.0.1:0",
        "--db", str(work / "db.sqlite"), "--admin-token-file", str(work / "token"),
        "--master-key-file", str(work / "mk"), "--insecure-sim-trust", str(work / "sim.pem"),
        "--offline", "--audit-log", str(work / "audit.log"),
    ]  # fmt: skip
    err = (work / "stderr.log").open("wb")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=err, stderr=err)
    for _ in range(600):
        match = re.search(rb"listening on (http://\S+)", (work / "stderr.log").read_bytes())
        if match:
            url = match.group(1).decode()
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    return proc, url, token
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    raise SystemExit("server did not start:\n" + (work / "stderr.log").read_text())


class Conn:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: cheaper than any client library, so the
    load generator leaves more of the two cores to the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, object]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)


async def flow(conn: Conn, ctx: dict[str, object]) -> float:
    start = time.perf_counter()
    status, raw = await conn.post("/v1/challenge", {"workload_id": "bench", "tee": "sim"})
    assert status == 200, raw
    text = json.loads(raw)["nonce"]
    nonce = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    der = ctx["der"]
    assert isinstance(der, bytes)
    report_data = hashlib.sha512(nonce + hashlib.sha256(der).digest()).digest()
    report = sim_report(measurement=MEASUREMENT, report_data=report_data, key=ctx["sim"])  # type: ignore[arg-type]
    body = {
        "workload_id": "bench",
        "nonce": text,
        "evidence": base64.b64encode(report).decode(),
        "pubkey": ctx["b64"],
    }
    status, raw = await conn.post("/v1/attest", body)
    assert status == 200, raw
    return time.perf_counter() - start


async def client_main(
    url: str, sim_der: bytes, seconds: float, concurrency: int
) -> tuple[list[float], float]:
    sim = serialization.load_der_private_key(sim_der, password=None)
    key = rsa.generate_private_key(65537, 2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ctx = {"sim": sim, "der": der, "b64": base64.b64encode(der).decode(), "key": key}
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conns = [Conn(host, int(port)) for _ in range(concurrency)]
    for conn in conns:
        await flow(conn, ctx)  # open and warm each connection
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(conn: Conn) -> None:
        while time.perf_counter() < deadline:
            latencies.append(await flow(conn, ctx))

    await asyncio.gather(*(worker(c) for c in conns))
    return latencies, time.perf_counter() - start


def run_client(args: tuple[str, bytes, float, int], out: mp.Queue[tuple[list[float], float]]) -> None:
    out.put(asyncio.run(client_main(*args)))


def check_unwrap(url: str, sim_key: object) -> None:
    key = rsa.generate_private_key(65537, 2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    text = httpx.post(url + "/v1/challenge", json={"workload_id": "bench", "tee": "sim"}).json()["nonce"]
    nonce = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    rd = hashlib.sha512(nonce + hashlib.sha256(der).digest()).digest()
    report = sim_report(measurement=MEASUREMENT, report_data=rd, key=sim_key)  # type: ignore[arg-type]
    body = {"workload_id": "bench", "nonce": text, "evidence": base64.b64encode(report).decode(),
            "pubkey": base64.b64encode(der).decode()}  # fmt: skip
    wrapped = base64.b64decode(httpx.post(url + "/v1/attest", json=body).json()["wrapped_key"])
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert key.decrypt(wrapped, oaep) == SECRET


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (proc(5) fields 14 and 15), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def openssl_speed() -> str:
    out = subprocess.run(
        ["openssl", "speed", "-seconds", "3", "ecdsap384"], capture_output=True, text=True, check=True
    ).stdout
    line = next(ln for ln in out.splitlines() if "nistp384" in ln and "ecdsa" in ln)
    fields = line.split()
    return f"openssl speed ecdsap384 (1 core): sign {fields[-2]}/s, verify {fields[-1]}/s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent flows per client process")
    parser.add_argument("--profile", help="run the server under cProfile, writing stats to this file")
    args = parser.parse_args()
    sim = generate_sim_key()
    sim_der = sim.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, token = start_server(Path(tmp), public_key_pem(sim), args.profile)
        try:
            reg = {"workload_id": "bench", "tee": "sim", "reference_values": [MEASUREMENT.hex()],
                   "secret": base64.b64encode(SECRET).decode()}  # fmt: skip
            resp = httpx.post(url + "/v1/workloads", json=reg, headers={"Authorization": f"Bearer {token}"})
            assert resp.status_code == 201, resp.text
            check_unwrap(url, sim)
            queue: mp.Queue[tuple[list[float], float]] = mp.Queue()
            procs = [
                mp.Process(target=run_client, args=((url, sim_der, args.seconds, args.concurrency), queue))
                for _ in range(args.clients)
            ]
            cpu_before = cpu_seconds(proc.pid)
            for p in procs:
                p.start()
            results = [queue.get() for _ in procs]
            for p in procs:
                p.join()
            latencies = [x for lat, _ in results for x in lat]
            elapsed = max(e for _, e in results)
            server_cpu = cpu_seconds(proc.pid) - cpu_before
            audit_lines = sum(1 for _ in (Path(tmp) / "audit.log").open())
        finally:
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly (and cProfile writes its stats)
            proc.wait(timeout=20)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    rate = len(latencies) / elapsed
    p50 = statistics.median(latencies) * 1e3
    print(f"cores: {os.cpu_count()} (shared with the load generator and anyone else on the machine)")
    print(f"load generator: {args.clients} processes x {args.concurrency} flows, {args.seconds:g} s")
    print(f"full attestations: {len(latencies)} in {elapsed:.1f} s = {rate:.0f}/s")
    print(f"latency (challenge + evidence + attest): p50 {p50:.1f} ms, p99 {p99 * 1e3:.1f} ms")
    print(f"audit lines written: {audit_lines}")
    per = server_cpu / len(latencies)
    print(
        f"server CPU: {server_cpu:.1f} s = {per * 1e3:.2f} ms/attestation (= {1 / per:.0f}/s on a free core)"
    )
    print(openssl_speed())


if __name__ == "__main__":
    main()

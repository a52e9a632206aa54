"""The simulated TEE's host side (DESIGN.md "Simulated TEE"): signs the guest's report requests.

`cwbuild run --tee sim` listens on a unix socket; QEMU's virtio-serial chardev connects to it and the guest
sees the port as `/dev/virtio-ports/org.cwbuild.simtee.0` (`cwbuild.launch.SIM_PORT_NAME`). The line protocol:

    guest -> host:  128 hex digits (the 64 report_data bytes) and "\\n"
    host -> guest:  base64 of a signed 1184-byte SNP report and "\\n",
                    or "error <reason>\\n" for anything else (malformed, over-long, too many requests)

The report's MEASUREMENT is fixed when the signer starts: the SNP launch digest of the exact firmware,
kernel, initrd and command line `run` hands QEMU, so a modified boot chain yields a digest the endpoint
refuses.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import socket
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cwbuild.attest.sim import sim_report
from cwbuild.errors import ConfigError
from cwbuild.secrets import read_secret_file

log = logging.getLogger("cwbuild.runner.signer")

#: report_data is 64 bytes (spec/attestation.md §1.1 offset 0x050) = 128 hex digits.
REQUEST_RE = re.compile(rb"[0-9a-fA-F]{128}\Z")
MAX_LINE = 256
#: A guest attests once per boot; a few retries are fine, a flood is not.
MAX_REQUESTS = 16
POLL_SECONDS = 0.25


def load_sim_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The signing key: a PEM (PKCS#8 or SEC1) P-384 private key in a file only its owner can read."""
    data = read_secret_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ConfigError(f"{path}: the simulated TEE key must be ECDSA P-384")
    return key


class SimSigner:
    """Answers report requests on `socket_path` from a background thread until `close()`."""

    def __init__(
        self, socket_path: Path, *, key: ec.EllipticCurvePrivateKey, measurement: bytes, policy: int
    ) -> None:
        if len(measurement) != 48:
            raise ValueError("an SNP measurement is 48 bytes")
        self.socket_path = socket_path
        self._key = key
        self.measurement = measurement
        self.policy = policy
        self.served = 0
        self.refused = 0
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def answer(self, line: bytes) -> bytes:
        """The reply to one request line (without its newline)."""
        if self.served + self.refused >= MAX_REQUESTS:
            self.refused += 1
            return b"error too many requests\n"
        if not REQUEST_RE.match(line):
            self.refused += 1
            return b"error malformed request: expected 128 hex digits\n"
        report = sim_report(
            measurement=self.measurement,
            report_data=bytes.fromhex(line.decode("ascii")),
            key=self._key,
            policy=self.policy,
        )
        self.served += 1
        log.info("simulated TEE: signed report %d", self.served)
        return base64.b64encode(report) + b"\n"

    def start(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.socket_path))
        self.socket_path.chmod(0o600)
        server.listen(1)
        server.settimeout(POLL_SECONDS)
        self._server = server
        self._thread = threading.Thread(target=self._serve, name="sim-signer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def _serve(self) -> None:
        server = self._server
        if server is None:
            return
        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        conn.settimeout(POLL_SECONDS)
        buf = b""
        skipping = False
        while not self._stop.is_set():
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if skipping:
                    skipping = False
                    continue
                conn.sendall(self.answer(line.rstrip(b"\r")))
            if len(buf) > MAX_LINE:
                conn.sendall(b"error request line too long\n")
                self.refused += 1
                buf, skipping = b"", True

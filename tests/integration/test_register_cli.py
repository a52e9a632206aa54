"""`cwbuild register` and the client API against `cwbuild serve` over TLS (a test CA made here).

Covers issue 5 item 6: TLS verified with a CA file (and refused without it), the 409 / --replace rule, a bad
token, the Python functions the build step calls (`register_workload`, rollback with `delete_workload`), and
no secret on any output.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cwbuild.attest.api import Registration
from cwbuild.attest.client import delete_workload, get_workload, register_workload
from cwbuild.errors import AttestRefused, NetworkError
from tests.conftest import cwbuild
from tests.integration.attest_support import Server, new_server, write_secret

M = bytes(range(48)).hex()
SECRET = b"cli-secret-" + os.urandom(8).hex().encode()


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    else:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("cwbuild test CA", ca_key, None)
    leaf = _cert("127.0.0.1", key, (ca.subject, ca_key))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(leaf.public_bytes(pem))
    key_bytes = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_secret(directory / "server.key", key_bytes)
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_tls(work)
    srv = new_server(work, extra=["--tls-cert", str(cert), "--tls-key", str(key)])
    srv.ca = ca
    srv.start()
    assert srv.url.startswith("https://")
    yield srv
    srv.kill()


def register_args(server: Server, wid: str, *extra: str) -> list[str]:
    secret = write_secret(server.workdir / "secret.txt", SECRET + b"\n")
    return [
        "register", "--url", server.url, "--token-file", str(server.workdir / "token"), "--workload-id", wid,
        "--tee", "sim", "--reference", M, "--secret-file", str(secret), *extra,
    ]  # fmt: skip


def test_register_command_over_tls(server: Server) -> None:
    assert server.ca is not None
    result = cwbuild([*register_args(server, "cli-1"), "--ca-file", str(server.ca), "--json"], timeout=60)
    assert result.returncode == 0, result.stderr
    stored = json.loads(result.stdout)
    assert stored["reference_values"] == [M]
    assert stored["has_secret"] is True
    again = cwbuild([*register_args(server, "cli-1"), "--ca-file", str(server.ca)], timeout=60)
    assert again.returncode == 1
    assert b"workload.exists" in again.stderr
    assert b"--replace" in again.stderr
    replaced = cwbuild(
        [*register_args(server, "cli-1"), "--ca-file", str(server.ca), "--replace"], timeout=60
    )
    assert replaced.returncode == 0, replaced.stderr
    for out in (result, again, replaced):
        assert SECRET not in out.stdout + out.stderr
        assert server.token.encode() not in out.stdout + out.stderr


def test_tls_is_verified(server: Server) -> None:
    result = cwbuild(register_args(server, "cli-2"), timeout=60)
    assert result.returncode == 1
    assert b"CERTIFICATE_VERIFY_FAILED" in result.stderr or b"certificate" in result.stderr.lower()
    assert b"cli-2" not in server.audit_path.read_bytes()


def test_bad_token_and_usage(server: Server) -> None:
    assert server.ca is not None
    bad = write_secret(server.workdir / "bad-token", b"b" * 40)
    args = register_args(server, "cli-3")
    args[args.index("--token-file") + 1] = str(bad)
    result = cwbuild([*args, "--ca-file", str(server.ca)], timeout=60)
    assert result.returncode == 1
    assert b"auth.bad_token" in result.stderr
    args = register_args(server, "cli-3")
    args[args.index("--reference") + 1] = "abcd"
    short = cwbuild([*args, "--ca-file", str(server.ca)])
    assert short.returncode == 2
    assert b"reference value" in short.stderr


def test_python_api_and_rollback(server: Server) -> None:
    assert server.ca is not None
    reg = Registration.build(workload_id="api-1", tee="sim", reference_values=[M], policy={}, secret=SECRET)
    register_workload(server.url, server.token, reg, server.ca, False)
    assert get_workload(server.url, server.token, "api-1", server.ca)["reference_values"] == [M]
    with pytest.raises(AttestRefused) as refused:
        register_workload(server.url, server.token, reg, server.ca, False)
    assert refused.value.reason == "workload.exists"
    register_workload(server.url, server.token, reg, server.ca, True)
    delete_workload(server.url, server.token, "api-1", server.ca)
    delete_workload(server.url, server.token, "api-1", server.ca)  # rollback twice is harmless
    with pytest.raises(AttestRefused) as missing:
        get_workload(server.url, server.token, "api-1", server.ca)
    assert missing.value.reason == "workload.not_found"
    with pytest.raises(NetworkError):
        register_workload("https://127.0.0.1:1", server.token, reg, server.ca, False, timeout=2, retries=1)


def test_policy_file(server: Server) -> None:
    assert server.ca is not None
    policy = server.workdir / "policy.yaml"
    policy.write_text("debug: false\nmin_tcb:\n  Milan: {bl: 3, snp: 8}\n")
    args = [*register_args(server, "cli-policy"), "--ca-file", str(server.ca), "--json"]
    result = cwbuild([*args, "--policy", str(policy)], timeout=60)
    assert result.returncode == 0, result.stderr
    stored = json.loads(result.stdout)["policy"]
    assert set(stored) == {"debug", "min_tcb"}
    assert stored["min_tcb"]["Milan"]["snp"] == 8
    policy.write_text("debugg: true\n")
    bad = cwbuild([*args, "--policy", str(policy)], timeout=60)
    assert bad.returncode == 2
    assert b"debugg" in bad.stderr

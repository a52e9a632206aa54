"""Helpers for the end-to-end guest tests: a test CA, a TLS `cwbuild serve`, and a hand-assembled sim bundle.

The bundle is what `cwbuild build --tee sim` makes, assembled from the library's own steps: the kit's kernel
and AmdSev OVMF, an initrd from the kit's userland plus the guest agent (cwbuild.boot), a reproducible ext4 of
a tiny rootfs (the kit's static busybox and an entrypoint) encrypted as LUKS (cwbuild.disk), and
measurement.json from cwbuild.measure.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cwbuild.boot.agent import AgentConfig, Entrypoint, agent_files, split_init
from cwbuild.boot.initrd import build_initrd
from cwbuild.boot.kit import Kit
from cwbuild.disk.fs import FsSpec, make_filesystem
from cwbuild.disk.luks import LuksFormat, LuksSpec, encrypt_image
from cwbuild.measure.api import Blob, MeasureSpec, SevOptions, Target, Tee, measure
from cwbuild.measure.bundle import dumps
from tests.integration.attest_support import Server, write_secret

CMDLINE = "console=ttyS0 panic=-1 quiet"
GUEST_HOST = "10.0.2.2"  # QEMU user networking's address of the host (docs/system/devices/net.rst)
MEMORY_MIB = 512
CPUS = 1


@dataclass(frozen=True)
class EndpointCA:
    ca_pem: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(
    where: Path, *, names: tuple[str, ...] = ("127.0.0.1", GUEST_HOST), label: str = "ca"
) -> EndpointCA:
    """A CA and a server certificate for `names` (IP SANs), both P-256."""
    where.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"cwbuild test {label}"))
        .issuer_name(_name(f"cwbuild test {label}"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address(n)) for n in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("cwbuild test endpoint"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = EndpointCA(where / f"{label}.pem", where / f"{label}-server.pem", where / f"{label}-server.key")
    out.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    write_secret(out.key, key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    return out


class TlsServer(Server):
    """`cwbuild serve` with TLS; health checked against the test CA."""

    ca_file: Path

    def _healthy(self, url: str) -> bool:
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            return httpx.get(url + "/healthz", timeout=2, verify=ctx).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].rstrip("/"))

    def sim_key_pem(self, path: Path) -> Path:
        pkcs8 = serialization.PrivateFormat.PKCS8
        pem = self.sim_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
        return write_secret(path, pem)


def tls_server(workdir: Path, ca: EndpointCA) -> TlsServer:
    from tests.integration.attest_support import new_server

    base = new_server(workdir, extra=["--tls-cert", str(ca.cert), "--tls-key", str(ca.key)])
    server = TlsServer(base.workdir, base.token, base.sim_key, base.extra, base.config)
    server.ca_file = ca.ca_pem
    return server


@dataclass(frozen=True)
class Workload:
    """What goes on the encrypted disk: a rootfs of the kit's busybox and the image config to run."""

    config: dict[str, Any]
    files: dict[str, tuple[bytes, int]]  # path -> (content, mode)


def busybox_rootfs(kit: Kit, root: Path, workload: Workload) -> None:
    for d in ("bin", "etc", "srv", "tmp", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kit.path(kit.userland()["usr/bin/busybox"]), root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    (root / "bin/sh").symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\napp:x:1000:\n")
    for rel, (data, mode) in workload.files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)


def make_bundle(
    kit: Kit,
    out: Path,
    *,
    url: str,
    ca_pem: bytes,
    workload_id: str,
    passphrase: bytes,
    workload: Workload,
    luks: LuksFormat = LuksFormat.LUKS2,
    krun_footer: bytes | None = None,
    blocks_of: str | None = None,
) -> tuple[str, list[int]]:
    """Write a sim bundle into `out`; (its SNP measurement in hex, the filesystem blocks of `blocks_of`)."""
    work = out.parent / f".{out.name}.work"
    (work / "rootfs").mkdir(parents=True)
    (out / "firmware").mkdir(parents=True)
    busybox_rootfs(kit, work / "rootfs", workload)
    spec = FsSpec(image_digest="sha256:" + "ab" * 32, source_date_epoch=1700000000, config=workload.config)
    make_filesystem(work / "rootfs", work / "fs.img", spec=spec)
    blocks = file_blocks(work / "fs.img", blocks_of) if blocks_of else []
    lspec = LuksSpec(format=luks, sector_size=4096 if luks is LuksFormat.LUKS2 else 512)
    encrypt_image(
        work / "fs.img", out / "disk.img", spec=lspec, passphrase=passphrase, krun_footer=krun_footer
    )
    config = AgentConfig(workload_id=workload_id, tee="sim", attestation_url=url, ca_pem=ca_pem, retries=3)
    init, files = split_init(agent_files(config, Entrypoint.from_config(workload.config)))
    build_initrd(kit, init_script=init, extra_files=files, out=out / "initrd.img")
    shutil.copyfile(kit.vmlinuz, out / "vmlinuz")
    shutil.copyfile(kit.firmware("snp"), out / "firmware/OVMF.amdsev.fd")
    result = measure(
        MeasureSpec(
            targets=(Target(Tee.SNP, out / "firmware/OVMF.amdsev.fd"),),
            kernel=Blob(path=out / "vmlinuz"),
            initrd=Blob(path=out / "initrd.img"),
            cmdline=CMDLINE,
            sev=SevOptions(cpus=CPUS),
        )
    )
    (out / "measurement.json").write_text(dumps(result.to_json()))
    manifest = {"workload_id": workload_id, "tee": "sim", "launch": {"tee": "sim", "memory_mib": MEMORY_MIB}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work)
    value = result.get(Tee.SNP).values["measurement"]
    assert value is not None
    return value, blocks


def file_blocks(image: Path, path: str) -> list[int]:
    """The ext4 blocks holding `path`'s data (debugfs `blocks`, e2fsprogs)."""
    proc = subprocess.run(
        ["debugfs", "-R", f"blocks /{path}", str(image)], capture_output=True, check=True, timeout=60
    )
    return [int(b) for b in proc.stdout.split()]


def random_passphrase() -> bytes:
    """Like the build's default: 32 random bytes as hex."""
    return os.urandom(32).hex().encode()

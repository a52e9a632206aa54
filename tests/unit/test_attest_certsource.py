"""Where the endpoint finds VCEKs: the guest's cert table, the cache directory, AMD KDS (a local stand-in).

Known answers: the KDS VCEK URLs of spec/attestation.md §1.9 — go-sev-guest's verify_test.go URL for its
Milan test report (fixture gosev_milan_v2_report.bin) and snpguest's Turin URL for the values of Microsoft's
Turin v5 report (CHIP_ID[0:8] 59790fb1c39f35c1, REPORTED_TCB 01 01 01 04 00 00 00 51).
"""

from __future__ import annotations

import http.server
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import pytest

from cwbuild.attest import snp_report as layout
from cwbuild.attest.certsource import (
    GUID_ARK,
    GUID_VCEK,
    CertOptions,
    CertSource,
    build_cert_table,
    parse_cert_table,
    vcek_url,
)
from cwbuild.attest.evidence_gate import EvidenceGate
from cwbuild.attest.policy import Policy
from cwbuild.attest.snp_report import SnpReport
from cwbuild.attest.tcb import Product
from cwbuild.errors import FormatError
from tests.conftest import FIXTURES

SNP = FIXTURES / "evidence" / "snp"
GOSEV_URL_START = "https://kdsintf.amd.com/vcek/v1/Milan/3ac3fe21"
GOSEV_URL_END = "8b006b5d?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68"
TURIN_URL = "https://kdsintf.amd.com/vcek/v1/Turin/59790fb1c39f35c1?fmcSPL=01&blSPL=01&teeSPL=01&snpSPL=04&ucodeSPL=81"


@pytest.fixture(scope="module")
def gosev() -> SnpReport:
    return SnpReport.parse((SNP / "gosev_milan_v2_report.bin").read_bytes())


def test_cert_table_round_trip_and_bounds() -> None:
    certs = {GUID_VCEK: b"vcek-der", GUID_ARK: b"ark"}
    table = build_cert_table(certs)
    assert parse_cert_table(table) == certs
    assert parse_cert_table(build_cert_table({uuid.uuid4(): b"x"})) == {}  # unknown GUIDs are skipped
    assert parse_cert_table(build_cert_table({})) == {}
    with pytest.raises(FormatError, match="terminating"):
        parse_cert_table(bytes(10))
    broken = bytearray(table)
    broken[20:24] = (1 << 20).to_bytes(4, "little")  # length of entry 0 beyond the table
    with pytest.raises(FormatError, match="outside"):
        parse_cert_table(bytes(broken))
    entry = GUID_VCEK.bytes + (72).to_bytes(4, "little") + (1).to_bytes(4, "little")
    with pytest.raises(FormatError, match="twice"):
        parse_cert_table(entry + entry + bytes(24) + b"x")
    with pytest.raises(FormatError, match="larger"):
        parse_cert_table(bytes(70000))


def test_vcek_urls_known_answers(gosev: SnpReport) -> None:
    url = vcek_url(gosev, Product.MILAN)
    assert url.startswith(GOSEV_URL_START)
    assert url.endswith(GOSEV_URL_END)
    body = layout.encode_report(
        version=5,
        policy=layout.DEFAULT_GUEST_POLICY,
        signature_algo=layout.SIG_ALGO_ECDSA_P384_SHA384,
        chip_id=bytes.fromhex("59790fb1c39f35c1") + bytes(56),
        reported_tcb=bytes([1, 1, 1, 4, 0, 0, 0, 0x51]),
        cpuid_fam_id=0x1A,
        cpuid_mod_id=0x02,
    )
    turin = SnpReport.parse(body)
    assert vcek_url(turin, Product.TURIN) == TURIN_URL


def test_cert_cache_feeds_the_verifier(gosev: SnpReport, tmp_path: Path) -> None:
    """The real go-sev-guest report verifies once its VCEK sits in --cert-cache under the documented name."""
    name = f"vcek-Milan-{gosev.chip_id.hex()}-{gosev.reported_tcb.hex()}.der"
    (tmp_path / name).write_bytes((SNP / "gosev_milan_vcek.der").read_bytes())
    gate = EvidenceGate(certs=CertSource(CertOptions(cache_dir=tmp_path, offline=True)))
    policy = Policy.from_dict({"debug": True})
    at = datetime(2024, 6, 1, tzinfo=UTC)
    verdict = gate.verify("snp", gosev.raw, None, policy=policy, now=at)
    assert verdict.ok, verdict.to_json()
    empty = EvidenceGate(certs=CertSource(CertOptions(offline=True)))
    assert "snp.cert_missing" in empty.verify("snp", gosev.raw, None, policy=policy, now=at).failure_ids()
    table = build_cert_table({GUID_VCEK: (SNP / "gosev_milan_vcek.der").read_bytes()})
    assert empty.verify("snp", gosev.raw, table, policy=policy, now=at).ok  # from the guest's cert table
    strict = gate.verify("snp", gosev.raw, None, policy=Policy(), now=at)
    assert strict.failure_ids() == ("snp.policy_debug",)


class _Kds(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        body = self.files.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def kds() -> Iterator[str]:
    _Kds.files, _Kds.requests = {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Kds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_kds_fetch_is_cached_and_failures_remembered(gosev: SnpReport, kds: str, tmp_path: Path) -> None:
    der = (SNP / "gosev_milan_vcek.der").read_bytes()
    path = vcek_url(gosev, Product.MILAN, kds).removeprefix(kds)
    _Kds.files[path] = der
    source = CertSource(CertOptions(cache_dir=tmp_path, kds_base=kds))
    assert source.may_fetch(gosev, None)
    assert source.certs_for(gosev, None) == (der,)
    assert _Kds.requests == [path]
    assert not source.may_fetch(gosev, None)  # now cached on disk
    assert CertSource(CertOptions(cache_dir=tmp_path, offline=True)).certs_for(gosev, None) == (der,)
    assert len(_Kds.requests) == 1
    offline = CertSource(CertOptions(kds_base=kds, offline=True))
    assert offline.certs_for(gosev, None) == ()
    assert len(_Kds.requests) == 1
    _Kds.files.clear()
    missing = CertSource(CertOptions(kds_base=kds))
    assert missing.certs_for(gosev, None) == ()  # Milan, then Genoa (a v2 report names no product)
    count = len(_Kds.requests)
    assert count == 3
    assert missing.certs_for(gosev, None) == ()
    assert len(_Kds.requests) == count  # failures are remembered for a while

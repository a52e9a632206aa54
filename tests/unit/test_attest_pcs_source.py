"""TDX collateral fetched from Intel PCS (a local stand-in serving go-tdx-guest's real PCS responses).

The stand-in answers the spec/attestation.md §3.7 URLs with the fixture files (tcbInfo and QE identity
responses, the URL-encoded TCB signing chain in `TCB-Info-Issuer-Chain`, PCK and root CRLs). Trustee's
debug-TD quote (FMSPC 50806f000000) must then verify as UpToDate — a status that only the fetched collateral
can give — and the fetch must be cached per FMSPC.
"""

from __future__ import annotations

import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import ClassVar

import pytest

from cwbuild.attest.certsource import CertOptions, CertSource
from cwbuild.attest.evidence_gate import EvidenceGate
from cwbuild.attest.pcs_source import CollateralSource, PcsOptions, quote_fmspc_and_ca
from cwbuild.attest.policy import Policy
from tests.conftest import FIXTURES

TDX = FIXTURES / "evidence" / "tdx"
T_GOTDX = datetime(2023, 7, 1, tzinfo=UTC)  # inside the collateral windows (spec §4.2)
QUOTE = (TDX / "trustee_v4_quote_debugtd.dat").read_bytes()


class _Pcs(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []
    routes: ClassVar[dict[str, tuple[str, dict[str, str]]]] = {
        "/tdx/certification/v4/tcb?fmspc=50806f000000": (
            "gotdx_tcbinfo_fmspc50806f000000.json",
            {"TCB-Info-Issuer-Chain": "gotdx_tcb_signing_issuer_chain.DERIVED.pem"},
        ),
        "/tdx/certification/v4/qe/identity": ("gotdx_qe_identity.json", {}),
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der": ("gotdx_pckcrl_platform.der", {}),
        "/IntelSGXRootCA.der": ("gotdx_intel_root_ca_crl.der", {}),
    }

    def do_GET(self) -> None:
        self.seen.append(self.path)
        route = self.routes.get(self.path)
        body = (TDX / route[0]).read_bytes() if route else b""
        self.send_response(200 if route else 404)
        for name, fixture in (route[1] if route else {}).items():
            self.send_header(name, urllib.parse.quote((TDX / fixture).read_text()))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pcs() -> Iterator[str]:
    _Pcs.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pcs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def gate(source: CollateralSource) -> EvidenceGate:
    return EvidenceGate(certs=CertSource(CertOptions(offline=True)), collateral=source)


def test_fmspc_from_the_pck_certificate() -> None:
    assert quote_fmspc_and_ca(QUOTE) == ("50806f000000", "platform")


def test_collateral_fetched_cached_and_used(pcs: str) -> None:
    source = CollateralSource(PcsOptions(pcs_base=pcs, certs_base=pcs))
    assert source.may_fetch(QUOTE)
    verdict = gate(source).verify("tdx", QUOTE, None, policy=Policy(debug=True), now=T_GOTDX)
    assert verdict.ok, verdict.to_json()
    assert verdict.claims["tcb"]["tcb_status"] == "UpToDate"
    assert len(_Pcs.seen) == 4
    assert not source.may_fetch(QUOTE)
    gate(source).verify("tdx", QUOTE, None, policy=Policy(debug=True), now=T_GOTDX)
    assert len(_Pcs.seen) == 4  # cached per FMSPC


def test_without_collateral(pcs: str) -> None:
    offline = gate(CollateralSource(PcsOptions(pcs_base=pcs, offline=True)))
    verdict = offline.verify("tdx", QUOTE, None, policy=Policy(debug=True), now=T_GOTDX)
    assert verdict.ok
    assert "tcb_status" not in verdict.claims.get("tcb", {})
    strict = Policy(debug=True, require_collateral=True)
    assert offline.verify("tdx", QUOTE, None, policy=strict, now=T_GOTDX).failure_ids() == (
        "tdx.collateral_missing",
    )
    assert _Pcs.seen == []
    routes = _Pcs.routes
    _Pcs.routes = {k: v for k, v in routes.items() if "qe/identity" not in k}
    try:
        broken = CollateralSource(PcsOptions(pcs_base=pcs, certs_base=pcs))
        assert broken.for_quote(QUOTE) is None  # a failed fetch is "no collateral"
        count = len(_Pcs.seen)
        assert broken.for_quote(QUOTE) is None
        assert len(_Pcs.seen) == count  # and is remembered for a while
    finally:
        _Pcs.routes = routes

"""TDX through the endpoint's decision path, with a real quote and Intel collateral from a file.

Phala's v4 quote and its collateral bundle (fixtures/evidence/tdx, spec/attestation.md §4.2) verify at a
time inside the collateral window; the quote's REPORTDATA is not bound to our nonce and key, so the only
refusal left must be `tdx.report_data_mismatch` — which shows the chain, collateral, TCB status and MRTD
checks all ran and passed inside the endpoint.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cwbuild.attest.api import AttestRequest, Registration, Service
from cwbuild.attest.audit import Audit
from cwbuild.attest.certsource import CertOptions, CertSource
from cwbuild.attest.evidence_gate import EvidenceGate
from cwbuild.attest.metrics import Metrics
from cwbuild.attest.pcs_source import CollateralSource, PcsOptions
from cwbuild.attest.server_run import ServeConfig, load_collateral, load_config
from cwbuild.attest.store import open_store
from cwbuild.attest.tdx import verify_tdx
from cwbuild.errors import AttestRefused, ConfigError
from tests.conftest import FIXTURES

TDX = FIXTURES / "evidence" / "tdx"
T_PHALA = datetime(2025, 7, 1, tzinfo=UTC).timestamp()  # inside the collateral window (spec §4.2)


def service(tmp_path: Path) -> Service:
    gate = EvidenceGate(
        certs=CertSource(CertOptions(offline=True)),
        collateral=CollateralSource(
            PcsOptions(fixed=load_collateral(str(TDX / "phala_v4_quote_collateral.json")))
        ),
    )
    return Service(
        store=open_store(tmp_path / "s.db"),
        master_key=os.urandom(32),
        audit=Audit(tmp_path / "audit.log"),
        metrics=Metrics(),
        gate=gate,
        clock=lambda: T_PHALA,
    )


def attempt(svc: Service, reference: str) -> AttestRefused:
    quote = (TDX / "phala_v4_quote.bin").read_bytes()
    reg = Registration.build(
        workload_id="td", tee="tdx", reference_values=[reference], policy={}, secret=b"k"
    )
    svc.register(Registration(**{**reg.__dict__, "replace": True}), client="t")
    nonce, _ = svc.challenge("td", "tdx", client="g")
    der = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(AttestRefused) as refused:
        svc.attest(AttestRequest("td", nonce, quote, der), client="g")
    return refused.value


def test_tdx_quote_checked_end_to_end(tmp_path: Path) -> None:
    quote = (TDX / "phala_v4_quote.bin").read_bytes()
    mrtd = verify_tdx(quote, policy=None, now=datetime.fromtimestamp(T_PHALA, UTC)).claims["mrtd"]
    svc = service(tmp_path)
    refused = attempt(svc, mrtd)
    assert refused.reason == "tdx.report_data_mismatch"
    assert refused.detail == "evidence refused: tdx.report_data_mismatch"
    other = attempt(svc, "00" * 48)
    assert "tdx.measurement_mismatch" in other.detail


def test_collateral_file_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="tdx_collateral"):
        load_collateral(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="tdx_collateral"):
        load_collateral(str(tmp_path / "missing.json"))
    (tmp_path / "server.yaml").write_text("tdx_collateral: x.json\nnonce_ttl: 30\n")
    config = load_config(tmp_path / "server.yaml", {"offline": True})
    assert config == ServeConfig(tdx_collateral="x.json", nonce_ttl=30, offline=True)
    (tmp_path / "server.yaml").write_text("nonce_tll: 30\n")
    with pytest.raises(ConfigError, match="nonce_tll"):
        load_config(tmp_path / "server.yaml", {})

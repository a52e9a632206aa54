"""`cwbuild verify-evidence`: exit codes and the JSON verdict, run as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from cwbuild.attest.sim import generate_sim_key, public_key_pem, sim_report
from cwbuild.attest.trust import load_cert
from tests.conftest import FIXTURES, cwbuild

EV = FIXTURES / "evidence"
SNP_ARGS = [
    "--tee", "snp",
    "--evidence", EV / "snp" / "gosev_milan_v2_report.bin",
    "--cert", EV / "snp" / "gosev_milan_vcek.der",
    "--at", "2025-06-01T00:00:00Z",
]  # fmt: skip


def verify(*args: object) -> tuple[int, dict[str, object]]:
    proc = cwbuild(["verify-evidence", *map(str, args), "--json"])
    return proc.returncode, json.loads(proc.stdout)


def test_snp_ok_and_policy(tmp_path: Path) -> None:
    code, doc = verify(*SNP_ARGS)
    assert code == 0
    assert doc["ok"] is True
    assert doc["claims"]["measurement"].startswith("b07af962")
    policy = tmp_path / "policy.yaml"
    policy.write_text("debug: false\n")
    code, doc = verify(*SNP_ARGS, "--policy", policy)
    assert code == 1
    assert [f["id"] for f in doc["failures"]] == ["snp.policy_debug"]


def test_snp_pem_bundle_with_ask_ark(tmp_path: Path) -> None:
    """--cert accepts PEM; a bundle carrying ASK and ARK must still chain to the pinned root."""
    vcek = load_cert((EV / "snp" / "gosev_milan_vcek.der").read_bytes())
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        vcek.public_bytes(Encoding.PEM) + (EV / "roots" / "amd_milan_vcek_ask_ark.pem").read_bytes()
    )
    args = [a if a != EV / "snp" / "gosev_milan_vcek.der" else bundle for a in SNP_ARGS]
    assert verify(*args)[0] == 0
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(
        vcek.public_bytes(Encoding.PEM) + (EV / "roots" / "amd_genoa_vcek_ask_ark.pem").read_bytes()
    )
    code, doc = verify(*[a if a != bundle else wrong for a in args])
    assert code == 1
    assert "snp.root_untrusted" in [f["id"] for f in doc["failures"]]


def test_tdx_with_collateral() -> None:
    code, doc = verify(
        "--tee", "tdx",
        "--evidence", EV / "tdx" / "phala_v4_quote.bin",
        "--collateral", EV / "tdx" / "phala_v4_quote_collateral.json",
        "--at", "2025-07-01T00:00:00+00:00",
    )  # fmt: skip
    assert code == 0
    assert doc["claims"]["tcb"]["tcb_status"] == "UpToDate"
    assert len(doc["claims"]["rtmr3"]) == 96


@pytest.mark.parametrize("tee", ["snp", "tdx"])
def test_malformed_evidence_prints_verdict(tmp_path: Path, tee: str) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 10)
    code, doc = verify("--tee", tee, "--evidence", bad)
    assert code == 1
    assert doc["ok"] is False
    assert doc["failures"][0]["id"] == f"{tee}.malformed"


def test_malformed_collateral_prints_verdict(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{")
    code, doc = verify("--tee", "tdx", "--evidence", EV / "tdx" / "phala_v4_quote.bin", "--collateral", bad)
    assert code == 1
    assert doc["failures"][0]["id"] == "tdx.collateral_malformed"


def test_sim(tmp_path: Path) -> None:
    key = generate_sim_key()
    (tmp_path / "r.bin").write_bytes(sim_report(measurement=bytes(48), report_data=bytes(64), key=key))
    (tmp_path / "k.pem").write_bytes(public_key_pem(key))
    code, doc = verify("--tee", "sim", "--evidence", tmp_path / "r.bin", "--sim-key", tmp_path / "k.pem")
    assert code == 0
    assert doc["claims"]["signer"] == "sim"


@pytest.mark.parametrize(
    "args",
    [
        ["--tee", "snp"],
        ["--tee", "sgx", "--evidence", "x"],
        [*SNP_ARGS[:-2], "--at", "2025-06-01"],
        [*SNP_ARGS, "--collateral", str(EV / "tdx" / "phala_v4_quote_collateral.json")],
        ["--tee", "snp", "--evidence", "/nonexistent/report.bin"],
    ],
)
def test_usage_errors(args: list[object]) -> None:
    proc = cwbuild(["verify-evidence", *map(str, args), "--json"])
    assert proc.returncode == 2, proc.stderr


def test_bad_policy_is_usage_error(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("debugg: true\n")
    proc = cwbuild(["verify-evidence", *map(str, SNP_ARGS), "--policy", str(policy)])
    assert proc.returncode == 2
    assert b"debugg" in proc.stderr


def test_human_output() -> None:
    proc = cwbuild(["verify-evidence", *map(str, SNP_ARGS)])
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"OK: SEV-SNP report, Milan, signer vcek")

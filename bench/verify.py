"""Evidence verification throughput on one core, next to `openssl speed ecdsap384 ecdsap256`.

    .venv/bin/python bench/verify.py [--seconds 3] [--cpu 0]

Measures full offline verifications of real fixtures (spec/attestation.md §4): an SEV-SNP report with its
VCEK (chain to the pinned ARK + report signature + binding + a policy), and a TDX quote (quote signature,
QE report signature, QE binding, PCK chain) with and without its offline collateral. "warm" reuses one
TrustStore, so certificate signatures already checked come from its cache (what the endpoint does);
"cold" builds a fresh TrustStore per verification (every RSA-PSS / ECDSA chain signature recomputed).
The process and openssl are pinned to one CPU. Not run by pytest.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cwbuild.attest.policy import Policy  # noqa: E402
from cwbuild.attest.snp import verify_snp  # noqa: E402
from cwbuild.attest.tdx import Collateral, verify_tdx  # noqa: E402
from cwbuild.attest.trust import TrustStore, _default_store  # noqa: E402

EV = REPO.parent / "shared" / "fixtures" / "evidence"


def rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm up (imports, first parse)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def fresh_store() -> TrustStore:
    """A new TrustStore with an empty signature cache (the parsed roots are shared)."""
    base = _default_store()
    return TrustStore(amd=base.amd, intel_root=base.intel_root)


def openssl_speed(seconds: int) -> dict[str, float]:
    """verify/s of openssl's ecdsap384 and ecdsap256 on this core."""
    out = subprocess.run(
        ["openssl", "speed", "-seconds", str(seconds), "ecdsap384", "ecdsap256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rates = {}
    for line in out.splitlines():
        m = re.match(r"\s*\d+\s+bits? ecdsa \((nistp\d+)\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            rates[f"{m.group(1)} sign/s"] = float(m.group(2))
            rates[f"{m.group(1)} verify/s"] = float(m.group(3))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--cpu", type=int, default=0)
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})

    report = (EV / "snp" / "ms_genoa_v3_report.bin").read_bytes()
    vcek = (EV / "snp" / "ms_genoa_vcek.pem").read_bytes()
    t_snp = datetime(2026, 6, 1, tzinfo=UTC)
    quote = (EV / "tdx" / "phala_v4_quote.bin").read_bytes()
    collateral_json = (EV / "tdx" / "phala_v4_quote_collateral.json").read_bytes()
    t_tdx = datetime(2025, 7, 1, tzinfo=UTC)
    warm, policy = TrustStore.default(), Policy()

    def snp(store: Callable[[], TrustStore]) -> Callable[[], object]:
        def run() -> None:
            v = verify_snp(report, certs=[vcek], trust=store(), policy=policy, now=t_snp)
            assert v.ok, v.failures

        return run

    def tdx(store: Callable[[], TrustStore], with_collateral: bool) -> Callable[[], object]:
        def run() -> None:
            col = Collateral.from_json(collateral_json) if with_collateral else None
            v = verify_tdx(quote, trust=store(), collateral=col, policy=policy, now=t_tdx)
            assert v.ok, v.failures

        return run

    cases = {
        "SNP report (Genoa VCEK), warm cache": snp(lambda: warm),
        "SNP report (Genoa VCEK), cold": snp(fresh_store),
        "TDX quote v4, warm cache": tdx(lambda: warm, False),
        "TDX quote v4, cold": tdx(fresh_store, False),
        "TDX quote v4 + collateral, warm cache": tdx(lambda: warm, True),
        "TDX quote v4 + collateral, cold": tdx(fresh_store, True),
    }
    print(f"one core (cpu {args.cpu}), {args.seconds:g} s per case, {os.cpu_count()} CPUs in the machine")
    for name, fn in cases.items():
        r = rate(fn, args.seconds)
        print(f"  {name:<40} {r:9.0f} verifications/s  ({1e3 / r:.3f} ms each)")
    for name, value in openssl_speed(max(1, round(args.seconds))).items():
        print(f"  openssl speed {name:<26} {value:9.0f}")


if __name__ == "__main__":
    main()

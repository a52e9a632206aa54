"""Every single flipped byte of a real SNP report and a real TDX quote makes verification fail (issue 4).

The walks cover the signed region, the signature (including the must-be-zero upper bytes of SNP R and S and
the reserved tail), and for TDX the QE report, its signature, the QE auth data and the certification data
with the PCK chain. Bytes after a quote's declared signature data are not part of the quote (spec §3.3) and
are shown to be ignored. The trust store and its signature cache are shared across the walk.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cwbuild.attest.snp import verify_snp
from cwbuild.attest.tdx import TdxQuote, verify_tdx
from cwbuild.attest.trust import TrustStore
from tests.conftest import FIXTURES

EV = FIXTURES / "evidence"


@pytest.mark.slow
def test_every_snp_byte() -> None:
    report = (EV / "snp" / "gosev_milan_v2_report.bin").read_bytes()
    certs = [(EV / "snp" / "gosev_milan_vcek.der").read_bytes()]
    trust, now = TrustStore.default(), datetime(2025, 6, 1, tzinfo=UTC)
    assert verify_snp(report, certs=certs, trust=trust, policy=None, now=now).ok
    survivors = []
    for i in range(len(report)):
        for mask in (0x01, 0x80):
            flipped = bytearray(report)
            flipped[i] ^= mask
            if verify_snp(bytes(flipped), certs=certs, trust=trust, policy=None, now=now).ok:
                survivors.append((hex(i), mask))
    assert survivors == []


@pytest.mark.slow
def test_every_tdx_byte() -> None:
    quote = (EV / "tdx" / "phala_v4_quote.bin").read_bytes()
    trust, now = TrustStore.default(), datetime(2025, 7, 1, tzinfo=UTC)
    assert verify_tdx(quote, trust=trust, policy=None, now=now).ok
    end = len(quote) - TdxQuote.parse(quote).trailing
    survivors = []
    for i in range(end):
        flipped = bytearray(quote)
        flipped[i] ^= 0x01
        if verify_tdx(bytes(flipped), trust=trust, policy=None, now=now).ok:
            survivors.append(i)
    assert survivors == []
    for i in range(end, len(quote)):  # not part of the quote: ignored
        flipped = bytearray(quote)
        flipped[i] ^= 0x01
        assert verify_tdx(bytes(flipped), trust=trust, policy=None, now=now).ok

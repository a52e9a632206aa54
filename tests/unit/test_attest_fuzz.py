"""Fuzzing the evidence parsers (issue 4): only FormatError escapes; no allocation follows a claimed length.

Each parser gets 10,000 hypothesis cases per run: real reports and quotes with random flips, truncations,
extensions and overwritten length fields, plus random bytes. Cases only parse (no signature checks), so the
whole module runs in seconds.
"""

from __future__ import annotations

import contextlib
import random
import struct
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cwbuild.attest import der
from cwbuild.attest.collateral import Collateral
from cwbuild.attest.snp_report import REPORT_LEN, SnpReport
from cwbuild.attest.tcb import Product
from cwbuild.attest.tdx_quote import TdxQuote
from cwbuild.errors import FormatError
from tests.conftest import FIXTURES

EV = FIXTURES / "evidence"
SNP_REPORTS = [p.read_bytes() for p in sorted((EV / "snp").glob("*_report.bin"))]
TDX_QUOTES = [(EV / "tdx" / n).read_bytes() for n in ("gotdx_v4_quote_spr_e4.dat", "phala_v4_quote.bin")]
FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Offsets of the length fields of a v4 quote (spec §3.3), relative to the signature data at 636.
_SIG_DATA = 636
_LENGTH_FIELDS = [(632, "<I"), (_SIG_DATA + 130, "<I"), (_SIG_DATA + 134 + 384 + 64, "<H")]


def mutate(seed: int, seeds: list[bytes], fields: list[tuple[int, str]]) -> bytes:
    """A case derived from one hypothesis-drawn integer (cheap to generate): random bytes (1 in 8), or a real
    sample with up to 6 flipped bytes, maybe one length field overwritten, maybe truncated, maybe extended."""
    rng = random.Random(seed)
    if rng.random() < 0.125:
        return rng.randbytes(rng.randrange(2048))
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(7)):
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    if fields and rng.random() < 0.5:
        offset, fmt = rng.choice(fields)
        top = (1 << (8 * struct.calcsize(fmt))) - 1
        struct.pack_into(fmt, data, offset, rng.choice((rng.randrange(top + 1), rng.randrange(8192), top)))
    if rng.random() < 0.3:
        del data[rng.randrange(len(data) + 1) :]
    return bytes(data) + rng.randbytes(rng.choice((0, 0, rng.randrange(64))))


def _only_format_errors(parse: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse(data)


def _parse_snp(data: bytes) -> None:
    report = SnpReport.parse(data)
    report.policy_flags()
    for product in Product:
        report.tcbs(product)


_SNP_FIELDS = [(0, "<I"), (0x34, "<I"), (0x48, "<I"), (8, "<Q")]  # version, algo, signer info, policy


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_fuzz_snp_parser(seed: int) -> None:
    _only_format_errors(_parse_snp, mutate(seed, SNP_REPORTS, _SNP_FIELDS))


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_fuzz_tdx_parser(seed: int) -> None:
    _only_format_errors(TdxQuote.parse, mutate(seed, TDX_QUOTES, _LENGTH_FIELDS))


@settings(max_examples=2_000, deadline=None, database=None, derandomize=True)
@given(st.binary(max_size=64))
def test_fuzz_der_reader(data: bytes) -> None:
    for parse in (der.integer, der.oid, der.children):
        _only_format_errors(parse, data)


@settings(max_examples=1_000, deadline=None, database=None, derandomize=True)
@given(st.binary(max_size=256))
def test_fuzz_collateral_json(data: bytes) -> None:
    _only_format_errors(Collateral.from_json, data)
    _only_format_errors(
        lambda d: Collateral.from_pcs(tcb_info_response=d, qe_identity_response=d, issuer_chain=b""), data
    )


def _peak_bytes(parse: Callable[[bytes], object], data: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            parse(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("offset", "fmt", "value"), [(o, f, (1 << (8 * struct.calcsize(f))) - 1) for o, f in _LENGTH_FIELDS]
)
def test_claimed_lengths_do_not_allocate(offset: int, fmt: str, value: int) -> None:
    data = bytearray(TDX_QUOTES[1])
    struct.pack_into(fmt, data, offset, value)
    assert _peak_bytes(TdxQuote.parse, bytes(data)) < 4 * len(data) + 65536


def test_v5_claimed_body_size() -> None:
    data = bytearray(TDX_QUOTES[1])
    struct.pack_into("<H", data, 0, 5)
    data[48:48] = struct.pack("<HI", 3, 0xFFFFFFFF)
    assert _peak_bytes(TdxQuote.parse, bytes(data)) < 4 * len(data) + 65536


def test_der_claimed_length() -> None:
    assert _peak_bytes(der.read_tlv, b"\x04\x84\xff\xff\xff\xff" + bytes(10)) < 65536


def test_snp_length_bound() -> None:
    assert _peak_bytes(SnpReport.parse, bytes(REPORT_LEN * 2)) < 8 * REPORT_LEN + 65536

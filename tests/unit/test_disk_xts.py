"""AES-XTS sectors: a published vector, the OpenSSL-EVP path against `cryptography`, dm-crypt IV rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from cwbuild.disk import xts
from cwbuild.disk.xts import SectorCrypt, Span, XtsParams, crypt_span
from cwbuild.errors import DiskError


def test_system_libcrypto_backend_is_in_use() -> None:
    """The fast path must be what runs here (Debian 12 ships libcrypto 3): a silent fallback would hide it."""
    assert xts.backend_name() == "openssl-evp"


def _reference(
    key: bytes, data: bytes, sector_size: int, first_iv: int, step: int, *, encrypt: bool
) -> bytes:
    """One `cryptography` XTS context per sector, IV = LE128 sector number: the independent oracle."""
    out = bytearray()
    for i in range(len(data) // sector_size):
        c = Cipher(algorithms.AES(key), modes.XTS((first_iv + i * step).to_bytes(16, "little")))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out += ctx.update(data[i * sector_size : (i + 1) * sector_size]) + ctx.finalize()
    return bytes(out)


@pytest.mark.parametrize("backend", ["openssl-evp", "cryptography"])
def test_ieee_1619_vector_4(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # IEEE Std 1619-2007 Annex B, XTS-AES-128 vector 4: data unit 0, plaintext 00 01 .. ff 00 01 .. ff.
    key = bytes.fromhex("2718281828459045235360287471352631415926535897932384626433832795")
    expected_head = bytes.fromhex("27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c")
    if backend == "cryptography":
        monkeypatch.setenv("CWBUILD_XTS_BACKEND", "cryptography")
    else:
        assert xts.backend_name() == "openssl-evp"
    xts._libcrypto.cache_clear()
    try:
        buf = bytearray(bytes(range(256)) * 2)
        with SectorCrypt(XtsParams(key, 512), encrypt=True) as c:
            assert (c._ctx is not None) == (backend == "openssl-evp")
            c.run(buf, 0)
    finally:
        monkeypatch.delenv("CWBUILD_XTS_BACKEND", raising=False)
        xts._libcrypto.cache_clear()
    assert bytes(buf[:32]) == expected_head


def test_evp_refuses_equal_key_halves() -> None:
    with pytest.raises(DiskError, match="both halves"):
        SectorCrypt(XtsParams(bytes(64), 512), encrypt=True)


@settings(max_examples=60, deadline=None)
@given(
    key=st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
    sector_size=st.sampled_from([512, 1024, 2048, 4096]),
    sectors=st.integers(0, 9),
    first_iv=st.integers(0, (1 << 64) - 100_000),
    large=st.booleans(),
    encrypt=st.booleans(),
)
def test_evp_matches_cryptography(
    key: bytes, sector_size: int, sectors: int, first_iv: int, large: bool, encrypt: bool
) -> None:
    data = os.urandom(sector_size * sectors)
    params = XtsParams(key, sector_size, iv_large_sectors=large)
    buf = bytearray(data)
    with SectorCrypt(params, encrypt=encrypt) as c:
        c.run(buf, first_iv)
    assert bytes(buf) == _reference(key, data, sector_size, first_iv, params.iv_step, encrypt=encrypt)


def test_dm_crypt_iv_units() -> None:
    assert XtsParams(os.urandom(64), 4096).iv_step == 8  # 512-byte units, as cryptsetup maps LUKS2
    assert XtsParams(os.urandom(64), 4096, iv_large_sectors=True).iv_step == 1
    assert XtsParams(os.urandom(64), 512).iv_step == 1


def test_plain_iv_truncates_to_32_bits() -> None:
    key = os.urandom(64)
    data = os.urandom(1024)
    a, b = bytearray(data), bytearray(data)
    with SectorCrypt(XtsParams(key, 512, plain64=False), encrypt=True) as c:
        c.run(a, (1 << 32) + 5)
    with SectorCrypt(XtsParams(key, 512), encrypt=True) as c:
        c.run(b, 5)
    assert a == b


def test_bad_parameters() -> None:
    with pytest.raises(DiskError):
        XtsParams(b"short", 512)
    with pytest.raises(DiskError):
        XtsParams(os.urandom(64), 520)
    with SectorCrypt(XtsParams(os.urandom(64), 512), encrypt=True) as c, pytest.raises(DiskError):
        c.run(bytearray(100), 0)
    with SectorCrypt(XtsParams(os.urandom(64), 512), encrypt=True) as c, pytest.raises(DiskError):
        c.run(bytearray(512), (1 << 64))


@pytest.mark.parametrize("workers", [1, 2])
def test_crypt_span_streams_and_pads(workers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xts, "CHUNK", 64 * 1024)  # many chunks, so the pool really splits work
    key = os.urandom(64)
    data = os.urandom(300_000)  # not a multiple of the sector size: the last sector is zero-padded
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"H" * 100 + data)
    dst.write_bytes(bytes(1000 + 303_104))
    params = XtsParams(key, 4096)
    seen: list[int] = []
    crypt_span(
        Span(str(src), str(dst), 100, 1000, len(data), first_iv=16),
        params=params,
        encrypt=True,
        workers=workers,
        progress=seen.append,
    )
    assert sum(seen) == len(data)
    out = dst.read_bytes()
    assert out[:1000] == bytes(1000)
    padded = data + bytes(-len(data) % 4096)
    assert out[1000:] == _reference(key, padded, 4096, 16, 8, encrypt=True)


def test_crypt_span_short_input(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(bytes(1000))
    (tmp_path / "dst").write_bytes(b"")
    with pytest.raises(DiskError, match="ended early"):
        crypt_span(
            Span(str(tmp_path / "src"), str(tmp_path / "dst"), 0, 0, 4096),
            params=XtsParams(os.urandom(64), 512),
            encrypt=True,
            workers=1,
        )


@pytest.mark.parametrize("workers", [1, 2])
def test_crypt_span_unopenable_files(workers: int, tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(bytes(8192))
    params = XtsParams(os.urandom(64), 512)
    with pytest.raises(DiskError, match="cannot open"):
        crypt_span(
            Span(str(tmp_path), str(tmp_path / "dst"), 0, 0, 8192),
            params=params,
            encrypt=True,
            workers=workers,
        )
    with pytest.raises(DiskError, match="cannot open"):
        crypt_span(
            Span(str(tmp_path / "src"), str(tmp_path / "no/dst"), 0, 0, 8192), params=params, encrypt=True
        )

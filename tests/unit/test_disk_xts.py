"""AES-XTS sectors: IEEE 1619 vectors and a `cryptography` oracle against all three backends (the compiled
EVP loop, the Python EVP loop, `cryptography` per sector), dm-crypt IV rules, the C function's own checks."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from cwbuild.disk import xts
from cwbuild.disk.xts import SectorCrypt, Span, XtsParams, crypt_span
from cwbuild.errors import DiskError

BACKENDS = xts.BACKENDS  # compiled loop, Python loop over the same EVP calls, `cryptography` per sector


def test_compiled_backend_is_in_use() -> None:
    """The compiled loop must be what runs here (`pip install -e` built it, Debian 12 ships libcrypto 3): a
    silent fallback to a slower path would hide a broken build."""
    assert xts.backend_name() == "openssl-evp-c"
    mod = xts._compiled()
    assert mod is not None
    assert Path(mod.__file__).parent == Path(xts.__file__).parent
    assert Path(mod.__file__).suffix == ".so"


@pytest.mark.parametrize("backend", BACKENDS)
def test_environment_forces_a_backend(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CWBUILD_XTS_BACKEND", backend)
    assert xts.backend_name() == backend
    with SectorCrypt(XtsParams(os.urandom(64), 512), encrypt=True) as c:
        assert c.backend == backend
    monkeypatch.setenv("CWBUILD_XTS_BACKEND", "openssl-evp-asm")
    with pytest.raises(DiskError, match="unknown AES-XTS backend"):
        xts.backend_name()


def test_falls_back_to_the_python_loop_without_the_compiled_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cwbuild.disk._xts_c", None)  # what a failed import looks like
    xts._compiled.cache_clear()
    try:
        assert xts.backend_name() == "openssl-evp-python"
        with pytest.raises(DiskError, match="was not compiled"):
            SectorCrypt(XtsParams(os.urandom(64), 512), encrypt=True, backend="openssl-evp-c")
    finally:
        monkeypatch.undo()
        xts._compiled.cache_clear()
    assert xts.backend_name() == "openssl-evp-c"


def _reference(
    key: bytes,
    data: bytes,
    sector_size: int,
    first_iv: int,
    step: int,
    *,
    encrypt: bool,
    plain64: bool = True,
) -> bytes:
    """One `cryptography` XTS context per sector, IV = LE128 sector number (truncated to 32 bits for dm-crypt
    `plain`): the independent oracle."""
    mask = (1 << 64) - 1 if plain64 else 0xFFFFFFFF
    out = bytearray()
    for i in range(len(data) // sector_size):
        tweak = ((first_iv + i * step) & mask).to_bytes(16, "little")
        c = Cipher(algorithms.AES(key), modes.XTS(tweak))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out += ctx.update(data[i * sector_size : (i + 1) * sector_size]) + ctx.finalize()
    return bytes(out)


def _crypt(backend: str, params: XtsParams, data: bytes, first_iv: int, *, encrypt: bool) -> bytes:
    buf = bytearray(data)
    with SectorCrypt(params, encrypt=encrypt, backend=backend) as c:
        assert c.backend == backend
        c.run(buf, first_iv)
    return bytes(buf)


# IEEE Std 1619-2007 Annex B: the plaintext of vectors 4 and 10-14 is one 512-byte data unit 00 01 .. ff
# 00 .. ff. Each entry: key, data unit sequence number, first 32 and last 16 bytes of the published
# ciphertext. Vector 4 is XTS-AES-128, 10-14 XTS-AES-256.
_KEY_128 = "2718281828459045235360287471352631415926535897932384626433832795"
_KEY_256 = (
    "2718281828459045235360287471352662497757247093699959574966967627"
    "3141592653589793238462643383279502884197169399375105820974944592"
)
IEEE_1619_VECTORS = {
    4: (
        _KEY_128,
        0,
        "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c",
        "0a282df920147beabe421ee5319d0568",
    ),
    10: (
        _KEY_256,
        0xFF,
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
        "c4f36ffda9fcea70b9c6e693e148c151",
    ),
    11: (
        _KEY_256,
        0xFFFF,
        "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11",
        "a4f9e27b42af8100cb9d59cef9645803",
    ),
    12: (
        _KEY_256,
        0xFFFFFF,
        "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200",
        "2263a1eef52dd6888c309f5a7d712826",
    ),
    13: (
        _KEY_256,
        0xFFFFFFFF,
        "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5",
        "4c82f335abb152c4a93411373aaa8220",
    ),
    14: (
        _KEY_256,
        0xFFFFFFFFFF,
        "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed23",
        "d609d273ad5b0d59631c531f6a0a57b9",
    ),
}
_IEEE_PLAINTEXT = bytes(range(256)) * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vector", sorted(IEEE_1619_VECTORS))
def test_ieee_1619_vectors(vector: int, backend: str) -> None:
    key, unit, head, tail = IEEE_1619_VECTORS[vector]
    params = XtsParams(bytes.fromhex(key), 512)
    out = _crypt(backend, params, _IEEE_PLAINTEXT, unit, encrypt=True)
    assert out[:32].hex() == head
    assert out[-16:].hex() == tail
    assert _crypt(backend, params, out, unit, encrypt=False) == _IEEE_PLAINTEXT


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_iv_of_vector_14_is_vector_13(backend: str) -> None:
    """dm-crypt `plain` keeps the low 32 bits: data unit 0xff_ffffffff encrypts as unit 0xffffffff does."""
    key, unit, _, _ = IEEE_1619_VECTORS[14]
    _, _, head_13, tail_13 = IEEE_1619_VECTORS[13]
    out = _crypt(
        backend, XtsParams(bytes.fromhex(key), 512, plain64=False), _IEEE_PLAINTEXT, unit, encrypt=True
    )
    assert (out[:32].hex(), out[-16:].hex()) == (head_13, tail_13)


def test_evp_refuses_equal_key_halves() -> None:
    for backend in BACKENDS[:2]:
        with pytest.raises(DiskError, match="both halves"):
            SectorCrypt(XtsParams(bytes(64), 512), encrypt=True, backend=backend)


_SECTORS = 5
# Where the run of IVs starts, as a function of the IV step: at 0, across 2^32 (where `plain` wraps) and
# ending exactly at 2^64 (the last run `_ivs` allows).
_FIRST_IVS = {
    "zero": lambda _step: 0,
    "across-2^32": lambda step: (1 << 32) - 2 * step,
    "up-to-2^64": lambda step: (1 << 64) - _SECTORS * step,
}


@pytest.mark.parametrize("where", sorted(_FIRST_IVS))
@pytest.mark.parametrize("encrypt", [True, False], ids=["encrypt", "decrypt"])
@pytest.mark.parametrize("large", [False, True], ids=["iv512", "iv_large_sectors"])
@pytest.mark.parametrize("plain64", [True, False], ids=["plain64", "plain"])
@pytest.mark.parametrize("sector_size", [512, 1024, 2048, 4096])
def test_backends_agree(sector_size: int, plain64: bool, large: bool, encrypt: bool, where: str) -> None:
    key = os.urandom(64)
    params = XtsParams(key, sector_size, plain64=plain64, iv_large_sectors=large)
    first_iv = _FIRST_IVS[where](params.iv_step)
    data = os.urandom(_SECTORS * sector_size)
    expected = _reference(key, data, sector_size, first_iv, params.iv_step, encrypt=encrypt, plain64=plain64)
    for backend in BACKENDS:
        assert _crypt(backend, params, data, first_iv, encrypt=encrypt) == expected, backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_iv_range_ends_at_2_64(backend: str, sector_size: int) -> None:
    """first_iv + count * iv_step may reach 2^64, not pass it, on every backend (the C side checks it)."""
    params = XtsParams(os.urandom(64), sector_size)
    data = os.urandom(3 * sector_size)
    last_ok = (1 << 64) - 3 * params.iv_step
    assert len(_crypt(backend, params, data, last_ok, encrypt=True)) == len(data)
    for bad in (last_ok + 1, 1 << 64, -1):
        buf = bytearray(data)
        with (
            SectorCrypt(params, encrypt=True, backend=backend) as c,
            pytest.raises(DiskError, match="IV range"),
        ):
            c.run(buf, bad)
        assert buf == data  # refused before anything was touched


@settings(max_examples=60, deadline=None)
@given(
    key=st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
    sector_size=st.sampled_from([512, 1024, 2048, 4096]),
    sectors=st.integers(0, 9),
    first_iv=st.integers(0, (1 << 64) - 100_000),
    large=st.booleans(),
    plain64=st.booleans(),
    encrypt=st.booleans(),
)
def test_backends_match_the_oracle(
    *, key: bytes, sector_size: int, sectors: int, first_iv: int, large: bool, plain64: bool, encrypt: bool
) -> None:
    data = os.urandom(sector_size * sectors)
    params = XtsParams(key, sector_size, plain64=plain64, iv_large_sectors=large)
    expected = _reference(key, data, sector_size, first_iv, params.iv_step, encrypt=encrypt, plain64=plain64)
    for backend in BACKENDS:
        assert _crypt(backend, params, data, first_iv, encrypt=encrypt) == expected, backend


def test_dm_crypt_iv_units() -> None:
    assert XtsParams(os.urandom(64), 4096).iv_step == 8  # 512-byte units, as cryptsetup maps LUKS2
    assert XtsParams(os.urandom(64), 4096, iv_large_sectors=True).iv_step == 1
    assert XtsParams(os.urandom(64), 512).iv_step == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_iv_truncates_to_32_bits(backend: str) -> None:
    key = os.urandom(64)
    data = os.urandom(1024)
    a = _crypt(backend, XtsParams(key, 512, plain64=False), data, (1 << 32) + 5, encrypt=True)
    assert a == _crypt(backend, XtsParams(key, 512), data, 5, encrypt=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_parameters(backend: str) -> None:
    with pytest.raises(DiskError):
        XtsParams(b"short", 512)
    with pytest.raises(DiskError):
        XtsParams(os.urandom(64), 520)
    with SectorCrypt(XtsParams(os.urandom(64), 512), encrypt=True, backend=backend) as c:
        with pytest.raises(DiskError, match="whole number"):
            c.run(bytearray(100), 0)
        with pytest.raises(DiskError):
            c.run(bytearray(512), (1 << 64))
    with pytest.raises(DiskError, match="after close"):
        c.run(bytearray(512), 0)


def test_compiled_loop_checks_its_arguments() -> None:
    """The C function validates everything itself (sector size, whole sectors, IV step, IV range, NULLs) and
    returns a code that Python turns into DiskError text; the buffer is untouched when it refuses."""
    mod = xts._compiled()
    assert mod is not None
    lib, ffi = mod.lib, mod.ffi
    with SectorCrypt(XtsParams(os.urandom(64), 4096), encrypt=True, backend="openssl-evp-c") as c:
        init, update, ctx = c._addresses
        data = os.urandom(8192)

        def call(
            size: int = 8192, ss: int = 4096, first_iv: int = 0, step: int = 8, fns: tuple[int, ...] = ()
        ) -> tuple[int, bytes]:
            buf = bytearray(data)
            rc = lib.cwb_xts_run(
                *(fns or (init, update, ctx)),
                ffi.from_buffer("unsigned char[]", buf),
                size,
                ss,
                first_iv,
                step,
                1,
            )
            return rc, bytes(buf)

        cases = {
            lib.CWB_XTS_E_NULL: [
                call(fns=(0, update, ctx)),
                call(fns=(init, 0, ctx)),
                call(fns=(init, update, 0)),
            ],
            lib.CWB_XTS_E_SECTOR_SIZE: [call(ss=520, step=1), call(ss=8192, step=16), call(ss=0, step=1)],
            lib.CWB_XTS_E_LENGTH: [call(size=4096 + 512)],
            lib.CWB_XTS_E_IV_STEP: [call(step=3), call(step=0), call(step=4)],
            lib.CWB_XTS_E_IV_RANGE: [call(first_iv=(1 << 64) - 15), call(first_iv=(1 << 64) - 1)],
        }
        for code, results in cases.items():
            for rc, out in results:
                assert rc == code
                assert out == data
            assert "unknown code" not in xts.c_error_message(lib, code)
        rc, out = call(first_iv=(1 << 64) - 16)  # 2 sectors, step 8: reaches 2^64 exactly
        assert rc == lib.CWB_XTS_OK
        assert out == _reference(c._p.key, data, 4096, (1 << 64) - 16, 8, encrypt=True)
        rc, out = call(size=0, first_iv=(1 << 64) - 1)  # nothing to do is fine anywhere
        assert (rc, out) == (lib.CWB_XTS_OK, data)
    assert xts.c_error_message(lib, lib.CWB_XTS_E_IV_RANGE) == "sector number out of the 64-bit IV range"
    assert "unknown code 99" in xts.c_error_message(lib, 99)


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


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("direct", [True, False])
def test_crypt_span_direct_or_buffered_and_its_digest(
    workers: int, direct: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_DIRECT (page-aligned payload, the unaligned last sectors buffered) or buffered writes: the same
    bytes, and `digest` sees exactly the bytes written, in file order. tmp_path is on a disk file system
    here (ext4), where O_DIRECT is really taken."""
    monkeypatch.setattr(xts, "CHUNK", 64 * 1024)
    key = os.urandom(64)
    data = os.urandom(300_100)  # 587 sectors of 512 (last one padded): ends 1536 bytes past a 4096 boundary
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"H" * 7 + data)
    head, padded = b"header" + bytes(8186), data + bytes(-len(data) % 512)
    dst.write_bytes(head + bytes(len(padded)) + b"tail")
    sha = hashlib.sha256(head)
    crypt_span(
        Span(str(src), str(dst), 7, len(head), len(data), first_iv=3),
        params=XtsParams(key, 512),
        encrypt=True,
        workers=workers,
        digest=sha,
        direct=direct,
    )
    sha.update(b"tail")
    out = dst.read_bytes()
    assert out == head + _reference(key, padded, 512, 3, 1, encrypt=True) + b"tail"
    assert sha.hexdigest() == hashlib.sha256(out).hexdigest()


def test_crypt_span_direct_refused_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses an O_DIRECT write (EINVAL: here an offset that is not a multiple of the
    device's logical block size) gets the chunk, and the rest, buffered."""
    monkeypatch.setattr(xts, "CHUNK", 64 * 1024)
    monkeypatch.setattr(xts, "DIRECT_ALIGN", 8)
    key, data = os.urandom(64), os.urandom(200 * 1024)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    dst.write_bytes(bytes(8 + len(data)))
    for workers in (1, 2):
        crypt_span(
            Span(str(src), str(dst), 0, 8, len(data)),
            params=XtsParams(key, 4096),
            encrypt=True,
            workers=workers,
        )
        assert dst.read_bytes() == bytes(8) + _reference(key, data, 4096, 0, 8, encrypt=True)


def _children() -> set[int]:
    """This process's child processes (proc(5): /proc/PID/task/TID/children)."""
    return {int(p) for t in Path("/proc/self/task").iterdir() for p in (t / "children").read_text().split()}


@pytest.mark.parametrize("workers", [1, 2])
def test_crypt_span_short_input(workers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's DiskError reaches the caller with its text; no worker is left behind."""
    monkeypatch.setattr(xts, "CHUNK", 4096)
    (tmp_path / "src").write_bytes(bytes(10_000))
    (tmp_path / "dst").write_bytes(b"")
    before = _children()
    with pytest.raises(DiskError, match="ended early at byte 10000"):
        crypt_span(
            Span(str(tmp_path / "src"), str(tmp_path / "dst"), 0, 0, 40_960),
            params=XtsParams(os.urandom(64), 512),
            encrypt=True,
            workers=workers,
        )
    assert _children() == before


def test_crypt_span_worker_death(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies (killed, out of memory) is a DiskError, and the other one is stopped and reaped."""
    monkeypatch.setattr(xts, "CHUNK", 4096)

    def job(_self: object, pos: int, _slot: int) -> int:
        if pos >= 16384:
            os._exit(9)
        return 4096

    monkeypatch.setattr(xts._Worker, "job", job)
    (tmp_path / "src").write_bytes(bytes(65536))
    (tmp_path / "dst").write_bytes(b"")
    before = _children()
    with pytest.raises(DiskError, match="worker process died"):
        crypt_span(
            Span(str(tmp_path / "src"), str(tmp_path / "dst"), 0, 0, 65536),
            params=XtsParams(os.urandom(64), 512),
            encrypt=True,
            workers=2,
        )
    assert _children() == before


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, DiskError])
def test_crypt_span_interrupted(
    stop: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever stops this process mid-way (Ctrl-C, exit, an error of its own), its workers go too."""
    monkeypatch.setattr(xts, "CHUNK", 4096)
    (tmp_path / "src").write_bytes(bytes(1 << 20))
    (tmp_path / "dst").write_bytes(b"")
    before = _children()

    def progress(n: int) -> None:
        assert _children() - before  # the workers exist while it runs
        raise stop("stop")

    with pytest.raises(stop):
        crypt_span(
            Span(str(tmp_path / "src"), str(tmp_path / "dst"), 0, 0, 1 << 20),
            params=XtsParams(os.urandom(64), 512),
            encrypt=True,
            workers=2,
            progress=progress,
        )
    assert _children() == before


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

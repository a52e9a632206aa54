"""TDX known answers: MRTD of the Debian TDVF, the Debian kernel's Authenticode digest, RTMR1 and RTMR2.

Provenance (tests/golden/README.md, "Launch measurements"):
- MRTD single-pass: td-shim's td_shim_tee_info_hash.py (confidential-containers/td-shim@125eeab), run outside
  the repository on the Debian ovmf-inteltdx 2026.08+ds-2 OVMF.inteltdx.ms.fd.
- Authenticode: the SHA-256 Authenticode digest Debian signed into the kernel's own signature (the signer's
  independent computation); cwbuild's range plan must reproduce it, and SHA-384 runs over the same ranges.
"""

from __future__ import annotations

import glob
import hashlib
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cwbuild.errors import UsageError
from cwbuild.measure import authenticode, tdx
from cwbuild.measure.api import Blob, MeasureSpec, Target, TdxOptions, Tee, measure
from cwbuild.measure.digest import Wants, digest_file
from cwbuild.measure.firmware import Firmware
from tests.conftest import ASSETS, FIXTURES

TDVF = FIXTURES / "firmware" / "OVMF.inteltdx.ms.fd"
MRTD_SINGLE = (
    "a7a1f751abc454f9cbab198ca8d2edb2821935df525c74182b5e776cb0929e8c59aefecce725b0d08a5e9d3d3183bd08"
)
# cwbuild's own value (no independent two-pass implementation was runnable here; regression only)
MRTD_TWO_PASS = (
    "b90b236113eb4c0d4df4ef590568c14e6028a3a31d7e8ac63dee9845df5008d3ebf82d4f5974e933798f65d7a279b9a9"
)
SHA256_OID_DIGESTINFO = bytes.fromhex("0609608648016503040201") + b"\x05\x00\x04\x20"


@pytest.fixture(scope="module")
def kernel() -> Path:
    found = sorted(glob.glob(str(ASSETS / "kernel" / "boot" / "vmlinuz-*")))
    assert found, f"no Debian kernel under {ASSETS}/kernel: run scripts/setup.sh"
    return Path(found[-1])


def _mrtd(order: tdx.PageOrder) -> str:
    fw = Firmware.parse(TDVF.read_bytes())
    return tdx.mrtd(fw.data, fw.tdvf_sections(), order).hex()


def test_mrtd_single_pass_matches_td_shim() -> None:
    assert _mrtd(tdx.PageOrder.SINGLE) == MRTD_SINGLE


def test_mrtd_two_pass_differs_and_is_stable() -> None:
    assert _mrtd(tdx.PageOrder.TWO_PASS) == MRTD_TWO_PASS != MRTD_SINGLE


def _signed_sha256(data: bytes) -> bytes:
    """The Authenticode SHA-256 inside the image's own signature (PE/COFF spec §4.7 WIN_CERTIFICATE)."""
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    opt = pe + 24
    assert struct.unpack_from("<H", data, opt)[0] == 0x20B  # PE32+
    cert_off, cert_size = struct.unpack_from("<II", data, opt + 112 + 4 * 8)
    der = data[cert_off + 8 : cert_off + cert_size]
    i = der.find(SHA256_OID_DIGESTINFO)
    assert i > 0, "no SHA-256 SpcIndirectDataContent digest in the signature"
    return der[i + len(SHA256_OID_DIGESTINFO) : i + len(SHA256_OID_DIGESTINFO) + 32]


def _plan_digest(data: bytes, algo: str) -> bytes:
    h = hashlib.new(algo)
    for a, b in authenticode.plan(data[:65536], len(data)).ranges:
        h.update(data[a:b])
    return h.digest()


def test_authenticode_plan_matches_debian_signature(kernel: Path) -> None:
    data = kernel.read_bytes()
    assert _plan_digest(data, "sha256") == _signed_sha256(data)


def test_streamed_authenticode_sha384_equals_in_memory(kernel: Path) -> None:
    data = kernel.read_bytes()
    streamed = digest_file(kernel, Wants(sha384=True, authenticode=True))
    assert streamed.authenticode_sha384 == _plan_digest(data, "sha384")
    assert streamed.sha256 == hashlib.sha256(data).digest()
    assert streamed.sha384 == hashlib.sha384(data).digest()


@pytest.mark.integration
def test_authenticode_plan_matches_osslsigncode(kernel: Path) -> None:
    assert shutil.which("osslsigncode"), "osslsigncode missing: scripts/setup.sh installs it"
    out = subprocess.run(
        ["osslsigncode", "verify", "-in", str(kernel)], capture_output=True, check=False
    ).stdout
    m = re.search(rb"Calculated message digest\s*:\s*([0-9A-F]{64})", out)
    assert m is not None, out
    assert _plan_digest(kernel.read_bytes(), "sha256").hex() == m.group(1).decode().lower()


def test_separator_digest_is_the_published_one() -> None:
    digest = hashlib.sha384(tdx.SEPARATOR).hexdigest()
    assert digest.startswith("394341b7")
    assert digest.endswith("9f1289f0")


def test_rtmrs_from_the_debian_kernel(kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 100)
    spec = MeasureSpec(
        targets=(Target(Tee.TDX, TDVF),),
        kernel=Blob(path=kernel),
        initrd=Blob(path=initrd),
        cmdline="console=hvc0 ünï",
    )
    r = measure(spec).get(Tee.TDX)
    auth = _plan_digest(kernel.read_bytes(), "sha384")
    events1 = [auth] + [
        hashlib.sha384(e).digest()
        for e in (
            b"Calling EFI Application from Boot Option",
            b"\0\0\0\0",
            b"Exit Boot Services Invocation",
            b"Exit Boot Services Returned with Success",
        )
    ]
    events2 = [
        hashlib.sha384("initrd=initrd console=hvc0 ünï".encode("utf-16-le") + b"\0\0").digest(),
        hashlib.sha384(initrd.read_bytes()).digest(),
    ]
    assert r.values == {
        "mrtd": MRTD_SINGLE,
        "rtmr0": None,
        "rtmr1": _replay(events1),
        "rtmr2": _replay(events2),
    }


def _replay(digests: list[bytes]) -> str:
    reg = bytes(48)
    for d in digests:
        reg = hashlib.sha384(reg + d).digest()
    return reg.hex()


def test_initrd_placement_suffix_changes_rtmr2_only(kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"x" * 5000)
    base = MeasureSpec(targets=(Target(Tee.TDX, TDVF),), kernel=Blob(path=kernel), initrd=Blob(path=initrd))
    prefix = measure(base).get(Tee.TDX).values
    suffix_spec = MeasureSpec(
        targets=base.targets,
        kernel=base.kernel,
        initrd=base.initrd,
        tdx=TdxOptions(initrd_placement=tdx.InitrdPlacement.SUFFIX),
    )
    suffix = measure(suffix_spec).get(Tee.TDX).values
    assert prefix["rtmr1"] == suffix["rtmr1"]
    assert prefix["rtmr2"] != suffix["rtmr2"]
    assert tdx.load_options("a b", True, tdx.InitrdPlacement.SUFFIX) == "a b initrd=initrd"
    assert tdx.load_options("a b", True, tdx.InitrdPlacement.PREFIX) == "initrd=initrd a b"
    assert tdx.load_options("a b", False, tdx.InitrdPlacement.PREFIX) == "a b"


def test_kernel_patch_follows_qemu(kernel: Path) -> None:
    """QEMU <= 10.1 x86_load_linux edits (spec §3.5), checked field by field on the Debian kernel."""
    head = bytearray(kernel.read_bytes()[:4096])
    protocol = struct.unpack_from("<H", head, 0x206)[0]
    assert protocol >= 0x20C
    assert head[0x211] & 1
    initrd_max = struct.unpack_from("<I", head, 0x22C)[0]
    xload = struct.unpack_from("<H", head, 0x236)[0]
    tdx.patch_kernel_header(head, initrd_size=5000, memory=2048 << 20)
    assert head[0x210] == 0xB0
    assert head[0x211] & 0x80
    assert struct.unpack_from("<III", head, 0x224) == (0x20000 - 0x10000 - 0x200, 0x20000, initrd_max)
    limit = 0xFFFFFFFF if xload & 0x40 else initrd_max
    limit = min(limit, (2048 << 20) - 0x28000 - 1)
    assert struct.unpack_from("<II", head, 0x218) == ((limit - 5000) & ~0xFFF, 5000)


def test_kernel_patch_changes_rtmr1_but_not_the_sev_hash(kernel: Path) -> None:
    def patch(head: bytearray) -> None:
        tdx.patch_kernel_header(head, initrd_size=None, memory=1 << 30)

    plain = digest_file(kernel, Wants(authenticode=True))
    patched = digest_file(kernel, Wants(authenticode=True, patch=patch))
    assert plain.sha256 == patched.sha256
    assert plain.authenticode_sha384 != patched.authenticode_sha384


def test_no_kernel_means_null_rtmrs() -> None:
    r = measure(MeasureSpec(targets=(Target(Tee.TDX, TDVF),))).get(Tee.TDX)
    assert r.values == {"mrtd": MRTD_SINGLE, "rtmr0": None, "rtmr1": None, "rtmr2": None}


def test_kernel_digest_only_is_refused_for_tdx() -> None:
    spec = MeasureSpec(targets=(Target(Tee.TDX, TDVF),), kernel=Blob(sha256=bytes(32)))
    with pytest.raises(UsageError, match="kernel file"):
        measure(spec)

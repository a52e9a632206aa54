"""krun / libkrunfw-sev measurements against libkrunfw's own krunfw_measurement tool.

tests/golden/krunfw/expected.json holds the tool's output for tests/golden/krunfw/testlib.c (provenance in the
file and in tests/golden/README.md). The payloads are rebuilt here from the same description as testlib.c;
the integration test compiles testlib.c and reads the payloads out of the shared object.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cwbuild.errors import FormatError
from cwbuild.measure import krun
from cwbuild.measure.api import KrunSpecOptions, MeasureSpec, SevOptions, Target, Tee, measure

HERE = Path(__file__).parent / "krunfw"
EXPECTED = json.loads((HERE / "expected.json").read_text())
KIB64 = 65536


def _blob(size: int, marks: dict[int, int]) -> bytes:
    data = bytearray(size)
    for off, value in marks.items():
        data[off] = value
    return bytes(data)


def payload() -> krun.KrunPayload:
    """The bundles of testlib.c, without the string literal's NUL (sizes are sizeof - 1)."""
    qboot = _blob(KIB64, {0x1000: 0x11, 0x8000: 0x22, KIB64 - 16: 0xEA, KIB64 - 1: 0x5A})
    kernel = _blob(2 * KIB64, {4096: 0x01, 8191: 0x02, 65536: 0x03, 2 * KIB64 - 1: 0x04})
    initrd = _blob(KIB64, {0: 0x1F, 1: 0x8B, 2: 0x08, 12288: 0x7E, KIB64 - 1: 0x33})
    return krun.KrunPayload(
        qboot=b"QBOOT" + qboot[5:],
        kernel=b"KERNEL" + kernel[6:],
        kernel_load_addr=EXPECTED["kernel_load_addr"],
        initrd=initrd,
    )


@pytest.mark.parametrize("case", EXPECTED["cases"], ids=lambda c: f"{c['cpus']}cpu-{c['memory_mib']}M")
def test_matches_krunfw_measurement(case: dict[str, object]) -> None:
    opts = krun.KrunOptions(cpus=int(str(case["cpus"])), memory_mib=int(str(case["memory_mib"])))
    p = payload()
    assert krun.sev(p, opts, es=False).hex() == case["sev"]
    assert krun.sev(p, opts, es=True).hex() == case["sev-es"]
    assert krun.snp(p, opts).hex() == case["snp"]


def test_testlib_source_is_the_one_measured() -> None:
    assert hashlib.sha256((HERE / "testlib.c").read_bytes()).hexdigest() == EXPECTED["testlib_c_sha256"]


@pytest.mark.integration
def test_reads_payloads_from_the_compiled_library(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed (scripts/setup.sh installs gcc)"
    lib = tmp_path / "libkrunfw-test.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(HERE / "testlib.c")], check=True)
    assert krun.read_libkrunfw(lib.read_bytes()) == payload()
    case = EXPECTED["cases"][2]
    spec = MeasureSpec(
        targets=(Target(Tee.KRUN_SNP, lib), Target(Tee.KRUN_SEV_ES, lib), Target(Tee.KRUN_SEV, lib)),
        sev=SevOptions(cpus=case["cpus"]),
        krun=KrunSpecOptions(memory_mib=case["memory_mib"]),
    )
    result = measure(spec)
    for tee, key in ((Tee.KRUN_SNP, "snp"), (Tee.KRUN_SEV_ES, "sev-es"), (Tee.KRUN_SEV, "sev")):
        assert result.get(tee).values["measurement"] == case[key]
    assert result.to_json()["measurements"]["krun-snp"]["hardware_validated"] is False


def test_e820_option_both_ways() -> None:
    p = payload()
    tool = krun.KrunOptions(cpus=2, memory_mib=512)
    libkrun = krun.KrunOptions(cpus=2, memory_mib=512, e820=krun.E820Sizes.LIBKRUN)
    for fn in (krun.snp, lambda p, o: krun.sev(p, o, es=False), lambda p, o: krun.sev(p, o, es=True)):
        assert fn(p, tool) != fn(p, libkrun)
    a = krun.boot_params(tool, 7)
    b = krun.boot_params(libkrun, 7)
    # e820[1].size at 0x2d0 + 20 + 8 (Linux asm/bootparam.h): mem - 1 MiB (+ 1 in krunfw_measurement)
    assert int.from_bytes(a[0x2EC:0x2F4], "little") == (512 << 20) - 0x100000 + 1
    assert int.from_bytes(b[0x2EC:0x2F4], "little") == (512 << 20) - 0x100000


def test_vmsa_fpu_option_both_ways() -> None:
    p = payload()
    tool = krun.KrunOptions(cpus=3, memory_mib=1024)
    init2 = krun.KrunOptions(cpus=3, memory_mib=1024, fpu=krun.VmsaFpu.INIT2)
    assert krun.snp(p, tool) != krun.snp(p, init2)
    assert krun.sev(p, tool, es=True) != krun.sev(p, init2, es=True)
    assert krun.sev(p, tool, es=False) == krun.sev(p, init2, es=False)  # no VMSA in plain SEV
    page = krun.vmsa(bsp=True, sev_features=1, fpu=krun.VmsaFpu.INIT2)
    assert page[0x408:0x40C] == (0x1F80).to_bytes(4, "little")  # mxcsr
    assert page[0x410:0x412] == (0x37F).to_bytes(2, "little")  # x87_fcw
    legacy = krun.vmsa(bsp=True, sev_features=1, fpu=krun.VmsaFpu.KRUNFW)
    assert legacy[0x408:0x412] == bytes(10)


def test_every_input_changes_the_digests() -> None:
    p = payload()
    base = krun.KrunOptions(cpus=2, memory_mib=512)
    variants = [
        (krun.KrunPayload(p.qboot[:-1] + b"\1", p.kernel, p.kernel_load_addr, p.initrd), base),
        (krun.KrunPayload(p.qboot, b"\1" + p.kernel[1:], p.kernel_load_addr, p.initrd), base),
        (
            krun.KrunPayload(p.qboot, p.kernel, p.kernel_load_addr, p.initrd[:100] + b"\1" + p.initrd[101:]),
            base,
        ),
        (p, krun.KrunOptions(cpus=3, memory_mib=512)),
        (p, krun.KrunOptions(cpus=2, memory_mib=1024)),
    ]
    for vp, vo in variants:
        assert krun.snp(vp, vo) != krun.snp(p, base)
        assert krun.sev(vp, vo, es=True) != krun.sev(p, base, es=True)
    moved = krun.KrunPayload(p.qboot, p.kernel, 0x200000, p.initrd)
    assert krun.snp(moved, base) != krun.snp(p, base)  # SNP measures GPAs; SEV does not


@pytest.mark.parametrize(
    "data",
    [b"", b"\x7fELF" + bytes(60), b"MZ" + bytes(100), b"\x7fELF\x02\x01" + bytes(58)],
)
def test_malformed_library_is_a_format_error(data: bytes) -> None:
    with pytest.raises(FormatError):
        krun.read_libkrunfw(data)

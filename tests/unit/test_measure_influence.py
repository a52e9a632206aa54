"""Every input matters (STYLE.md rule 5): change one measured thing, the digest changes; change something the
spec says is not measured, it does not. Field by field, on synthetic firmware built from the spec's layouts.
"""

from __future__ import annotations

import glob
import random
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from cwbuild.measure import tdx
from cwbuild.measure.api import Blob, MeasureSpec, SevOptions, Target, TdxOptions, Tee, measure
from cwbuild.measure.vmsa import VCPU_TYPES, VmmType
from tests.conftest import ASSETS
from tests.measure_support import (
    KERNEL_HASHES,
    PAGE,
    SEC_MEM,
    SECRETS,
    SevFirmwareLayout,
    TdvfSection,
    sev_firmware,
    tdvf_firmware,
)

SEV_TEES = (Tee.SNP, Tee.SEV_ES, Tee.SEV)
SEED = bytes(range(48))  # an SNP OVMF hash: isolates the parsed firmware values from its bytes
SECTIONS = [
    (0x800000, 3 * PAGE, SEC_MEM),
    (0x803000, PAGE, SECRETS),
    (0x804000, PAGE, 3),
    (0x805000, 2 * PAGE, 4),
    (0x810000, PAGE, KERNEL_HASHES),
]


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.rng = random.Random(7)
        self.layout = SevFirmwareLayout(pages=12, sections=list(SECTIONS))
        self.firmware = sev_firmware(self.layout, random.Random(1))
        self.kernel = self.rng.randbytes(30_000)
        self.initrd = self.rng.randbytes(50_000)
        self.n = 0

    def write(self, data: bytes) -> Path:
        self.n += 1
        path = self.tmp / f"f{self.n}"
        path.write_bytes(data)
        return path

    def digests(self, *, firmware: bytes | None = None, **kw: object) -> dict[Tee, str | None]:
        fw = self.write(self.firmware if firmware is None else firmware)
        spec = MeasureSpec(
            targets=tuple(Target(t, fw) for t in SEV_TEES),
            kernel=Blob(path=self.write(kw.pop("kernel", self.kernel))),  # type: ignore[arg-type]
            initrd=Blob(path=self.write(kw.pop("initrd", self.initrd))),  # type: ignore[arg-type]
            cmdline=kw.pop("cmdline", "console=ttyS0"),  # type: ignore[arg-type]
            sev=replace(SevOptions(cpus=4), **kw),
        )
        result = measure(spec)
        return {t: result.get(t).values["measurement"] for t in SEV_TEES}


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _changed(a: dict[Tee, str | None], b: dict[Tee, str | None]) -> set[Tee]:
    return {t for t in a if a[t] != b[t]}


def test_every_firmware_page_is_measured(env: Env) -> None:
    base = env.digests()
    for page in range(env.layout.pages):
        fw = bytearray(env.firmware)
        fw[page * PAGE] ^= 1
        assert _changed(base, env.digests(firmware=bytes(fw))) == set(SEV_TEES), page


@pytest.mark.parametrize("index", range(len(SECTIONS)))
def test_each_metadata_section_gpa_is_measured_by_snp(env: Env, index: int) -> None:
    base = env.digests(ovmf_hash=SEED)
    sections = list(SECTIONS)
    gpa, size, kind = sections[index]
    sections[index] = (gpa + 0x100000, size, kind)
    fw = sev_firmware(replace(env.layout, sections=sections), random.Random(1))
    assert Tee.SNP in _changed(base, env.digests(firmware=fw, ovmf_hash=SEED))


def test_metadata_sizes_types_and_order_are_measured_by_snp(env: Env) -> None:
    base = env.digests(ovmf_hash=SEED)
    variants = [
        [(0x800000, 4 * PAGE, SEC_MEM), *SECTIONS[1:]],  # size
        [
            (0x800000, 3 * PAGE, SEC_MEM),
            (0x803000, PAGE, 3),
            (0x804000, PAGE, SECRETS),
            *SECTIONS[3:],
        ],  # types
        [SECTIONS[1], SECTIONS[0], *SECTIONS[2:]],  # order
    ]
    for sections in variants:
        fw = sev_firmware(replace(env.layout, sections=sections), random.Random(1))
        assert Tee.SNP in _changed(base, env.digests(firmware=fw, ovmf_hash=SEED)), sections


def test_reset_block_is_measured_through_ap_vmsas(env: Env) -> None:
    """With the OVMF hash as seed, only the parsed values of the firmware reach the SNP digest."""
    fw = sev_firmware(replace(env.layout, reset_eip=0x80C004), random.Random(1))
    assert Tee.SNP in _changed(env.digests(ovmf_hash=SEED), env.digests(firmware=fw, ovmf_hash=SEED))
    # one vCPU has no AP, so the reset block is not measured (spec §1.6 step 7)
    one = env.digests(ovmf_hash=SEED, cpus=1)
    assert Tee.SNP not in _changed(one, env.digests(firmware=fw, ovmf_hash=SEED, cpus=1))


def test_hashes_table_offset_is_measured_by_snp(env: Env) -> None:
    fw = sev_firmware(replace(env.layout, hash_table=(0x810D00, 0x400)), random.Random(1))
    assert Tee.SNP in _changed(env.digests(ovmf_hash=SEED), env.digests(firmware=fw, ovmf_hash=SEED))


def test_boot_inputs_are_measured(env: Env) -> None:
    base = env.digests()
    for kw in (
        {"kernel": env.kernel[:-1] + b"\0"},
        {"initrd": b"\0" + env.initrd[1:]},
        {"cmdline": "console=ttyS1"},
        {"cmdline": "console=ttyS0 "},
        {"cmdline": "cönsole=ttyS0"},
    ):
        assert _changed(base, env.digests(**kw)) == set(SEV_TEES), kw


def test_vcpu_inputs_are_measured(env: Env) -> None:
    base = env.digests()
    assert _changed(base, env.digests(cpus=5)) == {Tee.SNP, Tee.SEV_ES}
    sigs = {VCPU_TYPES[t] for t in VCPU_TYPES}
    for sig in sigs - {VCPU_TYPES["EPYC-v4"]}:
        assert _changed(base, env.digests(vcpu_type=None, vcpu_sig=sig)) == {Tee.SNP, Tee.SEV_ES}, hex(sig)
    for vmm in (VmmType.EC2, VmmType.GCE):
        assert _changed(base, env.digests(vmm=vmm)) == {Tee.SNP, Tee.SEV_ES}, vmm
    for bit in range(16):
        changed = _changed(base, env.digests(guest_features=0x1 ^ (1 << bit)))
        assert changed == {Tee.SNP}, bit  # SEV-ES VMSAs carry sev_features 0 (spec §1.4)


def test_ovmf_hash_seed_is_measured(env: Env) -> None:
    seeded = env.digests(ovmf_hash=bytes(47) + b"\1")
    assert _changed(env.digests(), seeded) == {Tee.SNP}


# --- TDX ---

TDVF_SECTIONS = [
    TdvfSection(
        data_offset=2 * PAGE, raw_size=4 * PAGE, gpa=0xFFFF_8000, mem_size=4 * PAGE, type=0, attributes=1
    ),
    TdvfSection(data_offset=0, raw_size=2 * PAGE, gpa=0xFFFF_6000, mem_size=2 * PAGE, type=1, attributes=0),
    TdvfSection(data_offset=0, raw_size=0, gpa=0x809000, mem_size=2 * PAGE, type=2, attributes=0),
    TdvfSection(data_offset=0, raw_size=0, gpa=0x800000, mem_size=3 * PAGE, type=3, attributes=0),
]


def _mrtd(tmp: Path, data: bytes, sections: list[TdvfSection] | None = None) -> str:
    fw = tmp / "tdvf.fd"
    fw.write_bytes(data or tdvf_firmware(8, sections or TDVF_SECTIONS, random.Random(3)))
    value = measure(MeasureSpec(targets=(Target(Tee.TDX, fw),))).get(Tee.TDX).values["mrtd"]
    assert value is not None
    return value


def test_mrtd_measures_every_extended_chunk_and_no_cfv_byte(tmp_path: Path) -> None:
    image = tdvf_firmware(8, TDVF_SECTIONS, random.Random(3))
    base = _mrtd(tmp_path, image)
    for chunk in range(0, 4 * PAGE, 256):  # every MR.EXTEND chunk of the BFV
        data = bytearray(image)
        data[2 * PAGE + chunk] ^= 0x80
        assert _mrtd(tmp_path, bytes(data)) != base, chunk
    for off in (0, PAGE, 2 * PAGE - 1):  # the CFV goes to RTMR0, not MRTD (spec §3.2)
        data = bytearray(image)
        data[off] ^= 0x80
        assert _mrtd(tmp_path, bytes(data)) == base, off


@pytest.mark.parametrize("field", ["gpa", "mem_size", "attributes"])
@pytest.mark.parametrize("index", range(len(TDVF_SECTIONS)))
def test_mrtd_measures_section_fields(tmp_path: Path, field: str, index: int) -> None:
    base = _mrtd(tmp_path, b"")
    s = TDVF_SECTIONS[index]
    sections = [*TDVF_SECTIONS]
    if field == "mem_size" and s.attributes & 1:  # an extended section's size is bounded by its data
        sections[index] = replace(s, raw_size=s.raw_size - PAGE, mem_size=s.mem_size - PAGE)
    else:
        change = {"gpa": s.gpa - 0x10000, "mem_size": s.mem_size + PAGE, "attributes": s.attributes ^ 2}[
            field
        ]
        sections[index] = replace(s, **{field: change})
    assert _mrtd(tmp_path, b"", sections) != base


def test_page_order_is_measured(tmp_path: Path) -> None:
    fw = tmp_path / "tdvf.fd"
    fw.write_bytes(tdvf_firmware(8, TDVF_SECTIONS, random.Random(3)))
    values = {
        order: measure(MeasureSpec(targets=(Target(Tee.TDX, fw),), tdx=TdxOptions(page_order=order)))
        .get(Tee.TDX)
        .values["mrtd"]
        for order in tdx.PageOrder
    }
    assert len(set(values.values())) == 2


def test_rtmrs_measure_kernel_sections_but_not_the_pe_checksum(tmp_path: Path) -> None:
    found = sorted(glob.glob(str(ASSETS / "kernel" / "boot" / "vmlinuz-*")))
    assert found, "run scripts/setup.sh"
    kernel = Path(found[-1]).read_bytes()
    fw = tmp_path / "tdvf.fd"
    fw.write_bytes(tdvf_firmware(8, TDVF_SECTIONS, random.Random(3)))

    def rtmrs(k: bytes, initrd: bytes = b"abc", cmdline: str = "x") -> tuple[str | None, str | None]:
        (tmp_path / "k").write_bytes(k)
        (tmp_path / "i").write_bytes(initrd)
        spec = MeasureSpec(
            targets=(Target(Tee.TDX, fw),),
            kernel=Blob(path=tmp_path / "k"),
            initrd=Blob(path=tmp_path / "i"),
            cmdline=cmdline,
        )
        v = measure(spec).get(Tee.TDX).values
        return v["rtmr1"], v["rtmr2"]

    base = rtmrs(kernel)
    pe = struct.unpack_from("<I", kernel, 0x3C)[0]
    checksum = pe + 24 + 64
    flipped = bytearray(kernel)
    flipped[checksum] ^= 1
    assert rtmrs(bytes(flipped)) == base  # Authenticode skips the checksum (spec §3.5)
    flipped = bytearray(kernel)
    flipped[len(kernel) // 2] ^= 1
    assert rtmrs(bytes(flipped))[0] != base[0]
    assert rtmrs(kernel, initrd=b"abd")[1] != base[1]
    assert rtmrs(kernel, cmdline="y")[1] != base[1]
    assert rtmrs(kernel, cmdline="y")[0] == base[0]  # the cmdline goes to RTMR2 only (pitfall §5.10)

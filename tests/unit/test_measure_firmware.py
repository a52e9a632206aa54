"""Firmware, PE and layout parsing: malformed input raises FormatError naming what is wrong."""

from __future__ import annotations

import random
import struct
import uuid
from pathlib import Path

import pytest

from cwbuild.errors import FormatError, MeasurementError
from cwbuild.measure import authenticode
from cwbuild.measure.api import Blob, MeasureSpec, SevOptions, Target, Tee, measure
from cwbuild.measure.firmware import Firmware, SevSectionType
from cwbuild.measure.layout import build
from cwbuild.measure.vmsa import SaveArea, svsm_vmsa_page
from tests.conftest import FIXTURES
from tests.measure_support import (
    FOOTER,
    PAGE,
    SevFirmwareLayout,
    TdvfSection,
    entry,
    random_sections,
    sev_firmware,
    tdvf_firmware,
)


def _good() -> bytes:
    rng = random.Random(5)
    return sev_firmware(SevFirmwareLayout(pages=4, sections=random_sections(rng, kernel_hashes=True)), rng)


def test_debian_images_parse() -> None:
    amd = Firmware.parse((FIXTURES / "firmware" / "OVMF.amdsev.fd").read_bytes())
    assert amd.sev_es_reset_eip() == 0x80B004  # spec §1.1 "Values parsed here"
    assert amd.sev_hashes_table_gpa() == 0x810C00
    assert [s.type for s in amd.sev_sections][-2:] == [
        SevSectionType.SNP_SEC_MEM,
        SevSectionType.SNP_KERNEL_HASHES,
    ]
    tdx = Firmware.parse((FIXTURES / "firmware" / "OVMF.inteltdx.ms.fd").read_bytes())
    assert len(tdx.tdvf_sections()) == 6  # spec §3.1
    synthetic = Firmware.parse(_good())
    with pytest.raises(FormatError, match="TDX metadata"):
        synthetic.tdvf_sections()


def test_synthetic_image_parses() -> None:
    fw = Firmware.parse(_good())
    assert len(fw.sev_sections) == 6
    assert fw.gpa == (1 << 32) - 4 * PAGE


@pytest.mark.parametrize("size", [0, 10, 49])
def test_too_short(size: int) -> None:
    with pytest.raises(FormatError, match="too short"):
        Firmware.parse(bytes(size))


def test_no_footer_is_an_empty_table_but_named_when_needed() -> None:
    fw = Firmware.parse(bytes(PAGE))
    assert fw.table == {}
    with pytest.raises(FormatError, match="SEV-ES reset block"):
        fw.sev_es_reset_eip()


def _with_footer(table_body: bytes, table_len: int | None = None, size: int = PAGE) -> bytes:
    data = bytearray(size)
    end = size - 32 - 18
    data[end - len(table_body) : end] = table_body
    length = len(table_body) + 18 if table_len is None else table_len
    data[end : end + 18] = struct.pack("<H", length) + uuid.UUID(FOOTER).bytes_le
    return bytes(data)


def test_table_length_beyond_file() -> None:
    with pytest.raises(FormatError, match="footer table length"):
        Firmware.parse(_with_footer(b"", table_len=60000))


def test_entry_length_invalid() -> None:
    bad = b"\0" * 4 + struct.pack("<H", 5) + bytes(16)
    with pytest.raises(FormatError, match="entry length"):
        Firmware.parse(_with_footer(bad))
    oversized = b"\0" * 4 + struct.pack("<H", 500) + bytes(16)
    with pytest.raises(FormatError, match="entry length"):
        Firmware.parse(_with_footer(oversized))


@pytest.mark.parametrize(
    ("asev", "offset", "message"),
    [
        (b"", 0x100000, "outside the file"),
        (b"XSEV" + struct.pack("<III", 16, 1, 0), None, "ASEV"),
        (b"ASEV" + struct.pack("<III", 16, 2, 0), None, "version 1"),
        (b"ASEV" + struct.pack("<III", 16, 1, 3), None, "does not fit"),
        (b"ASEV" + struct.pack("<III", 28, 1, 1) + struct.pack("<III", 0, PAGE, 9), None, "unknown type"),
    ],
)
def test_bad_sev_metadata(asev: bytes, offset: int | None, message: str) -> None:
    data = bytearray(PAGE)
    data[1000 : 1000 + len(asev)] = asev
    body = entry("dc886566-984a-4798-a75e-5585a7bf67cc", struct.pack("<I", offset or PAGE - 1000))
    end = PAGE - 32 - 18
    data[end - len(body) : end] = body
    data[end : end + 18] = struct.pack("<H", len(body) + 18) + uuid.UUID(FOOTER).bytes_le
    with pytest.raises(FormatError, match=message):
        Firmware.parse(bytes(data))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (TdvfSection(0, PAGE, 0x800100, PAGE, 3, 0), "page aligned"),
        (TdvfSection(0, 2 * PAGE, 0x800000, PAGE, 3, 0), "page aligned or smaller"),
        (TdvfSection(7 * PAGE, 2 * PAGE, 0x800000, 2 * PAGE, 0, 1), "outside the file"),
        (TdvfSection(0, 0, 0x800000, PAGE, 42, 0), "unknown type"),
    ],
)
def test_bad_tdvf_sections(section: TdvfSection, message: str) -> None:
    fw = Firmware.parse(tdvf_firmware(8, [section], random.Random(2)))
    with pytest.raises(FormatError, match=message):
        fw.tdvf_sections()


def test_tdvf_descriptor_guid_checked() -> None:
    data = bytearray(tdvf_firmware(8, [TdvfSection(0, 0, 0x800000, PAGE, 3, 0)], random.Random(2)))
    i = data.find(b"TDVF")
    data[i - 1] ^= 1
    with pytest.raises(FormatError, match="GUID"):
        Firmware.parse(bytes(data)).tdvf_sections()


def test_hashes_page_must_be_one_page(tmp_path: Path) -> None:
    layout = SevFirmwareLayout(pages=4, sections=[(0x810000, 2 * PAGE, 0x10)])
    fw = tmp_path / "fw"
    fw.write_bytes(sev_firmware(layout, random.Random(9)))
    spec = MeasureSpec(targets=(Target(Tee.SNP, fw),), kernel=Blob(sha256=bytes(32)), sev=SevOptions(cpus=1))
    with pytest.raises(MeasurementError, match="one page"):
        measure(spec)


def test_build_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError, match="fcw"):
        build(SaveArea, fcw=0x37F)  # the sev-snp-measure SVSM slip (STYLE.md rule 3)


def test_svsm_vmsa_keeps_fcw_zero() -> None:
    page = svsm_vmsa_page(eip=0xFFC0_1000, vcpu_sig=0x800F12)
    assert page[0x408:0x40C] == (0x1F80).to_bytes(4, "little")
    assert page[0x410:0x412] == b"\0\0"  # spec §1.9 quirk, matched by real-hardware vectors
    assert page[0x178:0x180] == (0xFFC0_1000).to_bytes(8, "little")


@pytest.mark.parametrize(
    "head",
    [b"", b"XX" + bytes(100), b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"PE\0\1" + bytes(200)],
)
def test_non_pe_kernel(head: bytes) -> None:
    with pytest.raises(FormatError):
        authenticode.plan(head, len(head))

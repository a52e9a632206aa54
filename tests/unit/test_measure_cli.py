"""`cwbuild measure` through the real CLI (python -m cwbuild), and `measure --bundle` on a bundle."""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

import pytest

from cwbuild.measure.api import Blob, MeasureSpec, SevOptions, Target, Tee, measure
from cwbuild.measure.bundle import MEASUREMENT_JSON, dumps
from tests.conftest import ASSETS, FIXTURES, cwbuild

AMDSEV = FIXTURES / "firmware" / "OVMF.amdsev.fd"
TDVF = FIXTURES / "firmware" / "OVMF.inteltdx.ms.fd"
DEBIAN_SHA = "3e4fd0b3fe3b2dbe481c3d9e99418a034174f26cbe1f55aa212b0f18c12d2d6f"
# spec §4, Debian OVMF.amdsev.fd, sev-snp-measure 0.0.13
SNP_1CPU = "d74bd3ea40b240c3228edc5177ce6193561ebff633dbd0be76d6c143b876d65102425c0e2e8a930857c48daa5eacda58"
SNP_1CPU_K = (
    "d3acf06e3d21466ac895be5c2c08cd61fc0efee33872f12a0e2767d3f0bd6bf5a9486b84f572566a921e89b051bb29ed"
)
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def _json(args: list[str | Path], code: int = 0) -> dict[str, object]:
    proc = cwbuild(["measure", *args, "--json"])
    assert proc.returncode == code, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def test_snp_json() -> None:
    doc = _json(["--tee", "snp", "--firmware", AMDSEV, "--cpus", "1", "--vcpu-type", "EPYC-v4"])
    assert doc["tee"] == "snp"
    assert doc["measurement"] == SNP_1CPU
    assert doc["inputs"] == {
        "kernel": None,
        "initrd": None,
        "cmdline": None,
        "firmware": {"snp": {"sha256": DEBIAN_SHA, "size": 4194304}},
    }


def test_kernel_as_file_or_digest_agree() -> None:
    common = ["--tee", "snp", "--firmware", AMDSEV, "--cpus", "1", "--cmdline", "console=ttyS0"]
    by_file = _json([*common, "--kernel", "/dev/null", "--initrd", "/dev/null"])
    by_digest = _json([*common, "--kernel-sha256", EMPTY_SHA, "--initrd-sha256", EMPTY_SHA])
    assert by_file["measurement"] == by_digest["measurement"] == SNP_1CPU_K
    assert by_digest["inputs"]["kernel"] == {"sha256": EMPTY_SHA}  # type: ignore[index]


def test_vcpu_family_model_stepping_equals_type() -> None:
    fms_flags = ["--vcpu-family", "25", "--vcpu-model", "1", "--vcpu-stepping", "1"]
    fms = _json(["--tee", "sev-es", "--firmware", AMDSEV, "--cpus", "3", *fms_flags])
    named = _json(["--tee", "sev-es", "--firmware", AMDSEV, "--cpus", "3", "--vcpu-type", "EPYC-Milan"])
    assert fms["measurement"] == named["measurement"]


def test_plain_output_and_sev_needs_no_cpus() -> None:
    proc = cwbuild(["measure", "--tee", "sev", "--firmware", AMDSEV])
    assert proc.returncode == 0
    assert (
        proc.stdout.decode().strip() == DEBIAN_SHA
    )  # SEV without a kernel: sha256 of the firmware (spec §1.4)


def test_ovmf_hash_only() -> None:
    proc = cwbuild(["measure", "--tee", "snp", "--firmware", AMDSEV, "--ovmf-hash-only"])
    assert proc.stdout.decode().strip() == (
        "9d0dd8be18c86e3fe3bf0038ed75ebf5340bee69fd2632c8ff9409964575960ae1f7e84be387d2e3467bc3508d1e4806"
    )


def test_tdx_without_kernel() -> None:
    doc = _json(["--tee", "tdx", "--firmware", TDVF])
    assert doc["rtmr0"] is doc["rtmr1"] is doc["rtmr2"] is None
    assert doc["hardware_validated"] is False
    assert str(doc["mrtd"]).startswith("a7a1f751")
    proc = cwbuild(["measure", "--tee", "tdx", "--firmware", TDVF])
    assert "rtmr1: not predicted" in proc.stdout.decode()


@pytest.mark.parametrize(
    "args",
    [
        ["--tee", "snp", "--firmware", str(AMDSEV)],  # --cpus missing
        [
            "--tee",
            "snp",
            "--firmware",
            str(AMDSEV),
            "--cpus",
            "1",
            "--initrd",
            "/dev/null",
        ],  # initrd w/o kernel
        ["--tee", "sev", "--firmware", str(AMDSEV), "--kernel-sha256", "zz"],
        ["--tee", "sev", "--firmware", str(AMDSEV), "--kernel", "/dev/null", "--kernel-sha256", EMPTY_SHA],
        ["--tee", "sev", "--firmware", str(AMDSEV), "--snp-ovmf-hash", "00" * 48],
        ["--tee", "tdx", "--firmware", str(TDVF), "--kernel-sha256", EMPTY_SHA],
    ],
)
def test_usage_errors_exit_2_with_json(args: list[str]) -> None:
    doc = _json(args, code=2)
    assert doc["kind"] == "UsageError"
    assert doc["error"]


def test_usage_error_without_json_is_one_line() -> None:
    proc = cwbuild(["measure", "--tee", "snp", "--firmware", AMDSEV])
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("error: --cpus is required")


@pytest.mark.parametrize(
    ("content", "kind"),
    [(b"short", "FormatError"), (None, "MeasurementError")],
)
def test_bad_firmware_is_a_json_error(tmp_path: Path, content: bytes | None, kind: str) -> None:
    fw = tmp_path / "fw.fd"
    if content is not None:
        fw.write_bytes(content)
    doc = _json(["--tee", "snp", "--firmware", fw, "--cpus", "1"], code=1)
    assert doc["kind"] == kind


def test_kernel_with_unsupported_firmware(tmp_path: Path) -> None:
    fw = tmp_path / "plain.fd"
    fw.write_bytes(bytes(8192))
    doc = _json(["--tee", "sev", "--firmware", fw, "--kernel", "/dev/null"], code=1)
    assert "hashes table" in str(doc["error"])


# --- measure --bundle ---


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    kernels = sorted(glob.glob(str(ASSETS / "kernel" / "boot" / "vmlinuz-*")))
    assert kernels, "run scripts/setup.sh"
    d = tmp_path / "bundle"
    (d / "firmware").mkdir(parents=True)
    (d / "firmware" / AMDSEV.name).symlink_to(AMDSEV)
    (d / "firmware" / TDVF.name).symlink_to(TDVF)
    (d / "vmlinuz").symlink_to(kernels[-1])
    (d / "initrd.img").write_bytes(b"initrd" * 1000)
    spec = MeasureSpec(
        targets=(
            Target(Tee.SNP, d / "firmware" / AMDSEV.name),
            Target(Tee.SEV_ES, d / "firmware" / AMDSEV.name),
            Target(Tee.SEV, d / "firmware" / AMDSEV.name),
            Target(Tee.TDX, d / "firmware" / TDVF.name),
        ),
        kernel=Blob(path=d / "vmlinuz"),
        initrd=Blob(path=d / "initrd.img"),
        cmdline="console=ttyS0 ✓",
        sev=SevOptions(cpus=2, vcpu_type="EPYC-Genoa", guest_features=0x21),
    )
    (d / MEASUREMENT_JSON).write_text(dumps(measure(spec).to_json()))
    return d


def test_bundle_format_has_no_paths(bundle: Path) -> None:
    text = (bundle / MEASUREMENT_JSON).read_text()
    assert str(bundle) not in text
    assert "/" not in text.replace("\\/", "")  # no path separators at all
    doc = json.loads(text)
    assert sorted(doc["measurements"]) == ["sev", "sev-es", "snp", "tdx"]
    assert doc["measurements"]["tdx"]["hardware_validated"] is False
    assert doc["measurements"]["snp"]["assumptions"]["vcpu_type"] == "EPYC-Genoa"
    assert text == dumps(doc)  # canonical: sorted keys


def test_bundle_ok(bundle: Path) -> None:
    proc = cwbuild(["measure", "--bundle", bundle])
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"ok: 4 measurement(s)" in proc.stdout


def test_bundle_changed_initrd(bundle: Path) -> None:
    (bundle / "initrd.img").write_bytes(b"initrd" * 1000 + b"!")
    proc = cwbuild(["measure", "--bundle", bundle])
    assert proc.returncode == 1
    assert b"inputs.initrd.sha256" in proc.stderr


def test_bundle_edited_value(bundle: Path) -> None:
    doc = json.loads((bundle / MEASUREMENT_JSON).read_text())
    doc["measurements"]["tdx"]["rtmr2"] = "00" * 48
    (bundle / MEASUREMENT_JSON).write_text(dumps(doc))
    out = _json(["--bundle", bundle], code=1)
    assert out["ok"] is False
    assert out["first_difference"] == "measurements.tdx.rtmr2"


def test_bundle_edited_cmdline(bundle: Path) -> None:
    doc = json.loads((bundle / MEASUREMENT_JSON).read_text())
    doc["cmdline"] = "console=ttyS1 ✓"
    (bundle / MEASUREMENT_JSON).write_text(dumps(doc))
    assert _json(["--bundle", bundle], code=1)["first_difference"] == "inputs.cmdline.sha256"


def test_bundle_missing_firmware(bundle: Path) -> None:
    (bundle / "firmware" / TDVF.name).unlink()
    doc = _json(["--bundle", bundle], code=1)
    assert doc["kind"] == "FormatError"
    assert "firmware/" in str(doc["error"])


def test_bundle_not_json(tmp_path: Path) -> None:
    (tmp_path / MEASUREMENT_JSON).write_text("{nope")
    assert _json(["--bundle", tmp_path], code=1)["kind"] == "FormatError"


def test_click_level_usage_error_is_json_too() -> None:
    doc = _json(["--tee", "snp", "--firmware", AMDSEV, "--cpus", "many"], code=2)
    assert doc["kind"] == "UsageError"
    assert "--cpus" in str(doc["error"])

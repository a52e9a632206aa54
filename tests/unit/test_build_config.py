"""`cwbuild build`'s parsing: flags over cwbuild.yaml over defaults, and the usage errors found before any
work; the krun entrypoint ELF, executed for real."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from cwbuild.build_steps.krun import MESSAGE, entrypoint_elf
from cwbuild.config import BuildTarget, load_yaml, merge
from cwbuild.errors import ConfigError, UsageError
from cwbuild.launch.spec import Tee
from tests.conftest import REPO

BASE: dict[str, Any] = {"image": "localhost/app:latest", "passphrase_file": "pp"}


def test_defaults() -> None:
    spec = merge(BASE, {})
    assert spec.tees == (Tee.SNP,)
    assert spec.target is BuildTarget.QEMU
    assert spec.cpus == 2
    assert spec.memory_mib == 2048
    assert spec.luks_format == "luks2"
    assert len(spec.workload_id) == 32
    assert int(spec.workload_id, 16) >= 0
    assert spec.workload_id != merge(BASE, {}).workload_id  # random per build
    assert spec.output == Path("app.bundle")
    assert spec.development_only
    assert spec.rootfs_via == "mount"


@pytest.mark.parametrize(("word", "tee"), [("snp", Tee.SNP), ("sev", Tee.SEV_ES), ("sev_no_es", Tee.SEV)])
def test_type_takes_buildahs_meaning(word: str, tee: Tee) -> None:
    assert merge({**BASE, "type": word, "target": "krun"}, {}).tees == (tee,)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"tees": ("snp",), "type": "snp"}, "--tee or --type"),
        ({"passphrase_file": None}, "--passphrase-file"),
        ({"tees": ("snp", "tdx")}, "exactly one of snp, tdx or sim"),
        ({"tees": ("sev",)}, "exactly one of snp, tdx or sim"),
        ({"tees": ("snp", "snp")}, "given twice"),
        ({"tees": ("bogus",)}, "unknown --tee"),
        ({"type": "tdx"}, "unknown --type"),
        ({"target": "krun", "tees": ("tdx",)}, "--target krun takes"),
        ({"target": "krun", "luks_format": "luks2"}, "LUKS1"),
        ({"target": "krun", "attestation_url": "http://k", "register_token_file": "t"}, "--firmware-library"),
        ({"target": "krun", "type": "sev", "attestation_url": "http://k", "register_token_file": "t"}, "SNP"),
        ({"attestation_url": "http://k"}, "--register-token-file"),
        ({"attestation_url": "https://k", "register_token_file": "t"}, "--attestation-ca"),
        ({"register_url": "http://k"}, "need --attestation-url"),
        ({"workload_id": "../etc"}, "workload id"),
        ({"cpus": 0}, "cpus"),
        ({"memory_mib": 64}, "memory"),
        ({"snp_gen": "rome"}, "--snp-gen"),
        ({"firmware_library": "lib.so"}, "--target krun"),
        ({"image": None}, "no IMAGE"),
        ({"rootfs_via": "copy"}, "--rootfs-via"),
        ({"platform": "linux/arm64"}, "x86-64"),
        ({"platform": "windows/amd64"}, "x86-64"),
        ({"platform": "linux/amd64/v2/x"}, "x86-64"),
        ({"platform": "amd64"}, "x86-64"),
    ],
)
def test_usage_errors(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as err:
        merge({**BASE, **flags}, {})
    assert message in err.value.message or message in (err.value.hint or "")


def test_amd64_variants_are_accepted() -> None:
    assert merge({**BASE, "platform": "linux/amd64/v3"}, {}).platform == "linux/amd64/v3"
    assert merge(BASE, {}).platform == "linux/amd64"


def test_rootfs_via_from_flag_and_yaml() -> None:
    assert merge({**BASE, "rootfs_via": "export"}, {}).rootfs_via == "export"
    assert merge(BASE, {"rootfs_via": "export"}).rootfs_via == "export"
    assert merge({**BASE, "rootfs_via": "mount"}, {"rootfs_via": "export"}).rootfs_via == "mount"


def test_yaml_values_and_flag_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "cwbuild.yaml"
    cfg.write_text(
        "image: localhost/x:1\ntee: [tdx]\ncpus: 4\nmemory: 1024\npassphrase-file: secret\n"
        "attestation_ca: ca.pem\nreplace: true\n"
    )
    values = load_yaml(cfg)
    assert values["passphrase_file"] == str(tmp_path / "secret")
    assert values["attestation_ca"] == str(tmp_path / "ca.pem")
    spec = merge({"cpus": 8, "tees": ()}, values)
    assert spec.cpus == 8  # the flag wins
    assert spec.memory_mib == 1024
    assert spec.tees == (Tee.TDX,)
    assert spec.replace is True
    assert spec.image == "localhost/x:1"


@pytest.mark.parametrize(
    ("text", "message"),
    [("bogus-key: 1\n", "unknown build option"), ("- a\n- b\n", "mapping"), ("a: [\n", "not YAML")],
)
def test_bad_yaml(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "cwbuild.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml(cfg)


def test_example_config_parses() -> None:
    values = load_yaml(REPO / "examples/cwbuild.yaml")
    spec = merge({"passphrase_file": "secret"}, values)
    assert spec.image == "localhost/cwbuild-hello:latest"
    assert spec.tees == (Tee.SIM,)
    assert spec.output == REPO / "examples/../hello.bundle"


def test_entrypoint_elf_runs(tmp_path: Path) -> None:
    exe = tmp_path / "entrypoint"
    exe.write_bytes(entrypoint_elf())
    exe.chmod(0o755)
    proc = subprocess.run([exe], capture_output=True, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, b"", MESSAGE)
    other = tmp_path / "other"
    other.write_bytes(entrypoint_elf(b"x" * 300 + b"\n"))
    other.chmod(0o755)
    assert subprocess.run([other], capture_output=True, check=False).stderr == b"x" * 300 + b"\n"


def _tag_spec(tmp_path: Path, tag: str) -> Any:
    return merge({**BASE, "output": str(tmp_path / "out.bundle"), "tag": tag}, {})


@pytest.mark.parametrize(
    ("tag", "ref"),
    [
        ("localhost/app:v1", "localhost/app:v1"),
        ("containers-storage:localhost/app:v1", "containers-storage:localhost/app:v1"),
        ("oci:{d}/layout", "oci:{d}/layout"),
        ("oci:{d}/layout:v1.0_rc-2", "oci:{d}/layout:v1.0_rc-2"),
        ("oci-archive:{d}/image.tar", "oci-archive:{d}/image.tar"),
        ("oci-archive:{d}/image.tar:a--b+c@d", "oci-archive:{d}/image.tar:a--b+c@d"),
    ],
)
def test_tag_transports_accepted(tmp_path: Path, tag: str, ref: str) -> None:
    assert _tag_spec(tmp_path, tag.format(d=tmp_path)).tag == ref.format(d=tmp_path)


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("-bad", "not an image name"),
        ("containers-storage:bad name", "not an image name"),
        ("docker-archive:{d}/x.tar", "does not write docker-archive"),
        ("oci:{d}/existing", "already exists"),
        ("oci-archive:{d}/existing.tar", "already exists"),
        ("oci-archive:{d}/dangling", "already exists"),  # a symlink to nothing is there too
        ("oci:{d}/no/such/dir", "is not a directory"),
        ("oci:{d}/layout:a..b", "not an OCI reference name"),
        ("oci:{d}/layout:-x", "not an OCI reference name"),
        ("oci:{d}/layout:" + "a" * 129, "not an OCI reference name"),
        ("oci-archive:{d}/out.bundle", "inside the bundle"),
        ("oci-archive:{d}/out.bundle/image.tar", "inside the bundle"),
        ("oci:{d}/out.bundle/sub/layout", "inside the bundle"),
        ("oci:{d}/..", "names no file"),
        ("oci::v1", "invalid oci reference"),
    ],
)
def test_tag_usage_errors(tmp_path: Path, tag: str, message: str) -> None:
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing.tar").write_bytes(b"")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "out.bundle" / "sub").mkdir(parents=True)
    with pytest.raises(UsageError) as err:
        _tag_spec(tmp_path, tag.format(d=tmp_path))
    assert message in err.value.message

"""`cwbuild build --target krun` against what Debian sid's `buildah mkcw` produced for the same example image
(tests/golden/buildah/mkcw_layout.json, provenance inside): the same files, types, modes and owners in the
directory and in the single image layer, the same krun-sev.json bytes for the same inputs, the same footer
format after a LUKS1 container that real cryptsetup opens, an entrypoint that behaves like buildah's; and,
with --firmware-library, the krun SNP measurement equals libkrunfw's own `krunfw_measurement` answer
(tests/golden/krunfw/expected.json) and is what gets registered."""

from __future__ import annotations

import json
import shutil
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.integration.attest_support import new_server
from tests.integration.build_support import build, passphrase_file
from tests.integration.podman_env import Podman, hello_image, podman

__all__ = ["hello_image", "podman"]  # fixtures
pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOLDEN = json.loads((REPO / "tests/golden/buildah/mkcw_layout.json").read_text())
KRUNFW = REPO / "tests/golden/krunfw"
TAG = "localhost/cwbuild-hello-krun:test"


def _entries_of_dir(root: Path) -> list[dict[str, object]]:
    out = []
    for name in sorted(e["name"] for e in GOLDEN["entries"]):
        st = (root / name).lstat()
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        out.append(
            {"name": name, "type": kind, "mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": 0, "gid": 0}
        )
    return out


def _footer(disk: Path) -> bytes:
    data = disk.read_bytes()
    magic, length = struct.unpack("<4sQ", data[-12:])
    assert magic == b"KRUN"
    return data[-12 - length : -12]


def test_krun_layout_matches_buildah_mkcw(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    passfile, _ = passphrase_file(tmp_path / "s", b"pass123")
    out = tmp_path / "krun"
    args: list[str | Path] = [hello_image, "-o", out, "--target", "krun", "--type", "snp", "--cpus", "2"]
    args += ["--memory", "512", "--workload-id", "wid0123", "--passphrase-file", passfile, "--tag", TAG]
    proc = build(args, env=podman.env)
    assert proc.returncode == 0, proc.stderr.decode()
    names = {e["name"] for e in GOLDEN["entries"]}
    assert {p.name for p in out.iterdir()} - names == {"manifest.json"}
    assert _entries_of_dir(out) == GOLDEN["entries"]
    assert (out / "krun-sev.json").read_text() == GOLDEN["krun_sev_json"]
    disk = out / "disk.img"
    assert disk.read_bytes()[:8].hex() == GOLDEN["disk"]["luks_magic_version"]
    assert disk.stat().st_size % GOLDEN["disk"]["size_multiple_of"] == 0
    assert _footer(disk) == (out / "krun-sev.json").read_bytes()
    ok = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", passfile, disk], check=False
    )
    assert ok.returncode == 0
    run = subprocess.run([out / "entrypoint"], capture_output=True, text=True, check=False)
    want = GOLDEN["entrypoint"]
    assert (run.returncode, run.stdout, run.stderr) == (want["exit_code"], want["stdout"], want["stderr"])
    _check_image(podman, tmp_path)


def _check_image(podman: Podman, tmp_path: Path) -> None:
    info = json.loads(podman("image", "inspect", TAG).stdout)[0]
    assert info["Config"]["Entrypoint"] == GOLDEN["config"]["Entrypoint"]
    assert len(info["RootFS"]["Layers"]) == GOLDEN["layers"]
    archive = tmp_path / "image.tar"
    podman("save", "--format", "oci-archive", "-o", str(archive), TAG)
    with tarfile.open(archive) as outer:

        def member(name: str) -> bytes:
            f = outer.extractfile(name)
            assert f is not None
            return f.read()

        index = json.loads(member("index.json"))
        manifest = json.loads(member(f"blobs/sha256/{index['manifests'][0]['digest'][7:]}"))
        layer = outer.extractfile(f"blobs/sha256/{manifest['layers'][0]['digest'][7:]}")
        assert layer is not None
        with tarfile.open(fileobj=layer, mode="r|*") as inner:
            entries = [
                {
                    "name": m.name,
                    "type": "dir" if m.isdir() else "file",
                    "mode": f"{m.mode & 0o7777:04o}",
                    "uid": m.uid,
                    "gid": m.gid,
                }
                for m in inner
            ]
    assert entries == GOLDEN["entries"]


def test_krun_measurement_and_registration(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed (scripts/setup.sh installs gcc)"
    lib = tmp_path / "libkrunfw-test.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", lib, KRUNFW / "testlib.c"], check=True)
    case = next(c for c in json.loads((KRUNFW / "expected.json").read_text())["cases"] if c["cpus"] == 2)
    server = new_server(tmp_path / "server").start()
    try:
        passfile, _ = passphrase_file(tmp_path / "s")
        out = tmp_path / "krun"
        args: list[str | Path] = [hello_image, "-o", out, "--target", "krun", "--tee", "snp", "--cpus", "2"]
        args += ["--memory", str(case["memory_mib"]), "--firmware-library", lib, "--workload-id", "krun1"]
        args += ["--attestation-url", server.url, "--register-token-file", server.workdir / "token"]
        args += ["--passphrase-file", passfile]
        proc = build(args, env=podman.env)
        assert proc.returncode == 0, proc.stderr.decode()
        doc = json.loads((out / "measurement.json").read_text())
        assert doc["measurements"]["krun-snp"]["measurement"] == case["snp"]
        stored = httpx.get(f"{server.url}/v1/workloads/krun1", headers=server.admin(), timeout=10).json()
        assert stored["reference_values"] == [case["snp"]]
        config = json.loads((out / "krun-sev.json").read_text())
        assert config["attestation_url"] == server.url
    finally:
        server.kill()

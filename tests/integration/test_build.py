"""`cwbuild build` on the example image, checked with tools that are not cwbuild:

- real `cryptsetup open --test-passphrase` opens disk.img with the passphrase (and refuses another);
- the decrypted filesystem, loop-mounted by the kernel, holds exactly `podman export` of the same image
  (entry by entry: type, mode, owner, size, content, link, mtime, user xattrs) plus cwbuild's two config
  files and mkfs's lost+found;
- measurement.json equals `cwbuild measure` on the bundle's files and, for SNP, `sev-snp-measure` (virtee);
- two builds with the same --workload-id and SOURCE_DATE_EPOCH give byte-identical initrd.img and
  measurement.json, and so does a build from a kit carried through `kit export` / `kit import`;
- the workload is registered with a real `cwbuild serve`, and a failure after registration deletes it again;
  failures leave no bundle and no private directory behind;
- --tag stores the bundle in Podman (REST API) as a single-layer image with labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from cwbuild.boot.kit import latest
from tests.conftest import cwbuild
from tests.imagekit import E, docker_archive, layer_tar
from tests.integration.attest_support import Server, new_server, write_secret
from tests.integration.build_support import ADDED, KIT_CACHE, build, hidden_dirs, passphrase_file
from tests.integration.podman_env import Podman, full_tree_dir, full_tree_tar, hello_image, podman
from tests.kits import cached_kit

__all__ = ["hello_image", "podman"]  # fixtures
pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKLOAD_ID = "0123456789abcdef0123456789abcdef"
TAG = "localhost/cwbuild-hello-bundle:test"
CPUS = 2


@dataclass(frozen=True)
class Built:
    root: Path
    passfile: Path
    secret: bytes
    stderr: str


@pytest.fixture(scope="module", autouse=True)
def _kit() -> None:
    """The builds here run --offline against the test kit cache: fetch it once per machine."""
    cached_kit()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, podman: Podman, hello_image: str) -> Built:
    work = tmp_path_factory.mktemp("build")
    passfile, secret = passphrase_file(work / "secret")
    args: list[str | Path] = [hello_image, "-o", work / "a", "--tee", "sim", "--memory", "512"]
    args += ["--workload-id", WORKLOAD_ID, "--passphrase-file", passfile, "--tag", TAG]
    proc = build(args, env=podman.env)
    assert proc.returncode == 0, proc.stderr.decode()
    return Built(work / "a", passfile, secret, proc.stderr.decode())


@contextmanager
def _mounted_disk(disk: Path, passfile: Path, tmp_path: Path) -> Iterator[Path]:
    """`disk` decrypted by `cwbuild disk decrypt` and loop-mounted read-only, unmounted afterwards."""
    plain = tmp_path / "plain.img"
    proc = cwbuild(["disk", "decrypt", disk, plain, "--passphrase-file", passfile])
    assert proc.returncode == 0, proc.stderr.decode()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", plain, mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_bundle_layout(bundle: Built) -> None:
    names = sorted(p.relative_to(bundle.root).as_posix() for p in bundle.root.rglob("*"))
    assert names == [
        "disk.img",
        "firmware",
        "firmware/OVMF.amdsev.fd",
        "initrd.img",
        "launch",
        "launch/libvirt.xml",
        "launch/qemu.sh",
        "manifest.json",
        "measurement.json",
        "vmlinuz",
    ]
    manifest = json.loads((bundle.root / "manifest.json").read_text())
    assert manifest["workload_id"] == WORKLOAD_ID
    assert manifest["development_only"] is True
    assert manifest["launch"]["tee"] == "sim"
    steps = {s["step"]: s for s in manifest["steps"]}
    for rel in ("disk.img", "initrd.img", "vmlinuz", "measurement.json"):
        recorded = next(s for s in steps.values() if s.get("path") == rel)
        assert recorded["sha256"] == hashlib.sha256((bundle.root / rel).read_bytes()).hexdigest()
    assert bundle.secret.decode() not in (bundle.root / "manifest.json").read_text()
    assert bundle.secret.decode() not in bundle.stderr
    assert hidden_dirs(bundle.root.parent) == []


def test_disk_opens_with_cryptsetup(bundle: Built, tmp_path: Path) -> None:
    disk = bundle.root / "disk.img"
    ok = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", bundle.passfile, disk], check=False
    )
    assert ok.returncode == 0
    wrong, _ = passphrase_file(tmp_path, b"not the passphrase")
    bad = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", wrong, disk],
        check=False,
        capture_output=True,
    )
    assert bad.returncode != 0
    dump = subprocess.run(["cryptsetup", "luksDump", disk], check=True, capture_output=True, text=True).stdout
    version = next(line.split(":", 1)[1].strip() for line in dump.splitlines() if line.startswith("Version:"))
    assert version == "2"


def test_disk_holds_exactly_the_image_files(
    bundle: Built, podman: Podman, hello_image: str, tmp_path: Path
) -> None:
    with _mounted_disk(bundle.root / "disk.img", bundle.passfile, tmp_path) as mnt:
        got, got_groups = full_tree_dir(mnt)
        config = json.loads((mnt / ".krun_config.json").read_text())
    want, want_groups, devices = full_tree_tar(podman.export(hello_image, tmp_path / "export.tar"))
    assert devices == []
    assert set(got) - set(want) == ADDED
    assert set(want) <= set(got)
    for path in want:
        assert got[path] == want[path], path
    assert got_groups == want_groups
    assert config["Entrypoint"] == ["/usr/local/bin/hello"]
    assert "GREETING=hello from a confidential workload" in config["Env"]


def test_measurement_equals_independent_computations(bundle: Built) -> None:
    check = cwbuild(["measure", "--bundle", bundle.root])
    assert check.returncode == 0, check.stderr.decode()
    doc = json.loads((bundle.root / "measurement.json").read_text())
    recorded = doc["measurements"]["snp"]["measurement"]
    files = {
        "--firmware": bundle.root / "firmware/OVMF.amdsev.fd",
        "--kernel": bundle.root / "vmlinuz",
        "--initrd": bundle.root / "initrd.img",
    }
    args = [a for k, v in files.items() for a in (k, str(v))]
    ours = cwbuild(
        ["measure", "--tee", "snp", *args, "--cmdline", doc["cmdline"], "--cpus", str(CPUS), "--json"]
    )
    assert ours.returncode == 0, ours.stderr.decode()
    assert json.loads(ours.stdout)["measurement"] == recorded
    peer = Path(sys.executable).with_name("sev-snp-measure")
    assert peer.exists(), "sev-snp-measure (dev extra) missing: run scripts/setup.sh"
    virtee = subprocess.run(
        [
            peer, "--mode", "snp", "--vcpus", str(CPUS), "--vcpu-type", "EPYC-v4",
            "--ovmf", files["--firmware"], "--kernel", files["--kernel"], "--initrd", files["--initrd"],
            "--append", doc["cmdline"], "--guest-features", "0x1",
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert virtee.stdout.strip() == recorded


def _same(a: Path, b: Path) -> None:
    for name in ("initrd.img", "measurement.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # the plaintext filesystem is reproducible too (its digest is recorded; the ciphertext is not)
    fs_a = json.loads((a / "manifest.json").read_text())["filesystem"]["sha256"]
    fs_b = json.loads((b / "manifest.json").read_text())["filesystem"]["sha256"]
    assert fs_a == fs_b


def test_rebuild_and_kit_round_trip_are_byte_identical(
    bundle: Built, podman: Podman, hello_image: str, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    proc = build(
        [hello_image, "-o", again, "--tee", "sim", "--memory", "512", "--workload-id", WORKLOAD_ID,
         "--passphrase-file", bundle.passfile],
        env=podman.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    _same(bundle.root, again)
    assert (bundle.root / "disk.img").read_bytes() != (again / "disk.img").read_bytes()  # fresh LUKS keys
    kit = latest(KIT_CACHE, "trixie")
    assert kit is not None
    archive = tmp_path / "kit.tar.zst"
    assert cwbuild(["kit", "export", "--cache", KIT_CACHE, "--kit", kit.id, archive]).returncode == 0
    other = tmp_path / "cache"
    assert cwbuild(["kit", "import", "--cache", other, archive]).returncode == 0
    moved = tmp_path / "moved"
    proc = build(
        [hello_image, "-o", moved, "--tee", "sim", "--memory", "512", "--workload-id", WORKLOAD_ID,
         "--passphrase-file", bundle.passfile],
        env=podman.env, kit_cache=other,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    _same(bundle.root, moved)


def test_tag_stores_a_single_layer_image(bundle: Built, podman: Podman) -> None:
    info = json.loads(podman("image", "inspect", TAG).stdout)[0]
    assert len(info["RootFS"]["Layers"]) == 1
    labels = info["Labels"]
    doc = json.loads((bundle.root / "measurement.json").read_text())
    assert labels["org.cwbuild.workload-id"] == WORKLOAD_ID
    assert labels["org.cwbuild.measurement.snp"] == doc["measurements"]["snp"]["measurement"]
    assert labels["org.cwbuild.development-only"] == "true"


# --- registration and failures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = new_server(tmp_path_factory.mktemp("server")).start()
    try:
        yield srv
    finally:
        srv.kill()


def _workload(server: Server, wid: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/workloads/{wid}", headers=server.admin(), timeout=10)


def test_registers_the_measurement(server: Server, podman: Podman, hello_image: str, tmp_path: Path) -> None:
    passfile, _ = passphrase_file(tmp_path / "s")
    out = tmp_path / "reg"
    args: list[str | Path] = [hello_image, "-o", out, "--tee", "sim", "--memory", "512"]
    args += ["--attestation-url", server.url, "--register-token-file", server.workdir / "token"]
    args += ["--workload-id", "reg-ok", "--passphrase-file", passfile, "--json"]
    proc = build(args, env=podman.env)
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["registered"] is True
    assert result["development_only"] is False
    stored = _workload(server, "reg-ok")
    assert stored.status_code == 200
    doc = json.loads((out / "measurement.json").read_text())
    assert stored.json()["reference_values"] == [doc["measurements"]["snp"]["measurement"]]
    assert stored.json()["tee"] == "sim"


def test_failure_after_registration_rolls_it_back(
    server: Server, podman: Podman, hello_image: str, tmp_path: Path
) -> None:
    passfile, _ = passphrase_file(tmp_path / "s")
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    args: list[str | Path] = [hello_image, "-o", out, "--tee", "sim", "--memory", "512"]
    args += ["--attestation-url", server.url, "--register-token-file", server.workdir / "token"]
    args += ["--workload-id", "reg-rollback", "--passphrase-file", passfile]
    args += ["--tag", "localhost/Upper-Case-Is-Refused-By-Podman:x"]  # the step after registration fails
    proc = build(args, env=podman.env)
    assert proc.returncode == 1, proc.stderr.decode()
    assert "storing the bundle image" in proc.stderr.decode()
    assert _workload(server, "reg-rollback").status_code == 404
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        (
            "unreachable endpoint",
            ["--attestation-url", "http://127.0.0.1:9", "--register-token-file", "TOKEN"],
        ),
        ("bad image", ["--passphrase-file", "PASS"]),
    ],
)
def test_failures_leave_nothing_behind(
    case: str, extra: list[str], podman: Podman, hello_image: str, server: Server, tmp_path: Path
) -> None:
    passfile, _ = passphrase_file(tmp_path / "s")
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    image = "oci-archive:" + str(tmp_path / "missing.tar") if case == "bad image" else hello_image
    swap = {"TOKEN": str(server.workdir / "token"), "PASS": str(passfile)}
    args: list[str | Path] = [image, "-o", out, "--tee", "sim", *(swap.get(a, a) for a in extra)]
    if case != "bad image":
        args += ["--passphrase-file", passfile]
    proc = build(args, env=podman.env)
    assert proc.returncode == 1, proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()
    assert list(out.parent.iterdir()) == []


def test_usage_errors_before_any_work(tmp_path: Path) -> None:
    proc = cwbuild(["build", "localhost/x", "--tee", "snp", "--type", "snp", "-o", tmp_path / "o"])
    assert proc.returncode == 2
    assert b"--tee or --type" in proc.stderr
    proc = cwbuild(["build", "localhost/x", "-o", tmp_path / "o"])
    assert proc.returncode == 2
    assert b"--passphrase-file" in proc.stderr
    assert list(tmp_path.iterdir()) == []
    secrets = tmp_path / "secrets"
    passfile, _ = passphrase_file(secrets)
    token = write_secret(secrets / "token", b"t" * 40)
    url = "http://a-rather-long-endpoint-name.example.com:8080/and/a/path"
    krun: list[str | Path] = ["--target", "krun", "--firmware-library", passfile, "--attestation-url", url]
    args: list[str | Path] = [
        "build",
        "localhost/x",
        "-o",
        tmp_path / "o",
        *krun,
        "--register-token-file",
        token,
    ]
    proc = cwbuild([*args, "--passphrase-file", passfile, "--workload-id", "w" * 40])
    assert proc.returncode == 2, proc.stderr.decode()
    assert b"krun's guest takes at most 99" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets"]


def test_inspect_bundle_and_image(bundle: Built, podman: Podman, tmp_path: Path) -> None:
    proc = cwbuild(["inspect", bundle.root, "--json"])
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    recorded = json.loads((bundle.root / "measurement.json").read_text())["measurements"]["snp"][
        "measurement"
    ]
    assert doc["kind"] == "bundle"
    assert doc["workload_id"] == WORKLOAD_ID
    assert doc["measurements"]["snp"]["measurement"] == recorded
    assert doc["disk"]["luks"]["version"] == 2
    assert {f["path"] for f in doc["files"]} >= {"disk.img", "initrd.img", "vmlinuz", "measurement.json"}
    assert all(f["ok"] for f in doc["files"])
    human = cwbuild(["inspect", bundle.root])
    assert recorded.encode() in human.stdout
    copy = tmp_path / "tampered"
    shutil.copytree(bundle.root, copy)
    with (copy / "initrd.img").open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    tampered = json.loads(cwbuild(["inspect", copy, "--json"]).stdout)
    assert [f["path"] for f in tampered["files"] if not f["ok"]] == ["initrd.img"]
    assert cwbuild(["measure", "--bundle", copy]).returncode != 0
    image = json.loads(cwbuild(["inspect", TAG, "--json"], env=podman.env).stdout)
    assert image["cwbuild"]["workload-id"] == WORKLOAD_ID
    assert image["cwbuild"]["measurements"] == {"snp": recorded}


@pytest.mark.e2e
def test_built_bundle_boots_attests_and_runs(
    server: Server, podman: Podman, hello_image: str, tmp_path: Path
) -> None:
    """What `cwbuild build` made (not a hand-assembled bundle) boots under the simulated TEE: the agent
    attests to the endpoint the build registered with, unlocks the disk and runs the image's entrypoint."""
    port = server.url.rsplit(":", 1)[1]
    out = tmp_path / "e2e"
    args: list[str | Path] = [hello_image, "-o", out, "--tee", "sim", "--memory", "512"]
    args += ["--attestation-url", f"http://10.0.2.2:{port}", "--register-url", server.url]
    args += ["--register-token-file", server.workdir / "token"]
    proc = build(args, env=podman.env)
    assert proc.returncode == 0, proc.stderr.decode()
    key = write_secret(
        tmp_path / "sim.key",
        server.sim_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    run = cwbuild(
        ["run", out, "--tee", "sim", "--sim-key", key, "--accel", "tcg", "--timeout", "300"], timeout=400
    )
    console = run.stdout.decode(errors="replace")
    assert run.returncode == 0, console[-3000:] + run.stderr.decode(errors="replace")[-2000:]
    assert "hello from a confidential workload, cwbuild (cwd /srv/app)" in console
    assert "cwbuild-agent: attested" in console


def test_no_kit_offline_is_an_error(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    passfile, _ = passphrase_file(tmp_path / "s")
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    args: list[str | Path] = [hello_image, "-o", out, "--tee", "sim", "--passphrase-file", passfile]
    proc = build([*args, "--kit-cache", tmp_path / "empty-cache"], env=podman.env)
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"--offline forbids fetching" in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_sigterm_mid_build_leaves_nothing(podman: Podman, hello_image: str, tmp_path: Path) -> None:
    passfile, _ = passphrase_file(tmp_path / "s")
    parent = tmp_path / "out"
    parent.mkdir()
    argv = [
        sys.executable,
        "-m",
        "cwbuild",
        "build",
        hello_image,
        "-o",
        str(parent / "bundle"),
        "--tee",
        "sim",
    ]
    argv += ["--passphrase-file", str(passfile), "--kit-cache", str(KIT_CACHE), "--offline"]
    proc = subprocess.Popen(argv, env={**os.environ, **podman.env}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".cwbuild-plain-") for p in parent.iterdir()):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert list(parent.iterdir()) == []


def _rich_layers(*, parent_dirs: bool = False) -> list[bytes]:
    """Three layers with whiteouts, an opaque directory, a hardlink, xattrs, owners and a setuid bit.
    `parent_dirs`: an entry for every directory a layer writes into, as buildah and docker write layers
    (then Podman's stored tree is the one cwbuild applies; without them Podman leaves the time of extraction
    on those directories, and the Podman mount path must refuse and export)."""
    rng = random.Random(11)
    big = [rng.randbytes(8 << 20) for _ in range(6)]  # 48 MiB of incompressible data over three layers
    data = E("data", kind="dir", mode=0o750, uid=1000, gid=1000)
    deep = ["home", "home/u"] + ["home/u/" + "deep/" * n for n in range(1, 31)]

    def parents(*names: str) -> list[E]:
        return [E(d, kind="dir") for d in names] if parent_dirs else []

    again = [data] if parent_dirs else []
    return [
        layer_tar(
            [
                E("bin", kind="dir"),
                *parents("opt", "opt/old", "usr", "usr/bin", *deep),
                E("bin/sh", data=b"#!/bin/sh\n", mode=0o755),
                data,
                E("data/a", data=big[0], uid=1000, gid=1000),
                E("data/b", data=big[1], xattrs={"user.kind": "blob"}),
                E("data/link", kind="hardlink", link="data/a"),
                E("opt/old/x", data=b"x"),
                E("usr/bin/tool", data=b"t", mode=0o4755),
                E("home/u/" + "deep/" * 30 + "leaf", data=b"deep"),
            ]
        ),
        layer_tar(
            [
                *again,
                *parents("opt", "opt/old", "etc"),
                E("data/c", data=big[2]),
                E("data/.wh.b"),
                E("opt/old/.wh..wh..opq"),
                E("opt/old/y", data=b"y"),
                E("etc/alt", kind="symlink", link="../data/c"),
                E("empty", data=b""),
            ]
        ),
        layer_tar(
            [*again, *parents("data/more")]
            + [E(f"data/more/{i}", data=big[3 + i]) for i in range(3)]
            + [E("data/a", data=b"replaced")]
        ),
    ]


def test_multilayer_image_disk_holds_exactly_its_files(podman: Podman, tmp_path: Path) -> None:
    tag = "localhost/cwbuild-build-layers:latest"
    load = podman.load(docker_archive(tmp_path / "image.tar", _rich_layers(), repo_tag=tag))
    assert load.returncode == 0, load.stderr
    passfile, _ = passphrase_file(tmp_path / "s")
    out = tmp_path / "bundle"
    proc = build([tag, "-o", out, "--tee", "snp", "--passphrase-file", passfile], env=podman.env)
    assert proc.returncode == 0, proc.stderr.decode()
    opened: list[str | Path] = [
        "cryptsetup",
        "open",
        "--test-passphrase",
        "--key-file",
        passfile,
        out / "disk.img",
    ]
    ok = subprocess.run(opened, check=False)
    assert ok.returncode == 0
    with _mounted_disk(out / "disk.img", passfile, tmp_path) as mnt:
        got, got_groups = full_tree_dir(mnt)
    want, want_groups, _ = full_tree_tar(podman.export(tag, tmp_path / "export.tar"))
    assert set(got) - set(want) == ADDED
    for path in want:
        assert got[path] == want[path], path
    assert got_groups == want_groups
    assert "data/b" not in got
    assert got["data/a"][5] == b"replaced"


def test_tdx_bundle_registers_mrtd_and_rtmrs(
    server: Server, podman: Podman, hello_image: str, tmp_path: Path
) -> None:
    passfile, _ = passphrase_file(tmp_path / "s")
    out = tmp_path / "tdx"
    args: list[str | Path] = [hello_image, "-o", out, "--tee", "tdx", "--workload-id", "tdx-1"]
    args += ["--attestation-url", server.url, "--register-token-file", server.workdir / "token"]
    proc = build([*args, "--passphrase-file", passfile], env=podman.env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert cwbuild(["measure", "--bundle", out]).returncode == 0
    entry = json.loads((out / "measurement.json").read_text())["measurements"]["tdx"]
    assert (out / "firmware/OVMF.inteltdx.ms.fd").is_file()
    stored = _workload(server, "tdx-1").json()
    assert stored["tee"] == "tdx"
    assert stored["reference_values"] == [entry["mrtd"]]
    assert stored["policy"]["rtmr1"] == [entry["rtmr1"]]
    assert stored["policy"]["rtmr2"] == [entry["rtmr2"]]


def test_existing_registration_needs_replace_and_survives_a_refusal(
    server: Server, podman: Podman, hello_image: str, tmp_path: Path
) -> None:
    passfile, _ = passphrase_file(tmp_path / "s")
    base: list[str | Path] = [
        hello_image,
        "--tee",
        "sim",
        "--workload-id",
        "dup",
        "--passphrase-file",
        passfile,
    ]
    base += ["--attestation-url", server.url, "--register-token-file", server.workdir / "token"]
    assert build([*base, "-o", tmp_path / "first"], env=podman.env).returncode == 0
    first = _workload(server, "dup").json()["reference_values"]
    proc = build([*base, "-o", tmp_path / "second", "--cmdline", "console=ttyS0 changed"], env=podman.env)
    assert proc.returncode == 1
    assert b"workload.exists" in proc.stderr
    assert b"--replace" in proc.stderr
    assert not (tmp_path / "second").exists()
    assert _workload(server, "dup").json()["reference_values"] == first  # untouched by the refused build
    proc = build(
        [*base, "-o", tmp_path / "third", "--cmdline", "console=ttyS0 changed", "--replace"], env=podman.env
    )
    assert proc.returncode == 0, proc.stderr.decode()
    now = _workload(server, "dup").json()["reference_values"]
    assert now != first
    assert now == [
        json.loads((tmp_path / "third/measurement.json").read_text())["measurements"]["snp"]["measurement"]
    ]

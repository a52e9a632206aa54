"""`cwbuild disk encrypt|decrypt|inspect` as a user runs it: exit codes, secret files, no leftovers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import cwbuild

SECRET = b"a passphrase nobody should see"


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    p = tmp_path / "plain.img"
    p.write_bytes(os.urandom(64 * 1024))
    return p


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    p = tmp_path / "pass"
    p.write_bytes(SECRET + b"\n")
    p.chmod(0o600)
    return p


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_encrypt_inspect_decrypt_with_stdin_passphrase(plain: Path, tmp_path: Path) -> None:
    img, out = tmp_path / "d.img", tmp_path / "out"
    cfg = tmp_path / "krun.json"
    cfg.write_text(json.dumps({"tee": "snp", "workload_id": "w1"}))
    enc = ["disk", "encrypt", plain, img, "--passphrase-file", "-", "--kdf", "pbkdf2", "--krun-config", cfg]
    proc = cwbuild(enc, input=SECRET + b"\n")
    assert proc.returncode == 0, proc.stderr.decode()
    info = cwbuild(["disk", "inspect", img, "--json"])
    assert info.returncode == 0, info.stderr.decode()
    facts = json.loads(info.stdout)
    assert facts["version"] == 2
    assert facts["sector_size"] == 4096
    assert facts["krun_config"] == {"tee": "snp", "workload_id": "w1"}
    assert facts["keyslots"][0]["kdf"] == "pbkdf2-sha256, 1000 iterations"
    proc = cwbuild(["disk", "decrypt", img, out, "--passphrase-file", "-"], input=SECRET)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == plain.read_bytes()
    text = cwbuild(["disk", "inspect", img])
    assert b"keyslot 0: pbkdf2-sha256" in text.stdout
    again = cwbuild(["disk", "decrypt", img, out, "--passphrase-file", "-"], input=SECRET)
    assert again.returncode == 2  # OUT exists: refused without --force
    forced = cwbuild(["disk", "decrypt", img, out, "--passphrase-file", "-", "--force"], input=SECRET)
    assert forced.returncode == 0, forced.stderr.decode()


def test_generated_passphrase(plain: Path, tmp_path: Path) -> None:
    gen = tmp_path / "gen.pass"
    proc = cwbuild(["disk", "encrypt", plain, tmp_path / "d.img", "--generate-passphrase", gen])
    assert proc.returncode == 0, proc.stderr.decode()
    assert gen.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(gen.read_text())) == 32
    facts = json.loads(cwbuild(["disk", "inspect", tmp_path / "d.img", "--json"]).stdout)
    assert facts["keyslots"][0]["kdf"] == "pbkdf2-sha256, 1000 iterations"  # DESIGN.md: random key, cheap KDF
    again = cwbuild(["disk", "encrypt", plain, tmp_path / "e.img", "--generate-passphrase", gen])
    assert again.returncode == 1  # never overwrites a secret
    assert not (tmp_path / "e.img").exists()


def test_user_passphrase_defaults_to_argon2id(plain: Path, passfile: Path, tmp_path: Path) -> None:
    proc = cwbuild(["disk", "encrypt", plain, tmp_path / "d.img", "--passphrase-file", passfile])
    assert proc.returncode == 0, proc.stderr.decode()
    facts = json.loads(cwbuild(["disk", "inspect", tmp_path / "d.img", "--json"]).stdout)
    assert facts["keyslots"][0]["kdf"] == "argon2id, time 4, memory 65536 KiB, 2 cpus"


def test_group_readable_passphrase_refused(plain: Path, passfile: Path, tmp_path: Path) -> None:
    passfile.chmod(0o640)
    proc = cwbuild(["disk", "encrypt", plain, tmp_path / "d.img", "--passphrase-file", passfile])
    assert proc.returncode == 1
    assert b"group or others" in proc.stderr
    assert _files(tmp_path) == ["pass", "plain.img"]


@pytest.mark.parametrize(
    "extra",
    [
        [],  # neither passphrase flag
        ["--passphrase-file", "p", "--generate-passphrase", "q"],
        ["--passphrase-file", "-", "--format", "luks1", "--sector-size", "4096"],
        ["--passphrase-file", "-", "--format", "luks1", "--kdf", "argon2id"],
        ["--passphrase-file", "-", "--kdf", "pbkdf2", "--kdf-iterations", "10"],
        ["--passphrase-file", "-", "--kdf", "argon2id", "--kdf-memory", "8"],
        ["--passphrase-file", "-", "--sector-size", "300"],
    ],
)
def test_usage_errors(extra: list[str], plain: Path, tmp_path: Path) -> None:
    proc = cwbuild(["disk", "encrypt", plain, tmp_path / "d.img", *extra], input=SECRET)
    assert proc.returncode == 2, proc.stderr.decode()
    assert not (tmp_path / "d.img").exists()


def test_wrong_passphrase_leaves_nothing_and_leaks_nothing(
    plain: Path, passfile: Path, tmp_path: Path
) -> None:
    img = tmp_path / "d.img"
    assert (
        cwbuild(["disk", "encrypt", plain, img, "--passphrase-file", passfile, "--kdf", "pbkdf2"]).returncode
        == 0
    )
    proc = cwbuild(["disk", "decrypt", img, tmp_path / "out", "--passphrase-file", "-"], input=b"wrong guess")
    assert proc.returncode == 1
    assert b"no keyslot" in proc.stderr
    assert b"wrong guess" not in proc.stderr + proc.stdout
    assert _files(tmp_path) == ["d.img", "pass", "plain.img"]


def test_not_luks_is_a_format_error(plain: Path, tmp_path: Path) -> None:
    proc = cwbuild(["disk", "inspect", plain])
    assert proc.returncode == 1
    assert b"LUKS" in proc.stderr
    assert b"Traceback" not in proc.stderr

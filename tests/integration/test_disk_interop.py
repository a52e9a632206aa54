"""LUKS interop with the real tools, none of which needs device-mapper here:
cwbuild images pass cryptsetup's header and passphrase checks, cryptsetup's volume key decrypts our payload
(checked with `cryptography`, independently of cwbuild's reader), luksy decrypts our images, and we decrypt
luksy's and unlock cryptsetup's (pbkdf2 sha1/sha256/sha512, argon2i, argon2id)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cwbuild.disk.luks import read_header, unlock
from tests.conftest import ASSETS, cwbuild

pytestmark = pytest.mark.integration
LUKSY = ASSETS / "x/usr/bin/luksy"
PASS = b"correct horse battery staple"


def _need(tool: str) -> str:
    found = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found, f"{tool} not installed: scripts/setup.sh installs it"
    return found


def _cs(*args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [_need("cryptsetup"), *map(str, args)], input=input, capture_output=True, check=False, timeout=120
    )


def _encrypt(plaintext: Path, img: Path, passfile: Path, *opts: str) -> subprocess.CompletedProcess[bytes]:
    """`cwbuild disk encrypt PLAINTEXT IMG --passphrase-file PASSFILE OPTS...`"""
    return cwbuild(["disk", "encrypt", plaintext, img, "--passphrase-file", passfile, *opts])


def _dump_volume_key(img: Path, passphrase: bytes) -> bytes:
    proc = _cs("luksDump", "--dump-volume-key", "-q", "--key-file=-", img, input=passphrase)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    m = re.search(r"MK dump:\s*((?:\s*[0-9a-f]{2})+)", text)
    assert m, text
    return bytes.fromhex(m.group(1).replace(" ", "").replace("\n", "").replace("\t", ""))


def _independent_decrypt(img: Path, key: bytes, offset: int, sector: int, length: int) -> bytes:
    """AES-XTS per sector with `cryptography`; dm-crypt IVs count 512-byte units (no iv_large_sectors)."""
    data = img.read_bytes()[offset : offset + length]
    out = bytearray()
    for i in range(len(data) // sector):
        iv = (i * sector // 512).to_bytes(16, "little")
        d = Cipher(algorithms.AES(key), modes.XTS(iv)).decryptor()
        out += d.update(data[i * sector : (i + 1) * sector]) + d.finalize()
    return bytes(out)


@pytest.fixture
def plaintext(tmp_path: Path) -> Path:
    p = tmp_path / "plain.img"
    p.write_bytes(os.urandom(4 * 1024 * 1024))
    return p


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    p = tmp_path / "pass"
    p.write_bytes(PASS + b"\n")  # one trailing newline is dropped (luksy's rule)
    p.chmod(0o600)
    return p


@pytest.mark.parametrize(
    ("fmt", "sector", "kdf"),
    [
        ("luks2", "4096", "pbkdf2"),
        ("luks2", "512", "pbkdf2"),
        ("luks1", "512", None),
        ("luks2", "4096", None),
    ],
)
def test_cwbuild_image_opens_with_cryptsetup_and_luksy(
    fmt: str, sector: str, kdf: str | None, plaintext: Path, passfile: Path, tmp_path: Path
) -> None:
    img = tmp_path / "disk.img"
    proc = _encrypt(
        plaintext, img, passfile, "--format", fmt, "--sector-size", sector, *(["--kdf", kdf] if kdf else [])
    )
    assert proc.returncode == 0, proc.stderr.decode()
    dump = _cs("luksDump", img)
    assert dump.returncode == 0, dump.stderr
    assert f"Version:       \t{fmt[-1]}" in dump.stdout.decode()
    if kdf is None and fmt == "luks2":
        assert "PBKDF:      argon2id" in dump.stdout.decode()  # a user passphrase gets argon2id
    assert _cs("open", "--test-passphrase", "--key-file=-", img, input=PASS).returncode == 0
    assert _cs("open", "--test-passphrase", "--key-file=-", img, input=b"wrong").returncode == 2
    key = _dump_volume_key(img, PASS)
    header = read_header(img)
    size = plaintext.stat().st_size
    assert _independent_decrypt(img, key, header.payload_offset, int(sector), size) == plaintext.read_bytes()
    assert LUKSY.exists(), "luksy not unpacked: scripts/setup.sh installs it"
    out = tmp_path / "luksy.out"
    run = subprocess.run(
        [LUKSY, "decrypt", "--password-file", passfile, "-f", img, out],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == plaintext.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("v1", [True, False])
def test_cwbuild_decrypts_luksy_images(v1: bool, plaintext: Path, passfile: Path, tmp_path: Path) -> None:
    assert LUKSY.exists(), "luksy not unpacked: scripts/setup.sh installs it"
    img = tmp_path / "luksy.img"
    cmd = [LUKSY, "encrypt", "--password-file", passfile, *(["--luks1"] if v1 else []), "-f", plaintext, img]
    run = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    proc = cwbuild(["disk", "decrypt", img, tmp_path / "out", "--passphrase-file", passfile])
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "out").read_bytes() == plaintext.read_bytes()


@pytest.mark.parametrize(
    "opts",
    [
        ["--type", "luks1", "--hash", "sha256", "--pbkdf-force-iterations", "1000"],
        ["--type", "luks1", "--hash", "sha1", "--pbkdf-force-iterations", "1000"],
        ["--type", "luks2", "--pbkdf", "pbkdf2", "--hash", "sha512", "--pbkdf-force-iterations", "1000"],
        [
            "--type",
            "luks2",
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "32768",
            "--pbkdf-force-iterations",
            "4",
        ],
        ["--type", "luks2", "--pbkdf", "argon2i", "--pbkdf-memory", "16384", "--pbkdf-force-iterations", "5"],
        [
            "--type",
            "luks2",
            "--sector-size",
            "4096",
            "--key-size",
            "256",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ],
    ],
    ids=[
        "luks1-sha256",
        "luks1-sha1",
        "luks2-pbkdf2-sha512",
        "luks2-argon2id",
        "luks2-argon2i",
        "luks2-aes128",
    ],
)
def test_cryptsetup_headers_unlock_to_the_same_volume_key(opts: list[str], tmp_path: Path) -> None:
    img = tmp_path / "cs.img"
    with img.open("wb") as f:
        f.truncate(20 * 1024 * 1024)
    fmt = _cs("luksFormat", "-q", *opts, "--key-file=-", img, input=PASS)
    assert fmt.returncode == 0, fmt.stderr
    expected = _dump_volume_key(img, PASS)
    header = read_header(img)
    assert unlock(img, header, PASS) == expected
    with pytest.raises(Exception, match="no keyslot"):
        unlock(img, header, b"not it")


def test_cryptsetup_verifies_both_luks2_header_checksums(
    plaintext: Path, passfile: Path, tmp_path: Path
) -> None:
    img = tmp_path / "disk.img"
    proc = _encrypt(plaintext, img, passfile, "--kdf", "pbkdf2")
    assert proc.returncode == 0, proc.stderr.decode()
    dump = _cs("luksDump", "--debug", img)
    assert dump.returncode == 0, dump.stderr
    pairs = re.findall(
        r"Checksum:([0-9a-f]{64}) \(on-disk\)\n# Checksum:([0-9a-f]{64}) \(in-memory\)", dump.stdout.decode()
    )
    assert len(pairs) == 2, dump.stdout.decode()[:2000]  # primary and secondary header both read
    assert all(on_disk == computed for on_disk, computed in pairs)
    raw = bytearray(img.read_bytes())
    raw[5000] ^= 0xFF  # break the primary's JSON: cryptsetup must fall back to our secondary copy
    img.write_bytes(bytes(raw))
    assert _cs("open", "--test-passphrase", "--key-file=-", img, input=PASS).returncode == 0


@pytest.mark.parametrize("fmt", ["luks2", "luks1"])
def test_cryptsetup_adds_a_key_to_our_header_and_we_read_it(
    fmt: str, plaintext: Path, passfile: Path, tmp_path: Path
) -> None:
    """cryptsetup validates our metadata before it writes (new keyslot, LUKS2 seqid bump, both copies)."""
    img = tmp_path / "disk.img"
    assert _encrypt(plaintext, img, passfile, "--format", fmt, "--kdf", "pbkdf2").returncode == 0
    second = tmp_path / "second"
    second.write_bytes(b"another passphrase")
    second.chmod(0o600)
    opts = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    add = _cs("luksAddKey", "-q", *opts, "--key-file=-", img, second, input=PASS)
    assert add.returncode == 0, add.stderr
    header = read_header(img)
    assert [k.index for k in header.keyslots] == [0, 1]
    if fmt == "luks2":
        assert header.seqid > 1
    out = tmp_path / "out"
    proc = cwbuild(["disk", "decrypt", img, out, "--passphrase-file", second])
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == plaintext.read_bytes()

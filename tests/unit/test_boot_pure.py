"""Kit and initrd building blocks that need neither network nor external tools."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cwbuild.boot import cpio, deb, debian, elf
from cwbuild.boot.fetch import parse_config, usr_path
from cwbuild.boot.kit import KIT_FORMAT, Kit, kit_id, parse_manifest
from cwbuild.errors import FormatError, KitError
from tests.conftest import ASSETS

RELEASE = b"""Origin: Debian
Suite: unstable
Codename: sid
Date: Fri, 30 Oct 2026 08:08:01 UTC
Valid-Until: Fri, 06 Nov 2026 08:08:01 UTC
SHA256:
 28476c952cd0732e0ba28e3c14fbb9a8beb412eb2b3cb96bf9d067d54caacf1b 10824484 main/binary-amd64/Packages.xz
"""


def test_release_parsed_and_checked_like_apt() -> None:
    rel = debian.parse_release(RELEASE)
    assert rel.sha256["main/binary-amd64/Packages.xz"][1] == 10824484
    inside = datetime(2026, 11, 1, tzinfo=UTC)
    debian.check_release(rel, suite="sid", now=inside, allow_expired=False)
    debian.check_release(rel, suite="unstable", now=inside, allow_expired=False)
    with pytest.raises(KitError, match="expired"):
        debian.check_release(rel, suite="sid", now=datetime(2026, 11, 28, tzinfo=UTC), allow_expired=False)
    debian.check_release(rel, suite="sid", now=datetime(2026, 11, 28, tzinfo=UTC), allow_expired=True)
    with pytest.raises(KitError, match="not valid yet"):
        debian.check_release(rel, suite="sid", now=datetime(2026, 10, 1, tzinfo=UTC), allow_expired=True)
    with pytest.raises(KitError, match="not 'trixie'"):
        debian.check_release(rel, suite="trixie", now=inside, allow_expired=False)


def test_release_without_hashes_or_with_bad_line_refused() -> None:
    with pytest.raises(FormatError):
        debian.parse_release(b"Suite: sid\n")
    with pytest.raises(FormatError):
        debian.parse_release(b"SHA256:\n nothex 12 main/binary-amd64/Packages\n")


def _stanza(name: str, version: str, deps: str = "", provides: str = "") -> str:
    lines = [f"Package: {name}", f"Version: {version}", "Architecture: amd64"]
    if deps:
        lines.append(f"Depends: {deps}")
    if provides:
        lines.append(f"Provides: {provides}")
    lines += [f"Filename: pool/main/{name}_{version}_amd64.deb", "Size: 10", "SHA256: " + "ab" * 32]
    return "\n".join(lines) + "\n"


def _suite(*stanzas: str) -> debian.Suite:
    text = "\n".join(stanzas).encode()
    packages, provides = debian.parse_packages(text, suite="test")
    return debian.Suite("test", debian.parse_release(RELEASE), packages, provides)


def test_closure_follows_alternatives_provides_and_highest_version() -> None:
    suite = _suite(
        _stanza("app", "1.0", "liba (>= 1) | libmissing, virt, libc6:any"),
        _stanza("liba", "1.0", "libc6"),
        _stanza("liba", "1.2~rc1", "libc6"),
        _stanza("realvirt", "3", provides="virt (= 3)"),
        _stanza("libc6", "2.41-12"),
    )
    assert suite.packages["liba"].version == "1.2~rc1"
    assert [p.name for p in debian.closure(suite, ["app"])] == ["app", "liba", "libc6", "realvirt"]
    broken = _suite(_stanza("app", "1", "nothere | alsonot"))
    with pytest.raises(KitError, match="no installable candidate"):
        debian.closure(broken, ["app"])


def test_packages_with_traversal_filename_refused() -> None:
    bad = _stanza("x", "1").replace("pool/main/x_1_amd64.deb", "pool/../../etc/passwd")
    index, _ = debian.parse_packages(bad.encode(), suite="t")
    with pytest.raises(FormatError):
        index["x"]  # stanzas are parsed, and refused, when used


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        # deb-version(5) examples: '~' sorts before the empty string, letters before non-letters
        ("1.0~rc1", "1.0", -1),
        ("1.0", "1.0+b1", -1),
        ("1:1.0", "2.0", 1),
        ("2.41-12+deb13u5", "2.41-12+deb13u10", -1),
        ("1.0-1", "1.0-1", 0),
        ("6.12.117-1", "6.12.107-1", 1),
    ],
)
def test_version_order(a: str, b: str, want: int) -> None:
    assert debian.compare_versions(a, b) == want
    assert debian.compare_versions(b, a) == -want


def test_index_digest_mismatch_refused() -> None:
    rel = debian.Release({}, {"main/binary-amd64/Packages": ("00" * 32, 3)})
    with pytest.raises(KitError, match="sha256 does not match"):
        debian.verify_index(rel, "Packages", b"abc")


def test_cpio_sorted_with_parents_and_deterministic() -> None:
    entries = {
        "usr/bin/tool": cpio.Entry.file(b"#!/bin/sh\n", 0o755),
        "bin": cpio.Entry.symlink("usr/bin"),
        "etc/a": cpio.Entry.file(b"a"),
    }
    one = cpio.write_newc(entries)
    two = cpio.write_newc(dict(reversed(entries.items())))
    assert one == two
    names = []
    pos = 0
    while True:
        hdr = one[pos : pos + cpio.HEADER_SIZE]
        assert hdr[:6] == cpio.NEWC_MAGIC
        namesize, filesize = int(hdr[94:102], 16), int(hdr[54:62], 16)
        name = one[pos + 110 : pos + 110 + namesize - 1].decode()
        names.append(name)
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize + (-filesize % 4)
        if name == cpio.TRAILER:
            break
    assert names == ["bin", "etc", "etc/a", "usr", "usr/bin", "usr/bin/tool", cpio.TRAILER]
    assert pos == len(one)
    assert len(one) % 4 == 0


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "", "."])
def test_cpio_refuses_escaping_paths(bad: str) -> None:
    with pytest.raises(FormatError):
        cpio.write_newc({bad: cpio.Entry.file(b"x")})


def test_cpio_refuses_file_as_parent() -> None:
    with pytest.raises(FormatError):
        cpio.write_newc({"a": cpio.Entry.file(b"x"), "a/b": cpio.Entry.file(b"y")})


def _deb(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    payload = buf.getvalue()

    def ar_member(name: str, data: bytes) -> bytes:
        hdr = f"{name:<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}".encode() + b"`\n"
        return hdr + data + (b"\n" if len(data) % 2 else b"")

    return deb.AR_MAGIC + ar_member("debian-binary", b"2.0\n") + ar_member("data.tar", payload)


def test_deb_members_read_and_traversal_refused() -> None:
    members = list(deb.data_members(_deb([("./usr/bin/x", b"hello")])))
    assert [(m.path, m.data) for m in members] == [("usr/bin/x", b"hello")]
    with pytest.raises(FormatError, match="escapes"):
        list(deb.data_members(_deb([("./../../etc/x", b"evil")])))
    with pytest.raises(FormatError, match="truncated"):
        deb.ar_members(_deb([("./x", b"y" * 100)])[:-40])
    with pytest.raises(FormatError):
        deb.ar_members(b"not an ar archive")


def test_elf_garbage_refused() -> None:
    with pytest.raises(FormatError):
        elf.dynamic(b"\x7fELF" + b"\0" * 10)
    with pytest.raises(FormatError):
        elf.dynamic(b"MZ" + b"\0" * 100)


def test_merged_usr_paths() -> None:
    assert usr_path("lib/x86_64-linux-gnu/libc.so.6") == "usr/lib/x86_64-linux-gnu/libc.so.6"
    assert usr_path("lib64/ld-linux-x86-64.so.2") == "usr/lib64/ld-linux-x86-64.so.2"
    assert usr_path("library/x") == "library/x"
    assert usr_path("usr/bin/curl") == "usr/bin/curl"


def _manifest(configfs_tsm: bool, config: dict[str, str]) -> dict[str, object]:
    kernel = {"version": "v", "vmlinuz": "boot/vmlinuz", "modules": "modules", "configfs_tsm": configfs_tsm}
    return {
        "format": KIT_FORMAT,
        "release": "r",
        "kernel": {**kernel, "config": config},
        "firmware": {},
        "userland": {"root": "userland"},
        "packages": [],
        "files": {"boot/vmlinuz": {"sha256": "00" * 32, "size": 1}},
    }


def test_bookworm_kernel_refused_for_snp_and_tdx() -> None:
    config_path = next((ASSETS / "kernel" / "boot").glob("config-6.1*"), None)
    assert config_path is not None, "bookworm kernel asset missing: run scripts/setup.sh"
    flags = parse_config(config_path.read_bytes())
    assert "CONFIG_TSM_REPORTS" not in flags  # bookworm's 6.1 predates configfs-tsm (Linux 6.7)
    opts = {o: flags.get(o, "n") for o in ("CONFIG_SEV_GUEST", "CONFIG_TDX_GUEST_DRIVER")}
    manifest = parse_manifest(_canonical(_manifest(False, opts)))
    kit = Kit(kit_id(manifest), Path("/nonexistent"), manifest)
    for tee in ("snp", "tdx"):
        assert not kit.supports(tee)
        with pytest.raises(KitError, match="configfs-tsm"):
            kit.require(tee)
    good = Kit("x", Path("/n"), _manifest(True, {"CONFIG_SEV_GUEST": "m", "CONFIG_TDX_GUEST_DRIVER": "m"}))
    good.require("snp")
    good.require("tdx")


def _canonical(m: dict[str, object]) -> bytes:
    import json

    return json.dumps(m).encode()


def test_manifest_with_escaping_path_refused() -> None:
    m = _manifest(True, {})
    m["files"] = {"../evil": {"sha256": "00" * 32, "size": 1}}
    with pytest.raises(FormatError):
        parse_manifest(_canonical(m))


# gpgv 2.2.40 --status-fd output for trixie's InRelease of 2026-11-21 (three signatures), captured here
# (status lines are long by nature).
_SIG_BOOKWORM = (
    "[GNUPG:] NEWSIG\n"
    "[GNUPG:] GOODSIG 6ED0E7B82643E131 Debian Archive Automatic Signing Key (12/bookworm) "
    "<ftpmaster@debian.org>\n"
    "[GNUPG:] VALIDSIG 4CB50190207B4758A3F73A796ED0E7B82643E131 2026-11-21 1795252580 0 4 0 1 8 01 "
    "B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8\n"
)
_SIG_UNKNOWN = (
    "[GNUPG:] NEWSIG\n"
    "[GNUPG:] ERRSIG 78DBA3BC47EF2265 1 8 01 1795252581 9 B8E5F13176D2A7A75220028078DBA3BC47EF2265\n"
    "[GNUPG:] NO_PUBKEY 78DBA3BC47EF2265\n"
)
_SIG_RELEASE = (
    "[GNUPG:] NEWSIG\n"
    "[GNUPG:] KEY_CONSIDERED 41587F7DB8C774BCCF131416762F67A0B2C39DE4 0\n"
    "[GNUPG:] GOODSIG 762F67A0B2C39DE4 Debian Stable Release Key (13/trixie) "
    "<debian-release@lists.debian.org>\n"
    "[GNUPG:] VALIDSIG 41587F7DB8C774BCCF131416762F67A0B2C39DE4 2026-11-21 1795252690 0 4 0 22 8 01 "
    "41587F7DB8C774BCCF131416762F67A0B2C39DE4\n"
)


def test_signature_judged_like_apt() -> None:
    assert debian.signature_problem(_SIG_BOOKWORM + _SIG_RELEASE) is None
    assert debian.signature_problem(_SIG_UNKNOWN + _SIG_RELEASE) is None  # an unknown extra key is ignored
    assert debian.signature_problem(_SIG_UNKNOWN) == "no good signature by a key in the keyring"
    assert debian.signature_problem("") == "no good signature by a key in the keyring"
    bad = "[GNUPG:] NEWSIG\n[GNUPG:] BADSIG 762F67A0B2C39DE4 Debian Stable Release Key\n"
    assert debian.signature_problem(_SIG_RELEASE + bad) == "bad signature"
    unexplained = _SIG_UNKNOWN.replace("[GNUPG:] NO_PUBKEY 78DBA3BC47EF2265\n", "")
    assert debian.signature_problem(_SIG_RELEASE + unexplained) == "signature could not be checked"
    sha1 = _SIG_RELEASE.replace(" 0 4 0 22 8 01 ", " 0 4 0 22 2 01 ")  # hash algo 2 = SHA-1
    assert debian.signature_problem(sha1) == "no good signature by a key in the keyring"
    expired = _SIG_RELEASE.replace("GOODSIG", "EXPKEYSIG")
    assert debian.signature_problem(expired) == "no good signature by a key in the keyring"


def test_module_decompression_formats_and_corruption() -> None:
    import gzip
    import lzma

    import zstandard

    from cwbuild.boot.modules import decompress, module_name

    payload = b"\x7fELF" + bytes(range(256)) * 8
    assert decompress("a.ko.xz", lzma.compress(payload, check=lzma.CHECK_CRC32)) == payload
    assert decompress("a.ko.zst", zstandard.ZstdCompressor().compress(payload)) == payload
    assert decompress("a.ko.gz", gzip.compress(payload)) == payload
    assert decompress("a.ko", payload) == payload
    for name, blob in (
        ("a.ko.xz", b"\xfd7zXZ\0garbage"),
        ("a.ko.gz", b"\x1f\x8bgarbage"),
        ("a.ko.zst", b"junk"),
    ):
        with pytest.raises(FormatError):
            decompress(name, blob)
    assert module_name("kernel/drivers/virt/coco/sev-guest/sev-guest.ko.xz") == "sev_guest"
    with pytest.raises(FormatError):
        module_name("kernel/x/readme.txt")

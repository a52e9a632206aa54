"""Kits: a real fetched kit, the signature chain against tampered copies, export/import, and ELF, .deb and
module parsing checked against independent tools (readelf, dpkg-deb, dpkg, kmod's modinfo)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import re
import subprocess
import tarfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from cwbuild.boot import deb, debian, elf
from cwbuild.boot.fetch import FetchOptions, ensure_kit
from cwbuild.boot.kit import FILES, MANIFEST, Kit, kits_dir, verify_files
from cwbuild.boot.modules import DEFAULT_MODULES, ModuleTree
from cwbuild.errors import KitError
from tests.conftest import cwbuild
from tests.kits import Sample, archive_sample, cached_kit

pytestmark = pytest.mark.integration
Index = tuple[debian.Release, bytes, Mapping[str, debian.Package]]


@pytest.fixture(scope="session")
def kit() -> Kit:
    return cached_kit()


@pytest.fixture(scope="session")
def sample() -> Sample:
    return archive_sample()


@pytest.fixture(scope="session")
def index(sample: Sample) -> Index:
    """The sample's verified release, Packages text and packages (the whole apt chain, once)."""
    signed = debian.verify_inrelease(sample.inrelease.read_bytes(), keyring=debian.DEFAULT_KEYRING)
    release = debian.parse_release(signed)
    text = debian.verify_index(release, "Packages.xz", sample.packages_xz.read_bytes())
    return release, text, debian.parse_packages(text, suite="trixie")[0]


# --- the signature chain -------------------------------------------------------------------------------


def test_chain_accepts_the_real_files(sample: Sample, index: Index) -> None:
    debian.verify_deb(index[2]["libkeyutils1"], sample.deb.read_bytes())


def test_tampered_inrelease_refused(sample: Sample) -> None:
    raw = sample.inrelease.read_bytes()
    digest = debian.parse_release(debian.verify_inrelease(raw, keyring=debian.DEFAULT_KEYRING)).sha256[
        debian.index_path("Packages.xz")
    ][0]
    swapped = raw.replace(digest.encode(), b"0" * 64, 1)
    assert swapped != raw
    with pytest.raises(KitError, match="signature verification failed"):
        debian.verify_inrelease(swapped, keyring=debian.DEFAULT_KEYRING)


def test_text_outside_the_signature_is_never_parsed(sample: Sample) -> None:
    raw = sample.inrelease.read_bytes()
    forged = b"SHA256:\n " + b"f" * 64 + b" 1 main/binary-amd64/Packages.xz\n\n"
    for variant in (forged + raw, raw + b"\n" + forged):
        try:
            signed = debian.verify_inrelease(variant, keyring=debian.DEFAULT_KEYRING)
        except KitError:
            continue  # refusing is fine too
        assert b"f" * 64 not in signed
        assert (
            debian.parse_release(signed).sha256
            == debian.parse_release(debian.verify_inrelease(raw, keyring=debian.DEFAULT_KEYRING)).sha256
        )


def test_inrelease_signed_by_unknown_key_refused(sample: Sample) -> None:
    # bookworm's release key alone does not sign trixie's InRelease
    other = Path("/usr/share/keyrings/debian-archive-bookworm-stable.gpg")
    with pytest.raises(KitError, match="signature verification failed"):
        debian.verify_inrelease(sample.inrelease.read_bytes(), keyring=other)


def test_one_good_signature_is_enough(sample: Sample) -> None:
    # like apt: the stable release key alone verifies; the automatic keys' signatures are then NO_PUBKEY
    only_release_key = Path("/usr/share/keyrings/debian-archive-trixie-stable.gpg")
    assert debian.verify_inrelease(sample.inrelease.read_bytes(), keyring=only_release_key).startswith(
        b"Origin:"
    )


def test_tampered_packages_refused(index: Index) -> None:
    release, text, packages = index
    pkg = packages["libkeyutils1"]
    forged = text.replace(pkg.sha256.encode(), hashlib.sha256(b"evil").hexdigest().encode())
    assert forged != text
    debian.verify_index(release, "Packages", text)  # the uncompressed index, as InRelease lists it
    with pytest.raises(KitError, match="sha256 does not match InRelease"):
        debian.verify_index(release, "Packages", forged)


def test_tampered_deb_refused(sample: Sample, index: Index) -> None:
    pkg = index[2]["libkeyutils1"]
    blob = bytearray(sample.deb.read_bytes())
    blob[-100] ^= 0x01
    with pytest.raises(KitError, match=r"\.deb sha256 does not match"):
        debian.verify_deb(pkg, bytes(blob))


# --- independent tools ---------------------------------------------------------------------------------


def test_deb_members_match_dpkg_deb(sample: Sample) -> None:
    ours = {m.path for m in deb.data_members(sample.deb.read_bytes()) if m.kind is not deb.Kind.DIR}
    listing = subprocess.run(
        ["dpkg-deb", "-c", sample.deb], capture_output=True, check=True, text=True
    ).stdout
    theirs = {
        re.split(r"\s+", line, maxsplit=5)[5].split(" -> ")[0].removeprefix("./")
        for line in listing.splitlines()
    }
    theirs = {p for p in theirs if p and not p.endswith("/")}
    assert ours == theirs


@pytest.mark.parametrize(
    ("a", "b"),
    [("1.0~rc1", "1.0"), ("2:1.0", "1:9"), ("1.2.3a", "1.2.3+b1"), ("0.18+ds-1", "0.18-1"), ("1.0", "1.0")],
)
def test_version_order_matches_dpkg(a: str, b: str) -> None:
    def dpkg(op: str) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", a, op, b], check=False).returncode == 0

    want = -1 if dpkg("lt") else (0 if dpkg("eq") else 1)
    assert debian.compare_versions(a, b) == want


def test_elf_needed_matches_readelf(kit: Kit) -> None:
    for prog in ("usr/bin/curl", "usr/lib/x86_64-linux-gnu/libcurl.so.4", "usr/sbin/cryptsetup"):
        path = kit.path(f"userland/{prog}")
        ours = elf.dynamic(path.read_bytes(), prog)
        dyn = subprocess.run(["readelf", "-dW", path], capture_output=True, check=True, text=True).stdout
        assert list(ours.needed) == re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn)
        seg = subprocess.run(["readelf", "-lW", path], capture_output=True, check=True, text=True).stdout
        interp = re.findall(r"Requesting program interpreter: ([^\]]+)\]", seg)
        assert ours.interpreter == (interp[0] if interp else None)
    assert elf.dynamic(kit.path("userland/usr/bin/busybox").read_bytes()).needed == ()  # static


def test_module_closure_matches_modinfo(kit: Kit) -> None:
    tree = ModuleTree.from_dir(kit.modules_dir)
    loaded = tree.closure(DEFAULT_MODULES)
    names = [m.name for m in loaded]
    for m in loaded:
        src = kit.modules_dir / tree.paths[m.name]
        out = subprocess.run(
            ["modinfo", "-F", "depends", src], capture_output=True, check=True, text=True
        ).stdout
        deps = {d.replace("-", "_") for d in out.strip().split(",") if d}
        assert set(m.depends) == deps
        assert all(names.index(d) < names.index(m.name) for d in deps if d not in tree.builtin)
    assert {"dm_crypt", "dm_mod", "xts", "tsm", "sev_guest", "tdx_guest", "virtio_blk"} <= set(names)
    assert "virtio_pci" not in names  # built in (modules.builtin)
    with pytest.raises(KitError, match="neither a module nor built in"):
        tree.closure(["no_such_module"])


# --- the kit -------------------------------------------------------------------------------------------


def test_kit_is_content_addressed_and_pinned(kit: Kit) -> None:
    raw = (kit.root / MANIFEST).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == kit.id
    verify_files(kit)
    m = kit.manifest
    assert m["kernel"]["version"].startswith("6.12.")
    assert m["kernel"]["configfs_tsm"] is True
    assert kit.supports("snp")
    assert kit.supports("tdx")
    for pkg in m["packages"]:
        assert re.fullmatch(r"[0-9a-f]{64}", pkg["sha256"])
        assert pkg["version"]
    names = {p["name"]: p for p in m["packages"]}
    assert {
        "busybox-static",
        "cryptsetup-bin",
        "curl",
        "openssl",
        "libc6",
        "ovmf-amdsev",
        "ovmf-inteltdx",
    } <= set(names)
    assert names["libc6"]["suite"] == "trixie"
    assert kit.firmware("snp").stat().st_size == kit.firmware("tdx").stat().st_size == 4 * 1024 * 1024
    assert set(m["userland"]["origin"].values()) <= set(names)


def test_export_import_round_trip(kit: Kit, tmp_path: Path) -> None:
    src_cache = kit.store
    archive = tmp_path / "kit.tar.zst"
    proc = cwbuild(["kit", "export", "--cache", src_cache, "--kit", kit.id[:12], archive])
    assert proc.returncode == 0, proc.stderr.decode()
    other = tmp_path / "other-cache"
    proc = cwbuild(["kit", "import", "--cache", other, archive, "--json"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["id"] == kit.id
    listed = cwbuild(["kit", "list", "--cache", other, "--json"])
    assert [row["id"] for row in json.loads(listed.stdout)] == [kit.id]
    plain = tmp_path / "kit.tar"
    assert cwbuild(["kit", "export", "--cache", src_cache, plain]).returncode == 0
    again = cwbuild(["kit", "export", "--cache", src_cache, tmp_path / "kit2.tar"])
    assert again.returncode == 0
    assert plain.read_bytes() == (tmp_path / "kit2.tar").read_bytes()


def _rewrite_tar(src: Path, dest: Path, name: str, mutate: bytes) -> None:
    with tarfile.open(src) as tin, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tout:
        for info in tin:
            fh = tin.extractfile(info)
            assert fh is not None
            data = fh.read()
            if info.name == name:
                data = data[:-1] + mutate
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_import_refuses_tampered_file_and_leaves_nothing(kit: Kit, tmp_path: Path) -> None:
    plain = tmp_path / "kit.tar"
    assert cwbuild(["kit", "export", "--cache", kit.store, plain]).returncode == 0
    victim = f"{FILES}/userland/usr/bin/curl"
    bad = tmp_path / "bad.tar"
    _rewrite_tar(
        plain, bad, victim, b"\x00" if kit.path("userland/usr/bin/curl").read_bytes()[-1] else b"\x01"
    )
    other = tmp_path / "c"
    proc = cwbuild(["kit", "import", "--cache", other, bad])
    assert proc.returncode == 1
    assert b"does not match its sha256" in proc.stderr
    assert not [p for p in kits_dir(other).iterdir()]
    forged = tmp_path / "forged.tar"
    _rewrite_tar(plain, forged, MANIFEST, b" ")  # a corrupted manifest is refused
    proc = cwbuild(["kit", "import", "--cache", other, forged])
    assert proc.returncode == 1
    assert not [p for p in kits_dir(other).iterdir()]


# --- the CLI against a local mirror serving tampered copies (no network) ---------------------------------


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/debian", root / "debian"
    finally:
        server.shutdown()
        server.server_close()


def _serve(root: Path, sample: Sample, *, inrelease: bytes | None = None, index: bytes | None = None) -> None:
    dists = root / "dists" / "trixie"
    (dists / "main" / "binary-amd64").mkdir(parents=True)
    (dists / "InRelease").write_bytes(inrelease if inrelease is not None else sample.inrelease.read_bytes())
    (dists / "main" / "binary-amd64" / "Packages.xz").write_bytes(
        index if index is not None else sample.packages_xz.read_bytes()
    )


@pytest.mark.parametrize("what", ["inrelease", "index"])
def test_fetch_from_tampered_mirror_fails_and_leaves_nothing(
    mirror: tuple[str, Path], sample: Sample, tmp_path: Path, what: str
) -> None:
    url, root = mirror
    if what == "inrelease":
        raw = sample.inrelease.read_bytes()
        _serve(root, sample, inrelease=raw.replace(b"Debian 13", b"Debian 14", 1))
        expected = b"signature verification failed"
    else:
        blob = bytearray(sample.packages_xz.read_bytes())
        blob[1000] ^= 0xFF
        _serve(root, sample, index=bytes(blob))
        expected = b"sha256 does not match InRelease"
    cache = tmp_path / "cache"
    proc = cwbuild(["kit", "fetch", "--cache", cache, "--archive", url, "--allow-expired"])
    assert proc.returncode == 1
    assert expected in proc.stderr, proc.stderr.decode()
    assert not kits_dir(cache).exists() or not list(kits_dir(cache).iterdir())


def test_ensure_kit_uses_the_cache_and_honours_offline(kit: Kit, tmp_path: Path) -> None:
    assert ensure_kit(FetchOptions(cache=kit.store, release=kit.release), offline=True).id == kit.id
    with pytest.raises(KitError, match="--offline"):
        ensure_kit(FetchOptions(cache=tmp_path / "empty"), offline=True)


def test_export_without_kits_is_a_clear_error(tmp_path: Path) -> None:
    proc = cwbuild(["kit", "export", "--cache", tmp_path, tmp_path / "x.tar"])
    assert proc.returncode == 1
    assert b"no kit in" in proc.stderr
    assert not (tmp_path / "x.tar").exists()
    listed = cwbuild(["kit", "list", "--cache", tmp_path, "--json"])
    assert listed.returncode == 0
    assert json.loads(listed.stdout) == []


def test_verify_finds_a_modified_file(kit: Kit, tmp_path: Path) -> None:
    assert cwbuild(["kit", "verify", "--cache", kit.store, "--kit", kit.id]).returncode == 0
    archive = tmp_path / "kit.tar"
    assert cwbuild(["kit", "export", "--cache", kit.store, archive]).returncode == 0
    other = tmp_path / "copy"
    assert cwbuild(["kit", "import", "--cache", other, archive]).returncode == 0
    victim = other / "kits" / kit.id / FILES / "firmware" / "OVMF.amdsev.fd"
    data = bytearray(victim.read_bytes())
    data[4096] ^= 1
    victim.write_bytes(bytes(data))
    proc = cwbuild(["kit", "verify", "--cache", other])
    assert proc.returncode == 1
    assert b"firmware/OVMF.amdsev.fd does not match its sha256" in proc.stderr

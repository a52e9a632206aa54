"""The initrd: byte-reproducible, readable by GNU cpio, and it boots the kit's kernel under QEMU TCG with the
kit's modules and userland working inside the guest."""

from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from cwbuild.boot.initrd import MODULE_LIST, Compression, InitrdOptions, build_initrd
from cwbuild.boot.kit import Kit, export, import_kit
from cwbuild.errors import KitError
from tests.kits import cached_kit

pytestmark = pytest.mark.integration

TEST_INIT = b"""#!/bin/sh
export PATH=/usr/bin:/usr/sbin
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev
ok=1
while read -r m; do
  if ! busybox insmod "$m" 2>/tmp/err; then
    case "$m" in
      */sev-guest.ko|*/tdx-guest.ko) echo "no TEE here: $m";;  # they probe for their hardware
      *) echo "FAILED $m: $(cat /tmp/err)"; ok=0;;
    esac
  fi
done < /etc/cwbuild/modules
[ "$ok" = 1 ] && echo "modules ok"
busybox mount -t configfs configfs /sys/kernel/config
[ -d /sys/kernel/config/tsm ] && echo "configfs-tsm present"
cat /etc/workload-id
echo "busybox: $(busybox | busybox head -n 1)"
echo "cryptsetup: $(cryptsetup --version)"
echo "curl: $(curl --version | busybox head -n 1)"
echo "openssl: $(openssl version)"
echo "guest done"
busybox poweroff -f
"""


@pytest.fixture(scope="session")
def kit() -> Kit:
    return cached_kit()


def _build(
    kit: Kit,
    tmp: Path,
    *,
    workload: bytes = b"wl-1\n",
    cache: Path | None = None,
    compression: Compression = Compression.GZIP,
) -> tuple[Path, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "initrd.img"
    extra = {"etc/workload-id": workload}
    opts = InitrdOptions(compression=compression)
    info = build_initrd(
        kit, init_script=TEST_INIT, extra_files=extra, out=out, options=opts, cache=cache or tmp / "cache"
    )
    assert info.artifact.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    return out, info.kit_segment_sha256


def test_initrd_is_byte_reproducible(kit: Kit, tmp_path: Path) -> None:
    a, seg_a = _build(kit, tmp_path / "a")
    time.sleep(1.1)  # a different second: no timestamp may leak in
    b, seg_b = _build(kit, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert seg_a == seg_b
    cached, _ = _build(kit, tmp_path / "a")  # now from the cached kit segment
    assert cached.read_bytes() == b.read_bytes()
    other, seg_other = _build(kit, tmp_path / "c", workload=b"wl-2\n", cache=tmp_path / "a" / "cache")
    assert other.read_bytes() != a.read_bytes()
    assert seg_other == seg_a  # the workload never touches the kit's part


def test_initrd_same_after_export_import(kit: Kit, tmp_path: Path) -> None:
    imported = import_kit(_exported(kit, tmp_path), tmp_path / "other-cache")
    assert imported.id == kit.id
    assert imported.root != kit.root
    a, _ = _build(kit, tmp_path / "a")
    b, _ = _build(imported, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()


def test_initrd_refuses_a_modified_kit_file(kit: Kit, tmp_path: Path) -> None:
    imported = import_kit(_exported(kit, tmp_path), tmp_path / "c")
    victim = imported.path("userland/usr/bin/curl")
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(KitError, match="does not match its sha256"):
        _build(imported, tmp_path / "x")
    assert not (tmp_path / "x" / "initrd.img").exists()


def _exported(kit: Kit, tmp: Path) -> Path:
    archive = tmp / "kit.tar"
    if not archive.exists():
        export(kit, archive)
    return archive


def test_initrd_readable_by_gnu_cpio(kit: Kit, tmp_path: Path) -> None:
    img, _ = _build(kit, tmp_path)
    # two concatenated gzip members (RFC 1952 §2.2), one newc archive each; GNU cpio reads one per call
    blob = img.read_bytes()
    dec = zlib.decompressobj(wbits=31)
    first = dec.decompress(blob)
    assert dec.eof
    second = gzip.decompress(dec.unused_data)
    assert first + second == gzip.decompress(blob)
    listing = {}
    for part in (first, second):
        proc = subprocess.run(["cpio", "-itv", "--quiet"], input=part, capture_output=True, check=True)
        for line in proc.stdout.decode().splitlines():
            fields = line.split()
            name = fields[-3] if fields[0].startswith("l") else fields[-1]
            listing[name] = fields[0]
    assert listing["init"] == "-rwxr-xr-x"
    assert listing["etc/workload-id"] == "-rw-r--r--"
    assert listing["bin"].startswith("l")
    assert listing["dev/console"].startswith("c")
    assert listing["usr/bin/busybox"] == "-rwxr-xr-x"
    assert listing["usr/lib64/ld-linux-x86-64.so.2"].startswith("-")
    assert listing[MODULE_LIST] == "-rw-r--r--"
    assert any(re.search(r"/dm-crypt\.ko$", n) for n in listing)


@pytest.mark.slow
@pytest.mark.parametrize("compression", list(Compression))
def test_initrd_boots_kit_kernel_under_tcg(kit: Kit, tmp_path: Path, compression: Compression) -> None:
    img, _ = _build(kit, tmp_path, compression=compression)
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "512", "-nographic", "-no-reboot"]
    argv += ["-kernel", str(kit.vmlinuz), "-initrd", str(img), "-append", "console=ttyS0 panic=-1 quiet"]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=300, check=False)
    elapsed = time.monotonic() - started
    out = proc.stdout.decode("utf-8", "replace")
    assert "guest done" in out, out[-3000:]
    assert "modules ok" in out, out[-3000:]
    assert "configfs-tsm present" in out
    assert "wl-1" in out
    versions = {p["name"]: p["version"] for p in kit.manifest["packages"]}

    def upstream(pkg: str) -> str:
        return str(versions[pkg]).split(":", 1)[-1].rsplit("-", 1)[0]

    assert f"BusyBox v{upstream('busybox-static')}" in out
    assert f"cryptsetup: cryptsetup {upstream('cryptsetup-bin')}" in out
    assert f"curl: curl {upstream('curl')}" in out
    assert f"openssl: OpenSSL {upstream('openssl').split('-')[0]}" in out
    print(f"TCG boot to poweroff ({compression}, {img.stat().st_size} bytes): {elapsed:.1f} s")

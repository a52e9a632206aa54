"""The payload checked by the kernel itself: a Debian cloud kernel boots under QEMU TCG with a small TEST
initrd (static busybox, dm-crypt/xts/virtio modules by their `depends=` closure, the host's cryptsetup with
its ldd-resolved libraries), opens cwbuild's LUKS2-4096, LUKS2-512 and LUKS1 images with dm-crypt and prints
the sha256 of each mapped device; each must equal the plaintext's. The product initrd lives in cwbuild.boot.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cwbuild.disk.kdf import KdfSpec, KdfType
from cwbuild.disk.luks import LuksFormat, LuksSpec, encrypt_image
from tests.conftest import ASSETS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KERNEL_ROOT = ASSETS / "kernel"
WANTED = ["dm-crypt", "xts", "ecb", "virtio_blk", "virtio_pci", "af_alg", "algif_skcipher"]
IMAGES = [("luks2", 4096), ("luks2", 512), ("luks1", 512)]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run/cryptsetup /tmp
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "INSMOD-FAILED $m"; done
export DM_DISABLE_UDEV=1
for d in vda vdb vdc; do
  if cryptsetup open --readonly --key-file /pass /dev/$d c$d; then
    echo "SHA $d $(sha256sum /dev/mapper/c$d | cut -d' ' -f1)"
  else
    echo "OPEN-FAILED $d"
  fi
done
echo CWBUILD-DONE
poweroff -f
"""


def _modules_dir() -> Path:
    dirs = sorted((KERNEL_ROOT / "lib/modules").glob("*"))
    assert dirs, f"no kernel modules under {KERNEL_ROOT}: scripts/setup.sh installs them"
    assert sorted((KERNEL_ROOT / "boot").glob("vmlinuz-*")), (
        f"no kernel under {KERNEL_ROOT}: run scripts/setup.sh"
    )
    return dirs[-1]


def _depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    m = re.search(rb"\0depends=([^\0]*)\0", data)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def _module_closure(moddir: Path) -> list[Path]:
    """Modules in load order: dependencies first (from each .ko's .modinfo `depends=`)."""
    index = {ko.name.removesuffix(".ko").replace("-", "_"): ko for ko in moddir.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str) -> None:
        ko = index[name.replace("-", "_")]
        if ko in order:
            return
        for dep in _depends(ko):
            visit(dep)
        order.append(ko)

    for name in WANTED:
        visit(name)
    return order


def _libraries(binary: str) -> list[Path]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout  # static: rc 1
    libs = [Path(m) for m in re.findall(r"(/\S+) \(0x", out)]
    return [lib for lib in libs if lib.exists()]


def _build_initrd(root: Path, out: Path, modules: list[Path], passphrase: bytes) -> None:
    for d in ("bin", "proc", "sys", "dev", "lib/modules", "lib64", "lib/x86_64-linux-gnu", "usr/sbin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    cryptsetup = shutil.which("cryptsetup", path="/usr/sbin:/sbin:/usr/bin")
    assert cryptsetup, "cryptsetup not installed"
    shutil.copy2(cryptsetup, root / "usr/sbin/cryptsetup")
    for lib in _libraries(cryptsetup) + _libraries("/bin/busybox"):  # busybox-static has none
        dest = (
            root / "lib64" / lib.name
            if lib.name.startswith("ld-linux")
            else root / "lib/x86_64-linux-gnu" / lib.name
        )
        shutil.copy2(lib.resolve(), dest)
    names = []
    for ko in modules:
        shutil.copy2(ko, root / "lib/modules" / ko.name)
        names.append(ko.name)
    (root / "modules.order").write_text("\n".join(names) + "\n")
    (root / "pass").write_bytes(passphrase)
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with out.open("wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            input="\n".join(files).encode(),
            cwd=root,
            stdout=f,
            check=True,
        )


def test_kernel_dm_crypt_opens_cwbuild_images(tmp_path: Path) -> None:
    assert shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 missing: scripts/setup.sh installs it"
    assert shutil.which("cpio"), "cpio missing: scripts/setup.sh installs it"
    moddir = _modules_dir()
    kernel = sorted((KERNEL_ROOT / "boot").glob("vmlinuz-*"))[-1]
    passphrase = os.urandom(16).hex().encode()
    expected = {}
    drives = []
    for i, (fmt, sector) in enumerate(IMAGES):
        plain = tmp_path / f"plain{i}"
        plain.write_bytes(os.urandom(3 * 1024 * 1024 + 4096 * i))
        spec = LuksSpec(LuksFormat(fmt), sector, KdfSpec(KdfType.PBKDF2))
        img = encrypt_image(plain, tmp_path / f"disk{i}.img", spec=spec, passphrase=passphrase).path
        expected["vd" + "abc"[i]] = hashlib.sha256(plain.read_bytes()).hexdigest()
        drives += ["-drive", f"file={img},if=virtio,format=raw,readonly=on"]
    initrd = tmp_path / "initrd.cpio"
    _build_initrd(tmp_path / "root", initrd, _module_closure(moddir), passphrase)
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-nographic",
        "-no-reboot",
        "-m",
        "512",
        "-kernel",
        str(kernel),
    ]
    argv += ["-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 quiet loglevel=3", *drives]
    proc = subprocess.run(argv, capture_output=True, timeout=300, check=False, stdin=subprocess.DEVNULL)
    console = proc.stdout.decode(errors="replace")
    assert "CWBUILD-DONE" in console, console[-3000:]
    got = dict(re.findall(r"SHA (vd[abc]) ([0-9a-f]{64})", console))
    assert got == expected, console[-3000:]

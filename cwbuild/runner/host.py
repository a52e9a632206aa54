"""Can this host launch a bundle confidentially as measured? (issue #7 item 1: refuse when it cannot)

SEV-SNP needs KVM with SNP enabled (`/dev/kvm`, `/dev/sev`, `/sys/module/kvm_amd/parameters/sev_snp` = Y);
TDX needs KVM with TDX (`/sys/module/kvm_intel/parameters/tdx` = Y). The firmware must be the file the
measurement was computed over (by sha256), and QEMU must be the version the launch configs assume.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cwbuild.errors import ConfigError, UsageError
from cwbuild.fileio import sha256_file
from cwbuild.launch.spec import Tee
from cwbuild.run import run
from cwbuild.runner.bundle import Bundle

SYS = Path("/sys/module")
_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")
_MINIMUM = re.compile(r"QEMU >= (\d+)\.(\d+)")


def _flag(path: Path) -> bool:
    try:
        return path.read_text().strip() in ("Y", "y", "1")
    except OSError:
        return False


def kvm_usable(dev: Path = Path("/dev/kvm")) -> bool:
    return dev.exists() and os.access(dev, os.R_OK | os.W_OK)


def check_tee_host(tee: Tee, *, root: Path = Path("/")) -> None:
    """Refuse unless this host's KVM offers `tee` (SNP or TDX)."""
    if not kvm_usable(root / "dev/kvm"):
        raise UsageError(f"this host cannot launch a {tee} guest: /dev/kvm is missing or not accessible")
    if tee is Tee.SNP:
        if not (root / "dev/sev").exists():
            raise UsageError("this host is not an SEV-SNP host: /dev/sev is missing", hint="try --tee sim")
        if not _flag(root / "sys/module/kvm_amd/parameters/sev_snp"):
            raise UsageError("this host's KVM has SEV-SNP disabled (kvm_amd sev_snp is not Y)")
    elif tee is Tee.TDX and not _flag(root / "sys/module/kvm_intel/parameters/tdx"):
        raise UsageError("this host is not a TDX host (kvm_intel tdx is not Y)", hint="try --tee sim")


def qemu_version(qemu: str, runner: Callable[..., Any] = run) -> tuple[int, int, int]:
    out = runner([qemu, "--version"]).stdout.decode("utf-8", "replace")
    m = _VERSION.search(out)
    if not m:
        raise ConfigError(f"cannot tell the version of {qemu}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_qemu(version: tuple[int, int, int], launch: dict[str, Any]) -> None:
    """The bundle's recorded QEMU: an exact `qemu_version` if recorded, else the minimum in `host`."""
    exact = launch.get("qemu_version")
    have = ".".join(map(str, version))
    if isinstance(exact, str) and exact:
        want = tuple(int(x) for x in re.findall(r"\d+", exact)[:3])
        if version[: len(want)] != want:
            raise ConfigError(f"the bundle was configured for QEMU {exact}, this host has {have}")
    for line in launch.get("host") or []:
        m = _MINIMUM.search(str(line))
        if m and version[:2] < (int(m.group(1)), int(m.group(2))):
            raise ConfigError(f"the bundle needs QEMU >= {m.group(1)}.{m.group(2)}, this host has {have}")


def check_firmware(bundle: Bundle, tee: Tee, firmware: str) -> None:
    """The firmware QEMU would load must be the one measured."""
    want = bundle.measured(tee).get("firmware_sha256")
    path = bundle.root / firmware
    have = sha256_file(path) if path.is_file() else "missing"
    if have != want:
        raise ConfigError(
            f"{firmware} (sha256 {have}) is not the firmware measurement.json assumes ({want})",
            hint="cwbuild measure --bundle DIR shows what changed",
        )

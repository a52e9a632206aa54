"""`cwbuild kit fetch`: build a kit from pinned, signature-checked Debian packages.

Kernel: the package the `linux-image-cloud-amd64` metapackage of the release depends on. Firmware:
`ovmf-amdsev` (OVMF.amdsev.fd) and `ovmf-inteltdx` (OVMF.inteltdx.ms.fd), from the release when it carries
them, else from sid (trixie does not). Userland: busybox-static, cryptsetup-bin, curl and openssl with the
shared libraries their ELF `DT_NEEDED` entries reach, taken from the Depends closure in the Packages index —
never from the build host. Paths are read merged-/usr (bin, sbin, lib, lib64 live under usr/).
"""

from __future__ import annotations

import logging
import posixpath
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cwbuild.boot import debian, elf
from cwbuild.boot.deb import Kind, Member, data_members
from cwbuild.boot.kit import (
    KIT_FORMAT,
    TEE_OPTIONS,
    TSM_OPTION,
    Kit,
    install,
    latest,
    staging_dir,
    write_file,
)
from cwbuild.errors import KitError

log = logging.getLogger("cwbuild.kit")

DEFAULT_RELEASE = "trixie"
FIRMWARE_FALLBACK_SUITE = "sid"
KERNEL_META = "linux-image-cloud-amd64"
USERLAND_ROOTS = ("busybox-static", "cryptsetup-bin", "curl", "openssl")
#: Programs of the initrd userland, by their merged-/usr path in the packages above.
PROGRAMS = ("usr/bin/busybox", "usr/sbin/cryptsetup", "usr/bin/curl", "usr/bin/openssl")
#: tee -> (package, firmware file name) (Debian edk2 packaging, debian/ovmf-amdsev.install etc.).
FIRMWARE = {"snp": ("ovmf-amdsev", "OVMF.amdsev.fd"), "tdx": ("ovmf-inteltdx", "OVMF.inteltdx.ms.fd")}
#: Where the dynamic loader looks without an ld.so.cache (glibc's multiarch system directories).
LIB_DIR = "usr/lib/x86_64-linux-gnu"
LIB_SEARCH = (LIB_DIR, "usr/lib64", "usr/lib")
KERNEL_CONFIG_OPTIONS = (
    TSM_OPTION,
    *TEE_OPTIONS.values(),
    "CONFIG_AMD_MEM_ENCRYPT",
    "CONFIG_INTEL_TDX_GUEST",
)
MAX_SYMLINK_HOPS = 40


@dataclass(frozen=True)
class FetchOptions:
    """What `kit fetch` was asked for."""

    cache: Path
    release: str = DEFAULT_RELEASE
    archive: debian.Archive = field(default_factory=debian.Archive)


@dataclass
class _Staged:
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)


def usr_path(path: str) -> str:
    """A package path as it lands on a merged-/usr system (bin -> usr/bin, lib64 -> usr/lib64, ...)."""
    for top in ("bin", "sbin", "lib", "lib64"):
        if path == top or path.startswith(top + "/"):
            return "usr/" + path
    return path


@dataclass(frozen=True)
class _Plan:
    """The pinned packages of a kit and where their indexes came from (the indexes themselves are dropped)."""

    kernel: debian.Package
    firmware: dict[str, debian.Package]
    userland: list[debian.Package]
    suites: dict[str, dict[str, str]]


def _plan(opts: FetchOptions) -> _Plan:
    suite = _suite(opts, opts.release)
    suites = {suite.name: suite}
    kernel = suite.get(_kernel_package(suite))
    firmware = {}
    for tee, (pkg_name, _) in FIRMWARE.items():
        if pkg_name not in suite.packages:
            fallback = suites.get(FIRMWARE_FALLBACK_SUITE) or _suite(opts, FIRMWARE_FALLBACK_SUITE)
            suites[fallback.name] = fallback
            firmware[tee] = fallback.get(pkg_name)
        else:
            firmware[tee] = suite.get(pkg_name)
    userland = debian.closure(suite, USERLAND_ROOTS)
    info = {
        name: {
            "inrelease_sha256": s.inrelease_sha256,
            "date": s.release.fields.get("Date", ""),
            "valid_until": s.release.fields.get("Valid-Until", ""),
        }
        for name, s in sorted(suites.items())
    }
    return _Plan(kernel, firmware, userland, info)


def fetch(opts: FetchOptions) -> Kit:
    """Fetch, verify and install a kit; returns it (an identical kit already cached is reused)."""
    started = time.monotonic()
    plan = _plan(opts)
    count = 1 + len(plan.firmware) + len(plan.userland)
    size = plan.kernel.size + sum(p.size for p in (*plan.firmware.values(), *plan.userland))
    log.info("fetching %d packages (%.1f MB), kernel %s", count, size / 1e6, plan.kernel.version)
    staging = staging_dir(opts.cache)
    try:
        staged = _Staged()
        kernel_info = _stage_kernel(opts.archive, plan.kernel, staging, staged)
        fw_paths = {
            tee: _stage_firmware(opts.archive, pkg, FIRMWARE[tee][1], staging, staged)
            for tee, pkg in plan.firmware.items()
        }
        _stage_userland(opts.archive, plan.userland, staging, staged)
        used = sorted({plan.kernel.name, *(p.name for p in plan.firmware.values()), *staged.origin.values()})
        roles = _roles(plan.kernel, plan.firmware, plan.userland)
        every = {p.name: (p, role) for role, pkgs in roles.items() for p in pkgs}
        manifest = {
            "format": KIT_FORMAT,
            "release": opts.release,
            "architecture": debian.ARCH,
            "kernel": kernel_info,
            "firmware": fw_paths,
            "userland": {"root": "userland", "programs": list(PROGRAMS), "origin": staged.origin},
            "packages": [_pkg_entry(*every[name]) for name in used],
            "files": staged.files,
        }
        provenance = _provenance(opts, plan.suites, sorted(every), time.monotonic() - started)
        kit = install(staging, opts.cache, manifest, provenance)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("kit %s: kernel %s, %d packages", kit.id, kit.kernel_version, len(used))
    return kit


def _suite(opts: FetchOptions, name: str) -> debian.Suite:
    log.info("verifying %s (InRelease, Packages)", name)
    return debian.fetch_suite(opts.archive, name)


def _kernel_package(suite: debian.Suite) -> str:
    meta = suite.get(KERNEL_META)
    for alts in meta.depends:
        for name in alts:
            if name.startswith("linux-image-") and name in suite.packages:
                return name
    raise KitError(f"{KERNEL_META} in {suite.name} depends on no kernel image")


def _roles(
    kernel: debian.Package, firmware: Mapping[str, debian.Package], userland: Iterable[debian.Package]
) -> dict[str, list[debian.Package]]:
    return {"kernel": [kernel], "firmware": list(firmware.values()), "userland": list(userland)}


def _pkg_entry(pkg: debian.Package, role: str) -> dict[str, Any]:
    return {
        "name": pkg.name,
        "version": pkg.version,
        "architecture": pkg.architecture,
        "suite": pkg.suite,
        "filename": pkg.filename,
        "sha256": pkg.sha256,
        "size": pkg.size,
        "role": role,
    }


def _provenance(
    opts: FetchOptions, suites: Mapping[str, Mapping[str, str]], closure: list[str], secs: float
) -> dict[str, Any]:
    return {
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "fetch_seconds": round(secs, 2),
        "archive": opts.archive.url,
        "keyring": str(opts.archive.keyring),
        "allow_expired": opts.archive.allow_expired,
        "suites": dict(suites),
        "closure": closure,
    }


def _download(archive: debian.Archive, pkg: debian.Package) -> list[Member]:
    log.debug("fetching %s %s (%d bytes)", pkg.name, pkg.version, pkg.size)
    return list(data_members(debian.fetch_deb(archive, pkg)))


def _license(pkg: debian.Package, member: Member, staging: Path, staged: _Staged) -> None:
    if member.kind is Kind.FILE and member.path == f"usr/share/doc/{pkg.name}/copyright":
        staged.files[f"licenses/{pkg.name}/copyright"] = write_file(
            staging, f"licenses/{pkg.name}/copyright", member.data
        )


# --- kernel --------------------------------------------------------------------------------------------


def _stage_kernel(
    archive: debian.Archive, pkg: debian.Package, staging: Path, staged: _Staged
) -> dict[str, Any]:
    members = _download(archive, pkg)
    vmlinuz = [m for m in members if m.kind is Kind.FILE and m.path.startswith("boot/vmlinuz-")]
    if len(vmlinuz) != 1:
        raise KitError(f"{pkg.name}: expected one boot/vmlinuz-*")
    version = vmlinuz[0].path.removeprefix("boot/vmlinuz-")
    config = next((m for m in members if m.path == f"boot/config-{version}"), None)
    if config is None:
        raise KitError(f"{pkg.name}: no boot/config-{version}")
    staged.files["boot/vmlinuz"] = write_file(staging, "boot/vmlinuz", vmlinuz[0].data)
    staged.files["boot/config"] = write_file(staging, "boot/config", config.data)
    prefix = f"usr/lib/modules/{version}/"
    for m in members:
        path = usr_path(m.path)
        if m.kind is Kind.FILE and path.startswith(prefix):
            rel = "modules/" + path[len(prefix) :]
            staged.files[rel] = write_file(staging, rel, m.data)
        _license(pkg, m, staging, staged)
    if not any(rel.startswith("modules/kernel/") for rel in staged.files):
        raise KitError(f"{pkg.name}: no modules under {prefix}")
    flags = parse_config(config.data)
    return {
        "package": pkg.name,
        "version": version,
        "vmlinuz": "boot/vmlinuz",
        "config_file": "boot/config",
        "modules": "modules",
        "config": {opt: flags.get(opt, "n") for opt in KERNEL_CONFIG_OPTIONS},
        "configfs_tsm": flags.get(TSM_OPTION) in ("y", "m"),
    }


def parse_config(data: bytes) -> dict[str, str]:
    """A kernel .config as option -> value ('y', 'm', a number or a quoted string)."""
    out = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            out[key] = value
    return out


# --- firmware ------------------------------------------------------------------------------------------


def _stage_firmware(
    archive: debian.Archive, pkg: debian.Package, name: str, staging: Path, staged: _Staged
) -> str:
    found = None
    for m in _download(archive, pkg):
        if m.kind is Kind.FILE and posixpath.basename(m.path) == name:
            found = m
        _license(pkg, m, staging, staged)
    if found is None:
        raise KitError(f"{pkg.name} {pkg.version} has no {name}")
    rel = f"firmware/{name}"
    staged.files[rel] = write_file(staging, rel, found.data)
    return rel


# --- userland ------------------------------------------------------------------------------------------


class _Tree:
    """The merged file trees of the userland packages (paths merged-/usr), with symlink resolution."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.owner: dict[str, debian.Package] = {}

    def add(self, pkg: debian.Package, members: Iterable[Member]) -> None:
        for m in members:
            path = usr_path(m.path)
            if path and path not in self.members:
                self.members[path] = m
                self.owner[path] = pkg

    def _link(self, at: str, target: str) -> str:
        base = target.lstrip("/") if target.startswith("/") else posixpath.join(posixpath.dirname(at), target)
        norm = posixpath.normpath(base)
        if norm.startswith("../") or norm == "..":
            raise KitError(f"symlink {at} -> {target} leaves the package tree")
        return usr_path(norm)

    def resolve(self, path: str) -> str | None:
        """The regular file `path` leads to (through symlinks and hardlinks), or None."""
        for _ in range(MAX_SYMLINK_HOPS):
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = self.members.get("/".join(parts[:i]))
                if parent is not None and parent.kind is Kind.SYMLINK:
                    path = posixpath.join(self._link("/".join(parts[:i]), parent.target), *parts[i:])
                    break
            else:
                m = self.members.get(path)
                if m is None or m.kind is Kind.DIR:
                    return None
                if m.kind is Kind.FILE:
                    return path
                path = self._link(path, m.target) if m.kind is Kind.SYMLINK else usr_path(m.target)
        raise KitError(f"too many symlinks resolving {path}")


def _stage_userland(
    archive: debian.Archive, pkgs: Iterable[debian.Package], staging: Path, staged: _Staged
) -> None:
    tree = _Tree()
    for pkg in pkgs:
        tree.add(pkg, _download(archive, pkg))
    wanted: dict[str, str] = {}  # path in the initrd -> path in the tree
    todo: list[tuple[str, str]] = []
    for program in PROGRAMS:
        todo.append((program, program))
    while todo:
        dest, src_name = todo.pop()
        if dest in wanted:
            continue
        src = tree.resolve(src_name)
        if src is None:
            raise KitError(f"initrd userland: {src_name} is in none of the packages")
        wanted[dest] = src
        info = elf.dynamic(tree.members[src].data, src)
        if info.interpreter:
            todo.append((usr_path(info.interpreter.lstrip("/")), usr_path(info.interpreter.lstrip("/"))))
        for soname in info.needed:
            found = next((f"{d}/{soname}" for d in LIB_SEARCH if tree.resolve(f"{d}/{soname}")), None)
            if found is None:
                raise KitError(f"initrd userland: {src} needs {soname}, which no package provides")
            todo.append((f"{LIB_DIR}/{soname}", found))
    for dest, src in sorted(wanted.items()):
        member = tree.members[src]
        rel = f"userland/{dest}"
        staged.files[rel] = write_file(staging, rel, member.data, mode=member.mode)
        staged.origin[dest] = tree.owner[src].name
    for name in sorted(set(staged.origin.values())):
        copyright_path = tree.resolve(f"usr/share/doc/{name}/copyright")
        if copyright_path is not None and f"licenses/{name}/copyright" not in staged.files:
            rel = f"licenses/{name}/copyright"
            staged.files[rel] = write_file(staging, rel, tree.members[copyright_path].data)


def ensure_kit(opts: FetchOptions, *, offline: bool) -> Kit:
    """The newest cached kit of `opts.release`, fetched first when there is none (DESIGN.md: `build`
    fetches the default kit when none is cached; `--offline` turns that into an error)."""
    cached = latest(opts.cache, opts.release)
    if cached is not None:
        return cached
    if offline:
        raise KitError(
            f"no {opts.release} kit in {opts.cache} and --offline forbids fetching one",
            hint="run cwbuild kit fetch (or kit import FILE) first",
        )
    return fetch(opts)

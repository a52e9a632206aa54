"""The initrd: a reproducible pair of concatenated gzip'd newc cpio segments.

Segment 1 (the kit's part) holds the userland, the kernel modules for virtio, dm-crypt + AES-XTS, ext4,
configfs-tsm and the TEE guest drivers (closure computed from `.modinfo`), a `modules.dep` for them and the
load order in `/etc/cwbuild/modules`. It depends only on the kit and the module list, so it is built once
and cached under `<cache>/initrd/`. Segment 2 holds `/init` and the per-workload files. The kernel unpacks
concatenated (compressed) cpio archives in order (Documentation/driver-api/early-userspace/
buffer-format.rst: "the initramfs may be a concatenation of several archives"). Both are gzip'd with mtime 0
and a fixed level, so the same inputs give the same bytes; the zlib version is recorded because a different
deflate implementation (e.g. zlib-ng) produces different, equally valid, bytes. `Compression.NONE` stores
both segments uncompressed: larger, but byte-identical on any host.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cwbuild.boot.cpio import Entry, write_newc
from cwbuild.boot.kit import Kit
from cwbuild.boot.modules import DEFAULT_MODULES, ModuleTree, modules_dep
from cwbuild.errors import BuildError

#: Bumped whenever the layout of segment 1 changes, so stale cached parts are never reused.
BUILDER_VERSION = 1
GZIP_LEVEL = 6  # zlib's default: level 9 costs ~4x the time for 0.5% smaller output here
MODULE_LIST = "etc/cwbuild/modules"
#: First inode of the workload segment: well above any kit segment, so the segments never share numbers.
WORKLOAD_FIRST_INODE = 1 << 24
#: Directories every initrd has (mount points and the agent's working places); /dev/console for the first
#: process's stdio (the kernel's own default initramfs has the same node: usr/default_cpio_list).
BASE_DIRS = ("dev", "proc", "sys", "run", "mnt", "newroot", "etc", "var", "root")
MERGED_USR_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
CONSOLE_DEV = (5, 1)  # Documentation/admin-guide/devices.txt: char 5,1 = /dev/console


class Compression(StrEnum):
    """How each initrd segment is stored (both are accepted by the kernel: CONFIG_RD_GZIP, plain newc)."""

    GZIP = "gzip"  # ~2.5x smaller; the bytes depend on the deflate implementation (recorded)
    NONE = "none"  # the same bytes on any host, whatever its zlib


@dataclass(frozen=True)
class InitrdOptions:
    """What goes into the kit segment and how segments are stored."""

    modules: tuple[str, ...] = DEFAULT_MODULES
    compression: Compression = Compression.GZIP


@dataclass(frozen=True)
class Artifact:
    """A build output: where it is and what it hashes to."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class InitrdInfo:
    """What went into an initrd, for the build manifest."""

    artifact: Artifact
    kit_segment_sha256: str
    modules: tuple[str, ...]
    compression: Compression
    zlib_version: str  # "" when uncompressed


def gzip_bytes(data: bytes) -> bytes:
    """Deterministic gzip: mtime 0, no file name, fixed level (RFC 1952 header fields)."""
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def _compress(data: bytes, compression: Compression) -> bytes:
    return gzip_bytes(data) if compression is Compression.GZIP else data


def kit_entries(kit: Kit, modules: Sequence[str]) -> tuple[dict[str, Entry], tuple[str, ...]]:
    """The entries of the kit segment and the module load order."""
    entries: dict[str, Entry] = {d: Entry.directory() for d in BASE_DIRS}
    entries["root"] = Entry.directory(0o700)
    entries["tmp"] = Entry.directory(0o1777)
    entries["dev/console"] = Entry.char_device(*CONSOLE_DEV)
    for link, target in MERGED_USR_LINKS.items():
        entries[link] = Entry.symlink(target)
    for dest, rel in kit.userland().items():
        mode = int(kit.manifest["files"][rel].get("mode", 0o644))
        entries[dest] = Entry.file(kit.read(rel), mode)
    entries["usr/bin/sh"] = Entry.symlink("busybox")
    prefix = kit.manifest["kernel"]["modules"] + "/"
    module_files = [rel[len(prefix) :] for rel in kit.manifest["files"] if rel.startswith(prefix)]
    tree = ModuleTree(module_files, lambda rel: kit.read(prefix + rel))
    loaded = tree.closure(modules)
    mod_root = f"usr/lib/modules/{kit.kernel_version}"
    for module in loaded:
        entries[f"{mod_root}/{module.path}"] = Entry.file(module.data)
    entries[f"{mod_root}/modules.dep"] = Entry.file(modules_dep(loaded))
    for extra in ("modules.builtin", "modules.order"):
        if extra in module_files:
            entries[f"{mod_root}/{extra}"] = Entry.file(kit.read(prefix + extra))
    order = "".join(f"/{mod_root}/{m.path}\n" for m in loaded)
    entries[MODULE_LIST] = Entry.file(order.encode("utf-8"))
    return entries, tuple(m.name for m in loaded)


def _zlib(compression: Compression) -> str:
    return zlib.ZLIB_RUNTIME_VERSION if compression is Compression.GZIP else ""


def _segment_key(kit: Kit, modules: Sequence[str], compression: Compression) -> str:
    ident = {
        "builder": BUILDER_VERSION,
        "kit": kit.id,
        "modules": list(modules),
        "compression": str(compression),
        "zlib": _zlib(compression),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def kit_segment(
    kit: Kit,
    modules: Sequence[str],
    *,
    cache: Path | None = None,
    compression: Compression = Compression.GZIP,
) -> tuple[bytes, tuple[str, ...]]:
    """The kit segment, from the cache when a verified copy is there."""
    store = (cache or kit.store) / "initrd"
    key = _segment_key(kit, modules, compression)
    blob_path, meta_path = store / f"{key}.cpio", store / f"{key}.json"
    if blob_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text("utf-8"))
        blob = blob_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() == meta.get("sha256"):
            return blob, tuple(meta["modules"])
    entries, loaded = kit_entries(kit, modules)
    blob = _compress(write_newc(entries), compression)
    store.mkdir(parents=True, exist_ok=True)
    meta = {"sha256": hashlib.sha256(blob).hexdigest(), "modules": list(loaded)}
    _atomic_write(blob_path, blob)
    _atomic_write(meta_path, json.dumps(meta, sort_keys=True).encode())
    return blob, loaded


def workload_segment(
    init_script: bytes, extra_files: Mapping[str, bytes], compression: Compression = Compression.GZIP
) -> bytes:
    """The per-workload segment: /init (0755) and the given files (0644)."""
    entries = {path.lstrip("/"): Entry.file(data) for path, data in extra_files.items()}
    if "init" in entries:
        raise BuildError("extra_files must not contain /init; pass it as init_script")
    entries["init"] = Entry.file(init_script, 0o755)
    return _compress(write_newc(entries, first_inode=WORKLOAD_FIRST_INODE), compression)


def build_initrd(
    kit: Kit,
    *,
    init_script: bytes,
    extra_files: Mapping[str, bytes],
    out: Path,
    options: InitrdOptions | None = None,
    cache: Path | None = None,
) -> InitrdInfo:
    """Write the initrd for `kit` + workload files to `out`; same inputs, same bytes.

    `cache` is where the kit segment is cached (default: the kit's own cache root). With
    `Compression.NONE` the bytes do not even depend on the host's deflate implementation.
    """
    opts = options or InitrdOptions()
    compression = opts.compression
    base, loaded = kit_segment(kit, opts.modules, cache=cache, compression=compression)
    data = base + workload_segment(init_script, extra_files, compression)
    _atomic_write(out, data)
    return InitrdInfo(
        artifact=Artifact(out, hashlib.sha256(data).hexdigest(), len(data)),
        kit_segment_sha256=hashlib.sha256(base).hexdigest(),
        modules=loaded,
        compression=compression,
        zlib_version=_zlib(compression),
    )


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

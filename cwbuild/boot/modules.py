"""Kernel module closure for the initrd.

Debian's linux-image packages ship `modules.builtin` and `modules.order` but not `modules.dep` (depmod runs
in the postinst), so dependencies are read from each module's `.modinfo` `depends=` field, which is what
depmod itself uses (kmod: libkmod-module.c). Modules may be compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`,
Kconfig MODULE_COMPRESS_*); they are decompressed here so busybox `insmod` can load them. A module listed in
`modules.builtin` is part of the kernel image and needs nothing.
"""

from __future__ import annotations

import gzip
import io
import lzma
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from cwbuild.boot import elf
from cwbuild.errors import FormatError, KitError

MAX_MODULE_BYTES = 64 * 1024 * 1024
_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")

#: The initrd's default modules (issue #6 item 2): virtio block/net/console/serial/rng, dm-crypt with
#: AES-XTS, ext4 for the decrypted root, configfs + configfs-tsm and the SEV-SNP and TDX guest drivers.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "8250",
    "dm_mod",
    "dm_crypt",
    "xts",
    "aes_generic",
    "aesni_intel",
    "ext4",
    "configfs",
    "tsm",
    "sev_guest",
    "tdx_guest",
)


def module_name(path: str) -> str:
    """The kernel's name for a module file: basename without suffix, '-' read as '_' (kmod's rule)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    raise FormatError(f"not a kernel module file name: {path!r}")


def decompress(path: str, blob: bytes) -> bytes:
    """The ELF bytes of a possibly compressed module."""
    try:
        if path.endswith(".xz"):
            dec = lzma.LZMADecompressor()
            out = dec.decompress(blob, max_length=MAX_MODULE_BYTES)
            if not dec.eof:
                raise FormatError(f"{path}: truncated or too large")
            return out
        if path.endswith(".zst"):
            return zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_MODULE_BYTES)
        if path.endswith(".gz"):
            with gzip.GzipFile(fileobj=io.BytesIO(blob)) as fh:
                out = fh.read(MAX_MODULE_BYTES + 1)
            if len(out) > MAX_MODULE_BYTES:
                raise FormatError(f"{path}: larger than {MAX_MODULE_BYTES} bytes")
            return out
    except (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError) as exc:
        raise FormatError(f"{path}: corrupt compressed module: {exc}") from exc
    return blob


@dataclass(frozen=True)
class Module:
    """A loadable module: its name, its path relative to the modules directory, its ELF bytes."""

    name: str
    path: str
    data: bytes
    depends: tuple[str, ...]


class ModuleTree:
    """The modules of one kernel: `files` are paths relative to `lib/modules/<version>`, `read` reads one."""

    def __init__(self, files: Iterable[str], read: Callable[[str], bytes]) -> None:
        self.read = read
        self.paths: dict[str, str] = {}
        names = sorted(files)
        for rel in names:
            if rel.startswith("kernel/") and rel.endswith(_SUFFIXES):
                self.paths.setdefault(module_name(rel), rel)
        if not self.paths:
            raise KitError("the kernel has no loadable modules under kernel/")
        lines = read("modules.builtin").decode("utf-8").split() if "modules.builtin" in names else []
        self.builtin = frozenset(module_name(line) for line in lines if line.endswith(_SUFFIXES))

    @classmethod
    def from_dir(cls, root: Path) -> ModuleTree:
        """The modules in a directory such as /usr/lib/modules/<version>."""
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        return cls(files, lambda rel: (root / rel).read_bytes())

    def load(self, name: str) -> Module:
        """Read and parse one module."""
        rel = self.paths[name]
        data = decompress(rel, self.read(rel))
        info = elf.modinfo(data, rel)
        depends = tuple(d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d)
        return Module(name, rel.removesuffix(".xz").removesuffix(".zst").removesuffix(".gz"), data, depends)

    def closure(self, names: Sequence[str]) -> list[Module]:
        """Modules to load for `names`, dependencies first; built-ins are skipped, unknown names refused."""
        order: list[Module] = []
        done: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            norm = name.replace("-", "_")
            if norm in done or norm in self.builtin:
                return
            if norm in chain:
                raise KitError(f"module dependency cycle: {' -> '.join((*chain, norm))}")
            if norm not in self.paths:
                raise KitError(f"kernel module {name!r} is neither a module nor built in")
            module = self.load(norm)
            for dep in sorted(module.depends):
                visit(dep, (*chain, norm))
            done.add(norm)
            order.append(module)

        for name in names:
            visit(name, ())
        return order


def modules_dep(modules: Sequence[Module]) -> bytes:
    """A `modules.dep` for exactly `modules` in depmod's format (`path: dep-path ...`, every dependency,
    the one to load first listed last), so busybox modprobe works inside the initrd."""
    by_name = {m.name: m for m in modules}
    lines = []
    for m in sorted(modules, key=lambda m: m.path):
        seen: list[str] = []

        def walk(name: str, seen: list[str] = seen) -> None:
            for dep in sorted(by_name[name].depends):
                if dep in by_name and dep not in seen:
                    walk(dep)
                    seen.append(dep)

        walk(m.name)
        deps = " ".join(by_name[d].path for d in reversed(seen))
        lines.append(f"{m.path}:{' ' + deps if deps else ''}\n")
    return "".join(lines).encode("utf-8")

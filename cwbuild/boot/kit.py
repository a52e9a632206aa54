"""Boot kits: content-addressed kernel, modules, firmware and initrd userland (DESIGN.md "Kit").

A kit lives in `<cache>/kits/<id>/` as `manifest.json` (what is in it), `files/` (the content) and
`provenance.json` (when and from which signed indexes it was fetched; not part of the identity). The id is
the sha256 of the canonical manifest (sorted keys, no whitespace), and the manifest lists every file with
its sha256, so the id covers every byte. `export`/`import_kit` move a kit as a tar; import verifies every
file against the manifest before the kit becomes visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import zstandard

from cwbuild.errors import FormatError, KitError
from cwbuild.fileio import sha256_file

KIT_FORMAT = "cwbuild-kit/1"
MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"
FILES = "files"
MAX_KIT_FILE_BYTES = 256 * 1024 * 1024
MAX_KIT_BYTES = 2 * 1024 * 1024 * 1024
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # RFC 8878 §3.1.1
GZIP_MAGIC = b"\x1f\x8b"  # RFC 1952 §2.3.1
#: Kernel config options that configfs-tsm evidence needs (drivers/virt/coco/Kconfig, Linux 6.7+).
TSM_OPTION = "CONFIG_TSM_REPORTS"
TEE_OPTIONS = {"snp": "CONFIG_SEV_GUEST", "tdx": "CONFIG_TDX_GUEST_DRIVER"}


def cache_root(override: Path | None = None) -> Path:
    """`override`, else $XDG_CACHE_HOME/cwbuild, else ~/.cache/cwbuild (XDG Base Directory spec)."""
    if override is not None:
        return override
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "cwbuild"


def kits_dir(cache: Path) -> Path:
    """Where kits live inside a cache root."""
    return cache / "kits"


def canonical(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a kit id is computed over."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def kit_id(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical manifest, hex."""
    return hashlib.sha256(canonical(manifest)).hexdigest()


def _safe_rel(path: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts) or "\\" in path:
        raise FormatError(f"kit: bad file path {path!r}")
    return p.as_posix()


@dataclass(frozen=True)
class Kit:
    """A kit on disk. `root` is `<cache>/kits/<id>`; the manifest has been checked against the id."""

    id: str
    root: Path
    manifest: Mapping[str, Any]

    @property
    def store(self) -> Path:
        """The cache root this kit lives in (derived caches such as initrd parts go beside it)."""
        return self.root.parent.parent

    def path(self, rel: str) -> Path:
        """The on-disk path of a file listed in the manifest."""
        if rel not in self.manifest["files"]:
            raise KitError(f"kit {self.id[:12]} has no file {rel!r}")
        return self.root / FILES / _safe_rel(rel)

    def read(self, rel: str) -> bytes:
        """The bytes of a file listed in the manifest, checked against its sha256 there."""
        data = self.path(rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["files"][rel]["sha256"]:
            raise KitError(f"kit {self.id[:12]}: {rel} does not match its sha256 in the manifest")
        return data

    @property
    def release(self) -> str:
        """The Debian release the kit was fetched from."""
        return str(self.manifest["release"])

    @property
    def kernel_version(self) -> str:
        """The kernel release string (`uname -r` in the guest)."""
        return str(self.manifest["kernel"]["version"])

    @property
    def vmlinuz(self) -> Path:
        """The kernel image."""
        return self.path(self.manifest["kernel"]["vmlinuz"])

    @property
    def modules_dir(self) -> Path:
        """The kernel's modules directory (the contents of lib/modules/<version>)."""
        return self.root / FILES / _safe_rel(self.manifest["kernel"]["modules"])

    def firmware(self, tee: str) -> Path:
        """The OVMF build for `tee` ('snp' or 'tdx')."""
        fw = self.manifest["firmware"]
        if tee not in fw:
            raise KitError(f"kit {self.id[:12]} has no firmware for {tee}")
        return self.path(fw[tee])

    def userland(self) -> dict[str, str]:
        """Initrd userland: path inside the initrd -> path in the manifest's file table."""
        prefix = self.manifest["userland"]["root"] + "/"
        return {rel[len(prefix) :]: rel for rel in self.manifest["files"] if rel.startswith(prefix)}

    def supports(self, tee: str) -> bool:
        """Whether the kernel can produce `tee` evidence through configfs-tsm."""
        flags = self.manifest["kernel"]["config"]
        option = TEE_OPTIONS.get(tee)
        return (
            bool(self.manifest["kernel"]["configfs_tsm"])
            and option is not None
            and flags.get(option) in ("y", "m")
        )

    def require(self, tee: str) -> None:
        """Refuse a kit whose kernel cannot attest as `tee` (e.g. bookworm's 6.1 has no configfs-tsm)."""
        if tee in TEE_OPTIONS and not self.supports(tee):
            raise KitError(
                f"kit {self.id[:12]} (kernel {self.kernel_version}) lacks configfs-tsm or the {tee} "
                "guest driver",
                hint="fetch a kit of a release whose kernel has CONFIG_TSM_REPORTS (Linux 6.7+, e.g. trixie)",
            )


# --- the store -----------------------------------------------------------------------------------------


def load(cache: Path, ref: str) -> Kit:
    """The kit whose id is `ref` or starts with `ref` (at least 8 hex digits, unambiguous)."""
    base = kits_dir(cache)
    if len(ref) < 8 or any(c not in "0123456789abcdef" for c in ref):
        raise KitError(f"bad kit reference {ref!r}", hint="give at least 8 hex digits of the kit id")
    matches = (
        sorted(p.name for p in base.glob(f"{ref}*") if p.is_dir() and len(p.name) == 64)
        if base.is_dir()
        else []
    )
    if not matches:
        raise KitError(f"no kit {ref} in {base}", hint="cwbuild kit list shows the cached kits")
    if len(matches) > 1:
        raise KitError(f"kit reference {ref} is ambiguous")
    return open_kit(base / matches[0])


def open_kit(root: Path) -> Kit:
    """Read a kit directory and check its manifest against its name."""
    raw = (root / MANIFEST).read_bytes()
    manifest = parse_manifest(raw)
    kid = kit_id(manifest)
    if kid != root.name:
        raise KitError(
            f"kit {root.name[:12]}: manifest does not match the kit id", hint="remove it and fetch again"
        )
    return Kit(kid, root, manifest)


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """A manifest's JSON, with its format and file table checked."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError("kit manifest too large")
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"kit manifest is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != KIT_FORMAT:
        raise FormatError(f"not a {KIT_FORMAT} manifest")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise FormatError("kit manifest: no file table")
    for rel, meta in files.items():
        _safe_rel(rel)
        ok = (
            isinstance(meta, dict)
            and isinstance(meta.get("sha256"), str)
            and isinstance(meta.get("size"), int)
        )
        if not ok or len(meta["sha256"]) != 64 or not 0 <= meta["size"] <= MAX_KIT_FILE_BYTES:
            raise FormatError(f"kit manifest: bad entry for {rel!r}")
    for key in ("release", "kernel", "firmware", "userland", "packages"):
        if key not in manifest:
            raise FormatError(f"kit manifest: missing {key!r}")
    return manifest


def list_kits(cache: Path) -> list[tuple[Kit, dict[str, Any]]]:
    """Every valid kit in the cache with its provenance, newest fetch first."""
    base = kits_dir(cache)
    out = []
    for root in sorted(base.iterdir()) if base.is_dir() else []:
        if not root.is_dir() or len(root.name) != 64:
            continue
        try:
            kit = open_kit(root)
        except (KitError, FormatError, OSError):
            continue
        prov_path = root / PROVENANCE
        prov = json.loads(prov_path.read_bytes()) if prov_path.is_file() else {}
        out.append((kit, prov))
    out.sort(key=lambda kp: str(kp[1].get("fetched_at", "")), reverse=True)
    return out


def latest(cache: Path, release: str | None = None) -> Kit | None:
    """The most recently fetched kit (of `release`), or None."""
    for kit, _ in list_kits(cache):
        if release is None or kit.release == release:
            return kit
    return None


def verify_files(kit: Kit) -> None:
    """Check every file of `kit` against the manifest, and that nothing else is there."""
    files = kit.manifest["files"]
    present = {
        p.relative_to(kit.root / FILES).as_posix() for p in (kit.root / FILES).rglob("*") if not p.is_dir()
    }
    extra = present - set(files)
    if extra:
        raise KitError(f"kit {kit.id[:12]}: unlisted file {sorted(extra)[0]!r}")
    for rel, meta in files.items():
        path = kit.root / FILES / rel
        if path.is_symlink() or not path.is_file():
            raise KitError(f"kit {kit.id[:12]}: {rel} missing")
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise KitError(f"kit {kit.id[:12]}: {rel} does not match its sha256 in the manifest")


def install(staging: Path, cache: Path, manifest: Mapping[str, Any], provenance: Mapping[str, Any]) -> Kit:
    """Write manifest and provenance into `staging` (which holds files/) and move it into the store."""
    raw = canonical(manifest)
    (staging / MANIFEST).write_bytes(raw)
    (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n", "utf-8")
    kid = hashlib.sha256(raw).hexdigest()
    target = kits_dir(cache) / kid
    staged = Kit(kid, staging, manifest)
    verify_files(staged)
    try:
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():  # anything but "an identical kit is already there" (same id, same bytes)
            raise
        shutil.rmtree(staging)
    return open_kit(target)


def staging_dir(cache: Path) -> Path:
    """A private temporary directory inside the store (same filesystem, so install is a rename)."""
    base = kits_dir(cache)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=base))


# --- export / import -----------------------------------------------------------------------------------


def _tar_entries(kit: Kit) -> Iterator[tuple[str, Path]]:
    yield MANIFEST, kit.root / MANIFEST
    if (kit.root / PROVENANCE).is_file():
        yield PROVENANCE, kit.root / PROVENANCE
    for rel in sorted(kit.manifest["files"]):
        yield f"{FILES}/{rel}", kit.root / FILES / rel


def export(kit: Kit, dest: Path) -> None:
    """Write `kit` as a tar (zstd-compressed if `dest` ends in .zst); deterministic (sorted, no times)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with tmp.open("wb") as raw:
            if dest.name.endswith(".zst"):
                with zstandard.ZstdCompressor(level=10).stream_writer(raw, closefd=False) as zw:
                    _write_tar(kit, zw)
            else:
                _write_tar(kit, raw)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _write_tar(kit: Kit, out: IO[bytes]) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, path in _tar_entries(kit):
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)


def _open_archive(src: Path) -> IO[bytes]:
    fh = src.open("rb")
    head = fh.read(4)
    fh.seek(0)
    if head.startswith(ZSTD_MAGIC):
        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(fh, closefd=True)
        return reader
    return fh


def import_kit(src: Path, cache: Path) -> Kit:
    """Read an exported kit, verify every file against its manifest, and add it to the store."""
    staging = staging_dir(cache)
    try:
        with _open_archive(src) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            manifest, provenance = _read_members(tar, staging)
        return install(staging, cache, manifest, provenance)
    except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
        raise KitError(f"{src}: not a readable kit archive: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _read_members(tar: tarfile.TarFile, staging: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    manifest: dict[str, Any] | None = None
    provenance: dict[str, Any] = {}
    total = 0
    for info in tar:
        if not info.isfile():
            raise KitError(f"kit archive: unexpected entry {info.name!r} (only regular files)")
        handle = tar.extractfile(info)
        if handle is None:
            raise KitError(f"kit archive: cannot read {info.name!r}")
        if info.name == MANIFEST and manifest is None:
            manifest = parse_manifest(handle.read(MAX_MANIFEST_BYTES + 1))
        elif info.name == PROVENANCE:
            provenance = {"imported": json.loads(handle.read(MAX_MANIFEST_BYTES))}
        elif manifest is None:
            raise KitError("kit archive: manifest.json must come first")
        else:
            total += info.size
            if total > MAX_KIT_BYTES:
                raise KitError("kit archive: too large")
            _write_member(manifest, info, handle, staging)
    if manifest is None:
        raise KitError("kit archive: no manifest.json")
    return manifest, provenance


def _write_member(
    manifest: Mapping[str, Any], info: tarfile.TarInfo, handle: IO[bytes], staging: Path
) -> None:
    if not info.name.startswith(f"{FILES}/"):
        raise KitError(f"kit archive: unexpected entry {info.name!r}")
    rel = _safe_rel(info.name[len(FILES) + 1 :])
    meta = manifest["files"].get(rel)
    if meta is None or info.size != meta["size"]:
        raise KitError(f"kit archive: {rel!r} is not in the manifest or has the wrong size")
    dest = staging / FILES / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with dest.open("xb") as out:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != meta["sha256"]:
        raise KitError(f"kit archive: {rel} does not match its sha256 in the manifest")
    dest.chmod(0o755 if meta.get("mode") == 0o755 else 0o644)


def write_file(staging: Path, rel: str, data: bytes, *, mode: int = 0o644) -> dict[str, Any]:
    """Write one kit file into `staging/files/` and return its manifest entry."""
    dest = staging / FILES / _safe_rel(rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("xb") as fh:
        fh.write(data)
    mode = 0o755 if mode & 0o111 else 0o644
    dest.chmod(mode)
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "mode": mode}

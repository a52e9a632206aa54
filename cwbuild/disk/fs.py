"""The workload filesystem: a reproducible ext4 image of a rootfs directory (`mkfs.ext4 -d`).

buildah runs `mkfs -t ext4 -d ROOTFS IMG` with random UUID, hash seed and times (cw-format.md §1.6). Here the
same inputs give the same bytes:
  - the UUID and the directory hash seed are derived from the image digest;
  - mke2fs's own clock is `E2FSPROGS_FAKE_TIME` = SOURCE_DATE_EPOCH (default: the image's `created`);
  - features, block and inode sizes come from a pinned mke2fs.conf, not the host's /etc/mke2fs.conf;
  - mke2fs 1.47 copies each inode's atime and ctime from the staging tree (extraction time), so a
    `debugfs -w -f` pass sets atime/ctime (and crtime) of every used inode to SOURCE_DATE_EPOCH; mtimes
    stay the layers'. The same pass can set owners when the staging tree was written unprivileged.
The image's runtime config is written as /.krun_config.json (top-level Entrypoint, Cmd, Env, WorkingDir,
User: what both libkrun inits read, spec §4.5) and as /.cwbuild/config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cwbuild.disk.luks import Artifact
from cwbuild.errors import DiskError, UsageError
from cwbuild.fileio import sha256_file
from cwbuild.run import run

#: Runtime keys copied from the image config (spec §4.5 "Compatibility recommendation").
CONFIG_KEYS = ("Entrypoint", "Cmd", "Env", "WorkingDir", "User")
#: What cwbuild adds to the tree (root-owned in the image).
OUR_FILES = (".krun_config.json", ".cwbuild", ".cwbuild/config.json")
MIN_IMAGE_SIZE = 10 * 1024 * 1024  # buildah minimumImageSize (spec §1.6)
BLOCK = 4096
INODE_SIZE = 256
DIRENT_OVERHEAD = 12  # ext4_dir_entry_2 header (8) + padding to 4 bytes, per name
#: Pinned mke2fs configuration: Debian 12's ext4 defaults written out, so the host's file cannot change them.
MKE2FS_CONF = """[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
"""
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_TERM_RE = re.compile(r"^(\d+)\s*([kmgtp]?)(?:b|ib)?$|^(\d+)\s*b$", re.IGNORECASE)


def apply_slop(size: int, slop: str) -> int:
    """buildah's slop grammar (spec §1.6): `+`-separated terms applied left to right; `N%` grows by N
    percent, `64MB` (binary units) adds. Empty means 25%. Unlike buildah, any percentage works and a bad
    term is an error, not a warning."""
    if not slop.strip():
        slop = "25%"
    for raw in slop.split("+"):
        term = raw.strip()
        if term.endswith("%") and term[:-1].strip().isdigit():
            size = size * (int(term[:-1]) + 100) // 100
            continue
        m = _TERM_RE.match(term)
        if not m:
            raise UsageError(f"invalid slop term {term!r}", hint="use e.g. 25%, 64MB or 10%+64MB")
        if m.group(3) is not None:
            size += int(m.group(3))
        else:
            size += int(m.group(1)) * _UNITS[m.group(2).lower()]
    return size


@dataclass(frozen=True)
class FsSpec:
    """Inputs of the filesystem image besides the tree. `owners`: path (relative, '/'-separated) -> uid, gid,
    applied in the debugfs pass when the staging tree could not be chowned."""

    image_digest: str
    source_date_epoch: int
    config: Mapping[str, Any] = field(default_factory=dict)
    slop: str = "25%"
    size: int | None = None  # bytes; default: content size + slop
    label: str = ""
    owners: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    @staticmethod
    def epoch_from_created(created: str | None) -> int:
        """SOURCE_DATE_EPOCH from the environment, else the image's `created`, else 0."""
        env = os.environ.get("SOURCE_DATE_EPOCH")
        if env is not None:
            if not env.isdigit():
                raise UsageError("SOURCE_DATE_EPOCH must be a non-negative integer")
            return int(env)
        if created:
            try:
                return int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
            except ValueError:
                raise UsageError(f"image created time {created!r} is not RFC 3339") from None
        return 0


def derived_uuid(digest: str, purpose: str) -> str:
    """A version-4-shaped UUID from sha256(purpose || digest): stable per image, distinct per purpose."""
    raw = hashlib.sha256(f"cwbuild {purpose}\0{digest}".encode()).digest()[:16]
    return str(uuidlib.UUID(bytes=raw, version=4))


def runtime_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: config[key] for key in CONFIG_KEYS if config.get(key) is not None}


def _write_config_files(root: Path, spec: FsSpec) -> None:
    """/.krun_config.json and /.cwbuild/config.json, 0644 root-owned, times = SOURCE_DATE_EPOCH."""
    root_st = root.stat()
    cfg = runtime_config(spec.config)
    krun = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
    ours = json.dumps(
        {"config": cfg, "image_digest": spec.image_digest, "source_date_epoch": spec.source_date_epoch},
        sort_keys=True,
        indent=2,
    ).encode()
    t = spec.source_date_epoch
    cw = root / ".cwbuild"
    _clear(cw, keep_dir=True)
    cw.mkdir(mode=0o755, exist_ok=True)
    cw.chmod(0o755)  # not subject to the umask: the image must not depend on it
    for path, data in ((root / ".krun_config.json", krun), (cw / "config.json", ours)):
        _clear(path, keep_dir=False)  # a symlink or hardlink the image put there is replaced, never followed
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)
        os.utime(path, (t, t))
    os.utime(cw, (t, t))
    os.utime(root, ns=(root_st.st_atime_ns, root_st.st_mtime_ns))  # keep the layers' root mtime


def _clear(path: Path, *, keep_dir: bool) -> None:
    """Remove a non-directory entry at `path`; a directory is kept (keep_dir) or refused."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return
        raise DiskError(f"the image has a directory at /{path.name}, where cwbuild writes its config")
    path.unlink()


def journal_blocks(blocks: int) -> int:
    """e2fsprogs lib/ext2fs/mkjournal.c ext2fs_default_journal_size(), in 4 KiB blocks."""
    for limit, size in ((2048, 0), (32768, 1024), (256 << 10, 4096), (512 << 10, 8192), (4096 << 10, 16384)):
        if blocks < limit:
            return size
    for limit, size in ((8192 << 10, 32768), (16384 << 10, 65536), (32768 << 10, 131072)):
        if blocks < limit:
            return size
    return 262144


def with_overhead(size: int) -> int:
    """`size` bytes of content (+ slop) plus what ext4 itself takes: the journal, and ~2% + 1 MiB for
    superblocks, group descriptors, bitmaps and reserved GDT blocks (no root-reserved blocks: -m 0)."""
    return size + journal_blocks(size // BLOCK) * BLOCK + size // 50 + (1 << 20)


def content_size(root: Path) -> tuple[int, int]:
    """(bytes, entries): every file's size rounded up to blocks, a block per directory and symlink, an inode
    and a directory entry each. Hardlinked files count once (buildah counts them each time)."""
    total, entries = 0, 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            entries += 1
            total += DIRENT_OVERHEAD + len(os.fsencode(name))  # its entry in the parent directory
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            size = st.st_size if stat.S_ISREG(st.st_mode) else BLOCK
            total += size + (-size % BLOCK) + INODE_SIZE
    return total, entries + 1


def make_filesystem(rootfs: Path, out: Path, *, spec: FsSpec, digest: bool = True) -> Artifact:
    """Write `out`, a reproducible ext4 image of `rootfs` (which gets the two config files added); its sha256
    too unless `digest` is False (the build hashes it while encrypting it)."""
    _write_config_files(rootfs, spec)
    used, entries = content_size(rootfs)
    size = spec.size or with_overhead(apply_slop(used, spec.slop))
    size = max(MIN_IMAGE_SIZE, size + (-size % BLOCK))
    inodes = entries + entries // 4 + 64
    fs_uuid = derived_uuid(spec.image_digest, "ext4 uuid")
    seed = derived_uuid(spec.image_digest, "ext4 hash_seed")
    tmp = out.with_name(f".{out.name}.{os.urandom(6).hex()}.tmp")
    try:
        with tempfile.TemporaryDirectory(prefix="cwbuild-mkfs-") as work:
            conf = Path(work) / "mke2fs.conf"
            conf.write_text(MKE2FS_CONF)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, size)
            os.close(fd)
            env = {"E2FSPROGS_FAKE_TIME": str(spec.source_date_epoch), "MKE2FS_CONFIG": str(conf)}
            argv = ["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I", str(INODE_SIZE), "-m", "0"]
            argv += ["-N", str(inodes), "-U", fs_uuid, "-E", f"hash_seed={seed},nodiscard", "-L", spec.label]
            run([*argv, "-d", str(rootfs), str(tmp)], env=env)
            _normalize_inodes(tmp, Path(work), spec, env)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Artifact(out, size, sha256_file(out) if digest else None)


def used_inodes(image: Path, env: Mapping[str, str]) -> list[int]:
    """Inodes in use, from dumpe2fs's per-group 'Free inodes:' ranges (the complement, root and >= 11)."""
    text = run(["dumpe2fs", str(image)], env=env).stdout.decode()
    per_group = int(_field(text, "Inodes per group"))
    count = int(_field(text, "Inode count"))
    free: set[int] = set()
    # Only the indented per-group lines: the superblock's own "Free inodes:   133" (a count) must not be read
    # as a range, or inode 133 would keep the build time.
    for m in re.finditer(r"^[ \t]+Free inodes: ([0-9, -]*)$", text, re.MULTILINE):
        for part in filter(None, (p.strip() for p in m.group(1).split(","))):
            lo, _, hi = part.partition("-")
            free.update(range(int(lo), int(hi or lo) + 1))
    if count % per_group:
        raise DiskError("dumpe2fs: inode count is not a multiple of inodes per group")
    return [2] + [i for i in range(11, count + 1) if i not in free]


def _field(text: str, name: str) -> str:
    m = re.search(rf"^{name}:\s+(\d+)\s*$", text, re.MULTILINE)
    if not m:
        raise DiskError(f"dumpe2fs output lacks {name!r}")
    return m.group(1)


def _debugfs_path(rel: str) -> str:
    if any(c in rel for c in '"\n\r\0') or not rel:
        raise DiskError(f"cannot set the owner of {rel!r} through debugfs (quote or newline in the name)")
    return '"/' + rel.lstrip("/") + '"'


def _normalize_inodes(image: Path, work: Path, spec: FsSpec, env: Mapping[str, str]) -> None:
    t = f"@{spec.source_date_epoch}"
    lines = []
    for ino in used_inodes(image, env):
        for name in ("atime", "ctime", "crtime"):
            lines.append(f"sif <{ino}> {name} {t}")
        for name in ("atime_extra", "ctime_extra", "crtime_extra"):
            lines.append(f"sif <{ino}> {name} 0")
    owners = {**spec.owners, **{p: (0, 0) for p in OUR_FILES}}  # ours are root's, even when unprivileged
    for rel, (uid, gid) in sorted(owners.items()):
        path = _debugfs_path(rel)
        lines += [f"sif {path} uid {uid}", f"sif {path} gid {gid}"]
    script = work / "debugfs.cmd"
    script.write_text("\n".join(lines) + "\n")
    proc = run(["debugfs", "-w", "-f", str(script), str(image)], env=env)
    errors = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if not ln.startswith("debugfs ")]
    if errors:
        raise DiskError(f"debugfs could not normalise the image: {errors[0][:200]}")

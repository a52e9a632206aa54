"""One call for the build: rootfs directory -> reproducible ext4 -> LUKS disk, plaintext never left behind.

DESIGN.md rule: temporary plaintext lives in a private (0700) directory and is removed on every exit path.
The ext4 image's digest is returned (it is what reproducibility is about); the disk's is not computed here
(its ciphertext is fresh every time; call `fileio.sha256_file` if a manifest wants it).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cwbuild.disk.fs import FsSpec, make_filesystem
from cwbuild.disk.luks import Artifact, LuksSpec, Progress, encrypt_image


@dataclass(frozen=True)
class DiskResult:
    filesystem: Artifact  # the plaintext ext4 image (already deleted): its size and sha256
    disk: Artifact


def make_encrypted_disk(  # noqa: PLR0913 - keyword-only inputs of one build step
    rootfs: Path,
    out: Path,
    *,
    fs: FsSpec,
    luks: LuksSpec,
    passphrase: bytes,
    krun_footer: bytes | None = None,
    workdir: Path | None = None,
    progress: Progress | None = None,
) -> DiskResult:
    """Write `out` (LUKS container of an ext4 image of `rootfs`). `workdir` holds the private temp dir."""
    private = Path(tempfile.mkdtemp(prefix="cwbuild-plain-", dir=workdir))  # mkdtemp: mode 0700
    try:
        plain = make_filesystem(rootfs, private / "rootfs.ext4", spec=fs)
        disk = encrypt_image(
            plain.path, out, spec=luks, passphrase=passphrase, krun_footer=krun_footer, progress=progress
        )
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return DiskResult(filesystem=plain, disk=disk)

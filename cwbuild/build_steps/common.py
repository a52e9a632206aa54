"""Build steps every target shares: read the inputs, flatten the image, make the filesystem, encrypt it."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from cwbuild.attest import wrap
from cwbuild.build import BuildContext, StepArtifact
from cwbuild.config import BuildTarget
from cwbuild.disk.fs import FsSpec, apply_slop, make_filesystem, with_overhead
from cwbuild.disk.kdf import KdfSpec, KdfType, default_kdf
from cwbuild.disk.luks import LuksFormat, LuksSpec, encrypt_image
from cwbuild.errors import SecretFileError, UsageError
from cwbuild.fileio import sha256_file
from cwbuild.image import Transport, parse_reference
from cwbuild.image import flatten_image as read_and_flatten
from cwbuild.image.model import Platform
from cwbuild.interrupts import deferred
from cwbuild.launch import check_krun_limits
from cwbuild.secrets import read_passphrase_file, read_token_file

if TYPE_CHECKING:
    from cwbuild.image.mount import MountedRootfs

#: DESIGN.md "The key is random": 32 random bytes, hex (buildah's default too, cw-format.md §1.2 step 8).
GENERATED_PASSPHRASE_BYTES = 32
#: A CA file for the guest is a few certificates, never megabytes.
MAX_CA_BYTES = 256 * 1024
#: krun's guest sends the passphrase RSA-PKCS#1-v1.5-encrypted to a 2048-bit key: at most 245 ASCII bytes
#: (cw-format.md §8 "Passphrase: ASCII, no NUL or newline, <= 245 bytes").
KRUN_MAX_PASSPHRASE = 245
DISK_IMG = "disk.img"
#: build.steps_for's name of make_fs (its manifest record gets the image digest once it is known).
MAKE_FS_STEP = "make filesystem"
_PENDING = "pending filesystem work"
_ROOTFS = "mounted rootfs"
_RELEASE = "rootfs mount release"
#: The memory file system for plaintext (tmpfs, mounted by systemd/initramfs on every Debian host).
MEMORY_FS = "/dev/shm"  # noqa: S108 - only a private mkdtemp directory (0700, unpredictable name) is made there


def check_inputs(ctx: BuildContext) -> StepArtifact | None:
    """Read the secret files and the CA, and check what can be checked before any work."""
    spec = ctx.spec
    if spec.passphrase_file is not None:
        ctx.passphrase = read_passphrase_file(spec.passphrase_file)
    else:
        ctx.passphrase = secrets.token_hex(GENERATED_PASSPHRASE_BYTES).encode()
        ctx.passphrase_generated = True
    if not ctx.passphrase:
        raise SecretFileError("the passphrase file is empty")
    if spec.attestation_url is not None and len(ctx.passphrase) > wrap.MAX_SECRET_V1:
        raise SecretFileError(
            f"the passphrase is {len(ctx.passphrase)} bytes; "
            f"the endpoint releases at most {wrap.MAX_SECRET_V1}"
        )
    if spec.target is BuildTarget.KRUN:
        _check_krun_passphrase(ctx.passphrase)
    if spec.register_token_file is not None:
        ctx.token = read_token_file(spec.register_token_file)
    if spec.attestation_ca is not None:
        ctx.ca_pem = _read_ca(spec.attestation_ca)
    _check_guest_side(ctx)
    return None


def _check_guest_side(ctx: BuildContext) -> None:
    """What the guest will be told, validated now rather than after minutes of work: the krun guest's
    limits (cw-format.md §4.4), or the launch spec and the agent's URL/CA/workload id."""
    from cwbuild.build_steps import krun, qemu  # noqa: PLC0415 - they import this module's helpers

    if ctx.spec.target is BuildTarget.KRUN:
        check_krun_limits(krun.launch_spec(ctx))
        return
    qemu.launch_spec(ctx, firmware=None)
    qemu.agent_config(ctx)


def _check_krun_passphrase(passphrase: bytes) -> None:
    if len(passphrase) > KRUN_MAX_PASSPHRASE or not all(0x20 <= b < 0x7F for b in passphrase):
        raise SecretFileError(
            f"a krun guest takes a printable ASCII passphrase of at most {KRUN_MAX_PASSPHRASE} bytes"
        )


def _read_ca(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CA_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read --attestation-ca {path}: {exc.strerror}") from None
    if len(data) > MAX_CA_BYTES or b"-----BEGIN CERTIFICATE-----" not in data:
        raise UsageError(f"--attestation-ca {path} is not a PEM certificate file")
    return data


def flatten_image(ctx: BuildContext) -> StepArtifact | None:
    """The image's tree: a Podman store image mounted in place when allowed (`cwbuild.image.mount`), else
    its layers applied in order into the private work directory."""
    mounted = _mount_rootfs(ctx)
    if mounted is not None:
        image, result = mounted.image, mounted.result
        ctx.facts[_ROOTFS] = result.path
    else:
        image, result = read_and_flatten(
            ctx.spec.image,
            lambda size: _plaintext_dir(ctx, size) / "rootfs",
            ctx.stack,
            platform=ctx.spec.platform,
        )
    Platform.parse(ctx.spec.platform).require(image.platform, image.ref)
    ctx.facts["image"] = {
        "ref": image.ref,
        "id": image.id,
        "manifest_digest": image.manifest_digest,
        "platform": str(image.platform),
        "created": image.created,
        "layers": [{"digest": ly.digest, "diff_id": ly.diff_id, "size": ly.size} for ly in image.layers],
        "skipped_devices": list(result.skipped_devices),
        "rootfs_source": "export" if mounted is None else "podman-mount",
    }
    ctx.facts["image_config"] = image.runtime_config
    place = "memory" if ctx.work.is_relative_to(MEMORY_FS) else "disk"  # the ext4 image's plaintext
    extra = {"entries": result.entries, "plaintext_on": place}
    if mounted is not None:
        extra["rootfs_in"] = "podman store"
    return StepArtifact("rootfs", None, result.bytes, extra)


def _mount_rootfs(ctx: BuildContext) -> MountedRootfs | None:
    """The Podman mount when `--rootfs-via mount` and the image is a store image; its container lives on a
    stack of its own (`_RELEASE`), closed once the filesystem is made (or by `ctx.stack` on failure)."""
    if ctx.spec.rootfs_via != "mount":
        return None
    ref = parse_reference(ctx.spec.image)
    if ref.transport is not Transport.PODMAN:
        return None
    from cwbuild.image.mount import mount_rootfs  # noqa: PLC0415 - podman-py only when needed

    release = ExitStack()
    ctx.stack.callback(release.close)
    mounted = mount_rootfs(ref.name, str(ref), release, Platform.parse(ctx.spec.platform))
    if mounted is not None:
        # The tree's size decides where the ext4 image (plaintext) goes, as for an exported rootfs.
        _plaintext_dir(ctx, mounted.result.bytes, with_tree=False)
        ctx.facts[_RELEASE] = release
    return mounted


def _plaintext_dir(ctx: BuildContext, image_size: int | None, *, with_tree: bool = True) -> Path:
    """Where the plaintext (the rootfs when cwbuild writes it, then the ext4 image) is written: a private
    directory in the memory file system when it fits with room to spare (file creation there costs a
    fraction of a disk file system's, and the plaintext never reaches a disk), else the private work
    directory beside the output. Either is 0700 and removed on every exit path; `ctx.work` becomes the one
    chosen. `with_tree`: the rootfs is written there too (not when Podman's mount serves it)."""
    if image_size is None:
        return ctx.work
    need = with_overhead(apply_slop(image_size, ctx.spec.slop)) + (image_size if with_tree else 0)
    if not _fits_in_memory(need):
        return ctx.work
    with deferred():  # made and its removal registered before a signal is acted on
        work = Path(tempfile.mkdtemp(prefix=".cwbuild-plain-", dir=MEMORY_FS))  # 0700 (tempfile)
        ctx.stack.callback(shutil.rmtree, work, ignore_errors=True)
    ctx.work = work
    return work


def _fits_in_memory(need: int) -> bool:
    """`need` bytes of plaintext (the rootfs and the ext4 image exist together for a moment) fit when they,
    plus 64 MiB, are at most half of both the memory file system's free space and the memory available."""
    need += 64 << 20
    try:
        st = os.statvfs(MEMORY_FS)
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024  # proc(5): kB
    except (OSError, KeyError, ValueError):
        return False
    return need <= min(st.f_bavail * st.f_frsize, available) // 2


def make_fs(ctx: BuildContext) -> StepArtifact | None:
    """The reproducible ext4 image (plaintext, in the work directory); the rootfs is removed after."""
    image = ctx.facts["image"]
    epoch = FsSpec.epoch_from_created(image["created"])
    ctx.facts["source_date_epoch"] = epoch
    spec = FsSpec(
        image_digest=image["id"],
        source_date_epoch=epoch,
        config=ctx.facts["image_config"],
        slop=ctx.spec.slop,
    )
    rootfs = ctx.facts.pop(_ROOTFS, ctx.work / "rootfs")
    fs = make_filesystem(rootfs, ctx.work / "fs.img", spec=spec, digest=False)
    # Removing the rootfs and hashing the image are kernel and hashlib work that release the GIL: they run in
    # threads while the encryption workers run, and encrypt_disk waits for both (_settle).
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cwbuild-fs")
    ctx.stack.callback(pool.shutdown)  # before the work directory's removal (LIFO): no thread outlives it
    release = ctx.facts.pop(_RELEASE, None)  # a Podman mount: unmount and remove its container
    cleanup = pool.submit(release.close) if release is not None else pool.submit(shutil.rmtree, rootfs)
    ctx.facts[_PENDING] = (cleanup, pool.submit(sha256_file, fs.path))
    ctx.facts["filesystem"] = {"sha256": None, "size": fs.size, "type": "ext4"}
    return StepArtifact("ext4 (plaintext, not kept)", None, fs.size)


def _settle(ctx: BuildContext) -> None:
    """The rootfs is gone and the image's sha256 is in the manifest facts and the make-filesystem record."""
    removed, digest = ctx.facts.pop(_PENDING)
    removed.result()
    sha = digest.result()
    ctx.facts["filesystem"]["sha256"] = sha
    for record in ctx.steps:
        if record["step"] == MAKE_FS_STEP:
            record["sha256"] = sha


def luks_spec(ctx: BuildContext) -> LuksSpec:
    """LUKS2/4096 by default, LUKS1 for krun; KDF by DESIGN.md (cheap for random, argon2id for chosen)."""
    fmt = LuksFormat(ctx.spec.luks_format)
    if fmt is LuksFormat.LUKS1:
        return LuksSpec(fmt, 512, KdfSpec(KdfType.PBKDF2))
    kdf = default_kdf(generated_passphrase=ctx.passphrase_generated, guest_memory_mib=ctx.spec.memory_mib)
    return LuksSpec(fmt, 4096, kdf)


def encrypt_disk(ctx: BuildContext) -> StepArtifact | None:
    """disk.img in the stage: LUKS of the ext4 image (+ the krun footer for --target krun)."""
    spec = luks_spec(ctx)
    footer = ctx.facts.get("krun_config_json")
    plain = ctx.work / "fs.img"
    # digest: hashed as it is written, not read back. direct (O_DIRECT) unless --tag reads the disk right
    # back to store the image: measured (446 MB, 2 shared CPUs, load 2.5-4.5), encrypt disk 0.6-1.1 s
    # direct vs 1.3-2.4 s buffered, but store image 5.5-8.1 s after a direct write vs 4.3-6.6 s buffered.
    disk = encrypt_image(
        plain,
        ctx.stage / DISK_IMG,
        spec=spec,
        passphrase=ctx.passphrase,
        krun_footer=footer,
        digest=True,
        direct=ctx.spec.tag is None,
    )
    _settle(ctx)
    plain.unlink()
    ctx.facts["disk"] = {
        "format": spec.format.value,
        "sector_size": spec.sector_size,
        "kdf": spec.kdf.describe(),
    }
    return StepArtifact(DISK_IMG, disk.sha256, disk.size, {"format": spec.format.value})

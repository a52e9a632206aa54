"""`cwbuild disk encrypt|decrypt|inspect`: LUKS containers written and read in userspace."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from cwbuild.disk import footer
from cwbuild.disk.kdf import KdfLimits, KdfSpec, KdfType, default_kdf
from cwbuild.disk.luks import LuksFormat, LuksSpec, decrypt_image, encrypt_image, read_header
from cwbuild.errors import DiskError, SecretFileError, UsageError
from cwbuild.secrets import read_passphrase_file

GENERATED_PASSPHRASE_BYTES = 32  # DESIGN.md: 32 random bytes, hex


@dataclass(frozen=True)
class KdfFlags:
    kdf: str | None
    memory_kib: int | None
    time: int | None
    iterations: int | None
    cpus: int | None

    def resolve(self, *, generated: bool) -> KdfSpec:
        """DESIGN.md defaults, then the --kdf-* overrides."""
        base = default_kdf(generated_passphrase=generated)
        kind = KdfType(self.kdf) if self.kdf else base.type
        if kind is not base.type:
            base = (
                KdfSpec(kind) if kind is KdfType.PBKDF2 else KdfSpec(kind, time=4, memory_kib=65536, cpus=2)
            )
        spec = KdfSpec(
            kind,
            iterations=self.iterations or base.iterations,
            time=self.time or base.time,
            memory_kib=self.memory_kib or base.memory_kib,
            cpus=self.cpus or base.cpus,
        )
        try:
            spec.check_writable()
        except DiskError as exc:
            raise UsageError(exc.message) from None
        return spec


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], None]]:
    console = Console(stderr=True)
    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _check_out(out: Path, *, force: bool) -> None:
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(f"{out} exists", hint="give --force to replace it")


def _write_new_secret(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SecretFileError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@click.group("disk")
def command() -> None:
    """Encrypt, decrypt and inspect LUKS disk images (no root, no device-mapper)."""


@command.command("encrypt")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice([f.value for f in LuksFormat]), default="luks2")
@click.option(
    "--passphrase-file", type=str, help="Passphrase file ('-': stdin); one trailing newline dropped."
)
@click.option(
    "--generate-passphrase",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Generate a random passphrase and write it to this new file (0600).",
)
@click.option("--sector-size", type=click.Choice(["512", "1024", "2048", "4096"]), help="LUKS2 only.")
@click.option("--kdf", type=click.Choice([k.value for k in KdfType]))
@click.option("--kdf-memory", type=click.IntRange(1), help="argon2 memory in KiB.")
@click.option("--kdf-time", type=click.IntRange(1), help="argon2 passes.")
@click.option("--kdf-cpus", type=click.IntRange(1), help="argon2 parallelism.")
@click.option("--kdf-iterations", type=click.IntRange(1), help="pbkdf2 iterations.")
@click.option("--krun-config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(1, 64), help="Encryption processes (default: all CPUs).")
@click.option("-f", "--force", is_flag=True, help="Replace OUT if it exists.")
def encrypt_cmd(**opts: Any) -> None:
    """Write OUT, a LUKS container of the file SRC (e.g. an ext4 image)."""
    req = EncryptRequest.from_flags(opts)
    _check_out(req.out, force=opts["force"])
    config = footer.validated(req.krun_config.read_bytes()) if req.krun_config else None
    if req.generate_passphrase is not None:
        passphrase = secrets.token_hex(GENERATED_PASSPHRASE_BYTES).encode()
        _write_new_secret(req.generate_passphrase, passphrase)
    else:
        passphrase = read_passphrase_file(req.passphrase_file or "-")
    with _progress(req.src.stat().st_size, "encrypting") as advance:
        encrypt_image(
            req.src,
            req.out,
            spec=req.spec,
            passphrase=passphrase,
            krun_footer=config,
            workers=req.workers,
            progress=advance,
        )


@dataclass(frozen=True)
class EncryptRequest:
    """`disk encrypt`'s flags, parsed."""

    src: Path
    out: Path
    spec: LuksSpec
    passphrase_file: str | None
    generate_passphrase: Path | None
    krun_config: Path | None
    workers: int | None

    @classmethod
    def from_flags(cls, opts: dict[str, Any]) -> EncryptRequest:
        if (opts["passphrase_file"] is None) == (opts["generate_passphrase"] is None):
            raise UsageError("give exactly one of --passphrase-file and --generate-passphrase")
        fmt = LuksFormat(opts["fmt"])
        sector = opts["sector_size"]
        kdf = opts["kdf"]
        if fmt is LuksFormat.LUKS1:
            if sector not in (None, "512") or kdf not in (None, "pbkdf2"):
                raise UsageError("LUKS1 uses 512-byte sectors and pbkdf2 keyslots")
            kdf = "pbkdf2"
        size = int(sector) if sector else (512 if fmt is LuksFormat.LUKS1 else 4096)
        flags = KdfFlags(kdf, opts["kdf_memory"], opts["kdf_time"], opts["kdf_iterations"], opts["kdf_cpus"])
        kdf_spec = flags.resolve(generated=opts["generate_passphrase"] is not None)
        return cls(
            src=opts["src"],
            out=opts["out"],
            spec=LuksSpec(fmt, size, kdf_spec),
            passphrase_file=opts["passphrase_file"],
            generate_passphrase=opts["generate_passphrase"],
            krun_config=opts["krun_config"],
            workers=opts["workers"],
        )


@command.command("decrypt")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--passphrase-file", required=True, help="Passphrase file ('-': stdin).")
@click.option("--kdf-max-memory", type=click.IntRange(32), help="Refuse argon2 keyslots needing more KiB.")
@click.option("--workers", type=click.IntRange(1, 64))
@click.option("-f", "--force", is_flag=True, help="Replace OUT if it exists.")
def decrypt_cmd(
    image: Path, out: Path, passphrase_file: str, kdf_max_memory: int | None, workers: int | None, force: bool
) -> None:
    """Write the plaintext payload of the LUKS1/LUKS2 IMAGE to OUT."""
    _check_out(out, force=force)
    passphrase = read_passphrase_file(passphrase_file)
    limits = KdfLimits(max_memory_kib=kdf_max_memory) if kdf_max_memory else KdfLimits()
    size = image.stat().st_size
    with _progress(size, "decrypting") as advance:
        decrypt_image(image, out, passphrase=passphrase, limits=limits, workers=workers, progress=advance)


@command.command("inspect")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(image: Path, as_json: bool) -> None:
    """Show the LUKS header of IMAGE (and its krun footer); never key material."""
    header = read_header(image)
    facts = header.facts()
    config = footer.read(image)
    facts["krun_config"] = json.loads(config) if config is not None else None
    if as_json:
        click.echo(json.dumps(facts, indent=2, sort_keys=True))
        return
    for key, value in facts.items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        if key != "keyslots":
            click.echo(f"{key}: {shown if shown not in (None, '') else '-'}")
    for slot in header.keyslots:
        click.echo(f"keyslot {slot.index}: {slot.kdf.describe()}, area {slot.area_offset}+{slot.area_size}")

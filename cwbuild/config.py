"""`cwbuild build`'s inputs: flags and `cwbuild.yaml` merged into one frozen `BuildSpec` (STYLE.md rule 2).

A `cwbuild.yaml` may hold every flag of `cwbuild build` under its long name (dashes or underscores), e.g.

    image: localhost/app:latest
    tee: [snp]
    cpus: 2
    memory: 2048
    attestation-url: https://attest.example:8443
    attestation-ca: ca.pem
    register-token-file: admin.token

Flags given on the command line win over the file; relative paths in the file are relative to the file.
Secrets are never values here: only the names of files holding them (DESIGN.md "Files holding secrets").
"""

from __future__ import annotations

import enum
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from cwbuild.errors import ConfigError, UsageError
from cwbuild.fileio import read_limited
from cwbuild.launch.spec import MAX_CPUS, MAX_MEMORY_MIB, MIN_MEMORY_MIB, SNP_GENERATIONS, Tee

#: DESIGN.md "Workload id": random 128-bit hex by default.
WORKLOAD_ID_BYTES = 16
#: The ids the endpoint and the guest agent accept (cwbuild.attest.api.WORKLOAD_ID_RE).
WORKLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
#: The kernel command line of a qemu bundle: serial console for the agent's one-line errors, reboot -> exit.
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"
#: buildah mkcw's defaults (cw-format.md §1.2): 2 vCPUs, 512 MiB for krun; a qemu guest gets 2 GiB.
DEFAULT_CPUS = 2
DEFAULT_MEMORY_MIB = {"qemu": 2048, "krun": 512}
MAX_CONFIG_BYTES = 1 << 20
#: --rootfs-via: a Podman store image mounted in place (root only, else exported), or always exported.
ROOTFS_VIA = ("mount", "export")


class BuildTarget(enum.StrEnum):
    QEMU = "qemu"
    KRUN = "krun"


@dataclass(frozen=True, kw_only=True)
class BuildSpec:
    """Everything `cwbuild build` was asked for, validated. Paths are as given (files are read later)."""

    image: str
    output: Path
    tees: tuple[Tee, ...]
    target: BuildTarget = BuildTarget.QEMU
    tag: str | None = None
    cpus: int = DEFAULT_CPUS
    memory_mib: int = DEFAULT_MEMORY_MIB["qemu"]
    workload_id: str = ""
    passphrase_file: str | None = None
    slop: str = "25%"
    luks_format: str = "luks2"
    kit: str | None = None
    kit_cache: Path | None = None
    release: str = "trixie"
    firmware: Path | None = None
    firmware_library: Path | None = None
    snp_gen: str = "milan"
    cmdline: str = DEFAULT_CMDLINE
    attestation_url: str | None = None
    attestation_ca: Path | None = None
    register_url: str | None = None
    register_token_file: Path | None = None
    replace: bool = False
    offline: bool = False
    platform: str = "linux/amd64"
    #: How a Podman store image's tree reaches mkfs: "mount" (the store's own, when possible) or "export".
    rootfs_via: str = "mount"

    @property
    def development_only(self) -> bool:
        """DESIGN.md: without --attestation-url nothing is registered and the bundle is for development."""
        return self.attestation_url is None

    @property
    def registration_url(self) -> str | None:
        return self.register_url or self.attestation_url


#: flag / YAML key (underscored) -> BuildSpec field, where they differ.
_RENAMES: dict[str, str | None] = {
    "memory": "memory_mib",
    "format": "luks_format",
    "tee": "tees",
    "type": "type",
    "o": "output",
    "config": None,
}
_PATH_FIELDS = {
    "output",
    "kit_cache",
    "firmware",
    "firmware_library",
    "attestation_ca",
    "register_token_file",
}
_FIELDS = {f.name for f in fields(BuildSpec)}


def load_yaml(path: Path) -> dict[str, Any]:
    """A cwbuild.yaml as {field: value}, relative paths resolved against its directory."""
    raw = read_limited(path, limit=MAX_CONFIG_BYTES, error=ConfigError)
    try:
        doc = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping of build options")
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = _field_name(str(key), where=str(path))
        if name is None:
            continue
        relative = isinstance(value, str) and value != "-" and not Path(value).is_absolute()
        is_path = name in _PATH_FIELDS or name == "passphrase_file"
        out[name] = str(path.parent / value) if is_path and relative else value
    return out


def _field_name(key: str, *, where: str) -> str | None:
    name = key.replace("-", "_")
    if name in _RENAMES:
        return _RENAMES[name]
    if name not in _FIELDS:
        raise ConfigError(f"{where}: unknown build option {key!r}")
    return name


def merge(flags: Mapping[str, Any], file_values: Mapping[str, Any]) -> BuildSpec:
    """Flags (None = not given) over the file's values over the defaults, validated into a BuildSpec."""
    values: dict[str, Any] = dict(file_values)
    for key, value in flags.items():
        if value is None or value == ():
            continue
        values[key] = value
    return make_spec(values)


def _tees(values: Mapping[str, Any]) -> tuple[Tee, ...]:
    """--tee (DESIGN.md words) or --type (buildah's words, buildah's meaning), not both."""
    tee, typ = values.get("tees"), values.get("type")
    if tee and typ:
        raise UsageError(
            "give --tee or --type, not both", hint="--type takes buildah's words: snp, sev, sev_no_es"
        )
    if typ:
        return (Tee.from_buildah_type(str(typ)),)
    words = [tee] if isinstance(tee, str) else list(tee or ["snp"])
    out: list[Tee] = []
    for word in words:
        try:
            t = Tee(str(word).lower())
        except ValueError:
            raise UsageError(f"unknown --tee {word!r}", hint="use snp, sev-es, sev, tdx or sim") from None
        if t in out:
            raise UsageError(f"--tee {t} given twice")
        out.append(t)
    return tuple(out)


def _int(values: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key} must be an integer")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, not {value!r}") from None
    if not low <= number <= high:
        raise UsageError(f"{key.replace('_mib', '')} must be in [{low}, {high}]")
    return number


def _opt_path(values: Mapping[str, Any], key: str) -> Path | None:
    value = values.get(key)
    return None if value in (None, "") else Path(str(value))


def _opt_str(values: Mapping[str, Any], key: str) -> str | None:
    value = values.get(key)
    return None if value in (None, "") else str(value)


def make_spec(values: Mapping[str, Any]) -> BuildSpec:
    """Validate merged values (see `merge`)."""
    image = _opt_str(values, "image")
    if image is None:
        raise UsageError("no IMAGE given", hint="cwbuild build IMAGE, or `image:` in cwbuild.yaml")
    target = BuildTarget(str(values.get("target") or "qemu"))
    wid = _opt_str(values, "workload_id") or secrets.token_hex(WORKLOAD_ID_BYTES)
    if not WORKLOAD_ID_RE.match(wid):
        raise UsageError(f"workload id {wid[:80]!r} is not [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}")
    output = _opt_path(values, "output") or Path(_default_output(image, wid))
    spec = BuildSpec(
        image=image,
        output=output,
        tees=_tees(values),
        target=target,
        tag=_opt_str(values, "tag"),
        cpus=_int(values, "cpus", DEFAULT_CPUS, 1, MAX_CPUS),
        memory_mib=_int(values, "memory_mib", DEFAULT_MEMORY_MIB[target], MIN_MEMORY_MIB, MAX_MEMORY_MIB),
        workload_id=wid,
        passphrase_file=_opt_str(values, "passphrase_file"),
        slop=str(values.get("slop") or "25%"),
        luks_format="luks1" if target is BuildTarget.KRUN else str(values.get("luks_format") or "luks2"),
        kit=_opt_str(values, "kit"),
        kit_cache=_opt_path(values, "kit_cache"),
        release=str(values.get("release") or "trixie"),
        firmware=_opt_path(values, "firmware"),
        firmware_library=_opt_path(values, "firmware_library"),
        snp_gen=str(values.get("snp_gen") or "milan").lower(),
        cmdline=str(values.get("cmdline") or DEFAULT_CMDLINE),
        attestation_url=_opt_str(values, "attestation_url"),
        attestation_ca=_opt_path(values, "attestation_ca"),
        register_url=_opt_str(values, "register_url"),
        register_token_file=_opt_path(values, "register_token_file"),
        replace=bool(values.get("replace")),
        offline=bool(values.get("offline")),
        platform=str(values.get("platform") or "linux/amd64"),
        rootfs_via=str(values.get("rootfs_via") or "mount"),
    )
    check_spec(spec, explicit_format=values.get("luks_format"))
    return spec


def _default_output(image: str, workload_id: str) -> str:
    """./NAME.bundle from the image's last path component (tag and digest dropped)."""
    name = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or f"cwbuild-{workload_id[:12]}"
    return f"{name}.bundle"


def _check_platform(platform: str) -> None:
    """SEV, SEV-SNP and TDX guests (and krun-sev's) are x86-64 machines: --platform only picks among
    linux/amd64 images (e.g. a variant) in an index."""
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts) or parts[:2] != ["linux", "amd64"]:
        raise UsageError(
            f"--platform {platform!r}: the bundle boots an x86-64 confidential VM",
            hint="give linux/amd64 or linux/amd64/VARIANT",
        )


def check_spec(spec: BuildSpec, *, explicit_format: Any = None) -> None:
    """Combinations that are usage errors, found before any work starts."""
    _check_platform(spec.platform)
    if spec.rootfs_via not in ROOTFS_VIA:
        raise UsageError(f"--rootfs-via {spec.rootfs_via!r} is not mount or export")
    if spec.luks_format not in ("luks1", "luks2"):
        raise UsageError(f"--format {spec.luks_format!r} is not luks2 or luks1")
    _check_target(spec, explicit_format)
    if spec.snp_gen not in SNP_GENERATIONS:
        raise UsageError(f"--snp-gen {spec.snp_gen!r} unknown", hint="use " + ", ".join(SNP_GENERATIONS))
    _check_attestation(spec)
    if spec.tag is not None:
        check_tag(spec.tag, spec.output)


#: containers/image's check of an `oci:`/`oci-archive:` TAG (oci/internal/oci_util.go `refRegexp`, after
#: image-spec annotations.md's grammar for org.opencontainers.image.ref.name); a TAG holds no "/" here: a
#: last colon followed by a "/" belongs to the path (cwbuild.image.reference).
_OCI_TAG_RE = re.compile(r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*\Z")


def check_tag(tag: str, output: Path) -> None:
    """--tag NAME | containers-storage:NAME | oci:DIR[:TAG] | oci-archive:FILE[:TAG]. A path must not exist
    yet (like -o), its directory must, and it must not be inside the bundle (whose files the layer holds)."""
    from cwbuild.image.reference import Transport, parse_reference  # noqa: PLC0415

    ref = parse_reference(tag)
    if ref.transport is Transport.PODMAN:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}", ref.name):
            raise UsageError(f"--tag {tag[:80]!r} is not an image name")
        return
    if ref.transport not in (Transport.OCI, Transport.OCI_ARCHIVE):
        raise UsageError(
            f"--tag {tag[:80]!r}: cwbuild does not write {ref.transport}",
            hint="use NAME, containers-storage:NAME, oci:DIR[:TAG] or oci-archive:FILE[:TAG]",
        )
    if ref.tag is not None and (len(ref.tag) > 128 or not _OCI_TAG_RE.match(ref.tag)):
        raise UsageError(f"--tag {tag[:80]!r}: {ref.tag[:80]!r} is not an OCI reference name")
    dest = ref.path
    if dest.name in ("", ".", ".."):
        raise UsageError(f"--tag {tag[:80]!r} names no file or directory")
    parent = dest.absolute().parent
    out, where = output.resolve(), parent.resolve()
    if where / dest.name == out or where == out or out in where.parents:
        raise UsageError(f"--tag {dest} is inside the bundle directory {output}")
    if os.path.lexists(dest):
        raise UsageError(f"{dest} already exists", hint="give --tag a path that does not exist")
    if not parent.is_dir():
        raise UsageError(f"{parent} is not a directory")


def _check_target(spec: BuildSpec, explicit_format: Any) -> None:
    if spec.target is BuildTarget.KRUN:
        if explicit_format not in (None, "luks1"):
            raise UsageError("--target krun writes LUKS1 (what krun's guest opens)")
        if any(t not in (Tee.SNP, Tee.SEV_ES, Tee.SEV) for t in spec.tees) or len(spec.tees) != 1:
            raise UsageError("--target krun takes one of --tee snp|sev-es|sev (or --type)")
        if spec.attestation_url and spec.tees[0] is not Tee.SNP:
            raise UsageError("the endpoint attests SNP krun guests only", hint="use --tee snp")
        if spec.attestation_url and spec.firmware_library is None:
            raise UsageError(
                "--attestation-url with --target krun needs --firmware-library (the libkrunfw-sev measured)",
                hint="buildah mkcw refuses the same",
            )
    else:
        attesting = [t for t in spec.tees if t in (Tee.SNP, Tee.TDX, Tee.SIM)]
        if len(attesting) != 1:
            raise UsageError(
                "a qemu bundle attests as exactly one of snp, tdx or sim",
                hint="add --tee sev-es or --tee sev beside it only to publish those measurements too",
            )
        if spec.firmware_library is not None:
            raise UsageError("--firmware-library only applies to --target krun")


def _check_attestation(spec: BuildSpec) -> None:
    if spec.attestation_url is None:
        if spec.passphrase_file is None:
            raise UsageError(
                "without --attestation-url the disk can only be opened with a passphrase you hold",
                hint="give --passphrase-file F (the bundle is then development-only), or --attestation-url",
            )
        if spec.register_url or spec.register_token_file:
            raise UsageError("--register-url/--register-token-file need --attestation-url")
    elif spec.register_token_file is None:
        raise UsageError("--attestation-url registers the workload: give --register-token-file F")
    if spec.attestation_url and spec.attestation_url.startswith("https") and spec.attestation_ca is None:
        raise UsageError("an https --attestation-url needs --attestation-ca (the CA the guest pins)")

"""The guest agent: what the initrd's /init needs, rendered from templates/init.sh.j2 and templates/agent/.

`agent_files(AgentConfig, Entrypoint)` gives the per-workload initrd files (`init` plus `etc/cwbuild/...`),
ready for `cwbuild.boot.initrd.build_initrd(kit, init_script=files.pop("init"), extra_files=files, ...)`.
Everything here ends up in the measured initrd, so the endpoint URL, its CA and the entrypoint cannot be
changed by the host without changing the launch measurement.

The entrypoint decision: the build renders the image's Entrypoint/Cmd/Env/WorkingDir/User into a small shell
file, `etc/cwbuild/entrypoint.sh`, inside the initrd (measured; every value quoted by `shlex.quote`, so no
JSON is parsed by the shell at boot). After switch_root the agent's second stage (`etc/cwbuild/start.sh`) runs
from a tmpfs on `/.cwbuild` with the kit's static busybox, so images without a shell work too. Users are
switched with busybox `nsenter -S UID -G GID` (Debian's busybox has no chpst and a setpriv without --reuid).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cwbuild import resources
from cwbuild.errors import BuildError
from cwbuild.launch.spec import SIM_PORT_NAME

#: Workload ids the endpoint accepts (cwbuild.attest.api.WORKLOAD_ID_RE); they go into JSON unescaped.
WORKLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
#: Guest-facing endpoint URL: scheme, host (name, IPv4 or [IPv6]), optional port and path; no characters
#: that need quoting in JSON, curl's URL globbing ([]{} only in an IPv6 host) or the shell.
URL_RE = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?\Z")
TEES = ("snp", "tdx", "sim")
#: OCI image-spec config.md: a missing PATH gets the runtime's default (runc/Podman use this one).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_NAME_RE = re.compile(r"[^=\0]+\Z")
MAX_ENTRYPOINT_BYTES = 256 * 1024
#: The CA file (PEM) must hold at least one certificate (RFC 7468 §5.1 label).
PEM_CERT = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """What the agent is told at build time. `retries` attempts per request, back-off from `delay` seconds
    doubling up to `max_delay`; `rsa_bits` of the ephemeral key (DESIGN.md: RSA >= 2048)."""

    workload_id: str
    tee: str
    attestation_url: str
    ca_pem: bytes | None = field(default=None, repr=False)
    retries: int = 6
    delay: int = 1
    max_delay: int = 16
    rsa_bits: int = 3072
    disk: str = "/dev/vda"

    def __post_init__(self) -> None:
        if not WORKLOAD_ID_RE.match(self.workload_id):
            raise BuildError(f"workload id {self.workload_id!r} is not [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}")
        if self.tee not in TEES:
            raise BuildError(f"the guest agent attests as one of {', '.join(TEES)}, not {self.tee!r}")
        if not URL_RE.match(self.attestation_url):
            raise BuildError(
                f"attestation URL {self.attestation_url[:200]!r} is not a plain http(s)://host[:port][/path]"
            )
        if self.scheme == "https" and (self.ca_pem is None or PEM_CERT not in self.ca_pem):
            raise BuildError("an https attestation URL needs the endpoint's CA certificate (PEM)")
        if not (1 <= self.retries <= 100 and 1 <= self.delay <= self.max_delay <= 600):
            raise BuildError("agent retries must be 1..100 and 1 <= delay <= max_delay <= 600 seconds")
        if self.rsa_bits not in (2048, 3072, 4096):
            raise BuildError("the agent's RSA key is 2048, 3072 or 4096 bits")
        if not re.fullmatch(r"/dev/[a-z0-9/]+", self.disk):
            raise BuildError(f"disk device {self.disk!r} is not a plain /dev path")

    @property
    def scheme(self) -> str:
        return self.attestation_url.split(":", 1)[0]


@dataclass(frozen=True, kw_only=True)
class Entrypoint:
    """The image's runtime config (OCI image-spec config.md) as the agent runs it."""

    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    workdir: str = "/"
    user: str = ""

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0]:
            raise BuildError("the image has neither Entrypoint nor Cmd: nothing to run", hint="set one")
        for word in (*self.argv, *self.env, self.workdir, self.user):
            if "\0" in word:
                raise BuildError("the image config holds a NUL byte")
        for item in self.env:
            name = item.split("=", 1)[0]
            if "=" not in item or not ENV_NAME_RE.match(name):
                raise BuildError(f"image Env entry {item[:80]!r} is not NAME=VALUE")
        if not self.workdir.startswith("/"):
            raise BuildError(f"WorkingDir {self.workdir[:80]!r} is not absolute")
        if not re.fullmatch(r"[A-Za-z0-9._-]*(:[A-Za-z0-9._-]+)?", self.user):
            raise BuildError(f"User {self.user[:80]!r} is not user[:group] (names or numbers)")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Entrypoint:
        """From an image config's runtime keys (`Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`)."""

        def strings(key: str) -> tuple[str, ...]:
            value = config.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BuildError(f"image config {key} is not a list of strings")
            return tuple(value)

        workdir, user = config.get("WorkingDir") or "/", config.get("User") or ""
        if not isinstance(workdir, str) or not isinstance(user, str):
            raise BuildError("image config WorkingDir and User must be strings")
        return cls(
            argv=strings("Entrypoint") + strings("Cmd"), env=strings("Env"), workdir=workdir, user=user
        )

    @property
    def path(self) -> str:
        """The PATH the entrypoint is looked up in: the last PATH of Env, else the OCI default."""
        found = [e.split("=", 1)[1] for e in self.env if e.startswith("PATH=")]
        return found[-1] if found else DEFAULT_PATH


def render_init(config: AgentConfig) -> bytes:
    """/init, every value shell-quoted."""
    q = shlex.quote
    text = resources.render(
        "init.sh.j2",
        workload_id=q(config.workload_id),
        tee=q(config.tee),
        url=q(config.attestation_url.rstrip("/")),
        proto=q(config.scheme),
        retries=config.retries,
        delay=config.delay,
        max_delay=config.max_delay,
        rsa_bits=config.rsa_bits,
        disk=q(config.disk),
        sim_port=q(SIM_PORT_NAME),
    )
    return text.encode("utf-8")


def render_entrypoint(entry: Entrypoint) -> bytes:
    """etc/cwbuild/entrypoint.sh: sourced by start.sh; `cw_run UID GID HOME` runs the workload."""
    q = shlex.quote
    env = list(entry.env)
    words = ["$BB", "env", "-i", *(q(e) for e in env)]
    if not any(e.startswith("HOME=") for e in env):
        words.append('"HOME=$3"')
    if not any(e.startswith("PATH=") for e in env):
        words.append(q(f"PATH={DEFAULT_PATH}"))
    words += [
        "$BB",
        "nsenter",
        "-S",
        '"$1"',
        "-G",
        '"$2"',
        "-F",
        "--",
        '"$CW_EXE"',
        *(q(a) for a in entry.argv[1:]),
    ]
    lines = [
        "# generated by cwbuild from the image config: Entrypoint+Cmd, Env, WorkingDir, User",
        f"CW_USER={q(entry.user)}",
        f"CW_WORKDIR={q(entry.workdir)}",
        f"CW_PATH={q(entry.path)}",
        f"CW_ARG0={q(entry.argv[0])}",
        "cw_run() {",
        "\t" + " ".join(words),
        "}",
        "",
    ]
    data = "\n".join(lines).encode("utf-8")
    if len(data) > MAX_ENTRYPOINT_BYTES:
        raise BuildError(f"the image's entrypoint and environment exceed {MAX_ENTRYPOINT_BYTES} bytes")
    return data


def agent_files(config: AgentConfig, entry: Entrypoint) -> dict[str, bytes]:
    """Every per-workload initrd file of the agent: `init` and `etc/cwbuild/*`."""
    files = {
        "init": render_init(config),
        "etc/cwbuild/entrypoint.sh": render_entrypoint(entry),
        "etc/cwbuild/start.sh": resources.render("agent/start.sh.j2").encode("utf-8"),
        "etc/cwbuild/udhcpc.sh": resources.render("agent/udhcpc.sh.j2").encode("utf-8"),
        "etc/cwbuild/workload-id": config.workload_id.encode() + b"\n",
    }
    if config.ca_pem is not None:
        files["etc/cwbuild/ca.pem"] = config.ca_pem
    return files


def split_init(files: Mapping[str, bytes]) -> tuple[bytes, dict[str, bytes]]:
    """(init script, the other files) as `build_initrd` takes them."""
    rest = {k: v for k, v in files.items() if k != "init"}
    return files["init"], rest


__all__: Sequence[str] = (
    "AgentConfig",
    "Entrypoint",
    "agent_files",
    "render_entrypoint",
    "render_init",
    "split_init",
)

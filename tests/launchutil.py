"""Helpers for the launch-config tests: specs for every TEE kind, and qemu.sh parsed back into argv."""

from __future__ import annotations

import shlex

from cwbuild.launch.spec import LaunchSpec, Tee

#: A command line with what a shell or QEMU's option parser could trip over (commas, quotes, $, `, ;, &).
HOSTILE_CMDLINE = "console=ttyS0,115200 a='$(touch PWNED)' b=\"`touch PWNED`\" ;touch PWNED & x\\y <z> %s"
HOSTILE_ID = "id'\"$(touch PWNED)`x`;&<>/,\\ é"


def spec_for(tee: Tee, **overrides: object) -> LaunchSpec:
    values: dict[str, object] = {
        "tee": tee,
        "workload_id": "0123456789abcdef0123456789abcdef",
        "cmdline": "console=ttyS0 quiet",
        "cpus": 4,
        "memory_mib": 1536,
        "attestation_url": "https://10.0.2.2:8443",
    }
    values.update(overrides)
    return LaunchSpec(**values)  # type: ignore[arg-type] # test helper: fields by name


def script_argv(script: str) -> list[str]:
    """The words after `exec` in qemu.sh, as the shell would see them before expansion."""
    start = script.index('exec "$QEMU"')
    # backslash-newline continues a line (POSIX sh 2.2.1); values never hold a newline, so each one is that
    words = shlex.split(script[start:].replace("\\\n", ""), comments=False, posix=True)
    assert words[:2] == ["exec", "$QEMU"]
    assert words[-1] == "$@"
    return words[2:-1]


def options(argv: list[str], name: str) -> list[str]:
    """Every value given to option `name`."""
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == name]


def split_keyval(value: str) -> tuple[str, dict[str, str]]:
    """QEMU's `head,k=v,...` with ',,' as an escaped comma."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    head, props = parts[0], {}
    for part in parts[1:]:
        key, _, val = part.partition("=")
        props[key] = val
    return head, props

"""The guest agent's rendering: config validation, and the entrypoint file run by a real POSIX shell with
hostile values (quotes, $(...), newlines) that must reach the program as the exact argv/env words."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cwbuild.boot.agent import AgentConfig, Entrypoint, agent_files, render_entrypoint, render_init
from cwbuild.errors import BuildError

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _config(**kw: object) -> AgentConfig:
    base: dict[str, object] = {
        "workload_id": "wl-1",
        "tee": "sim",
        "attestation_url": "https://10.0.2.2:8443",
        "ca_pem": CA,
    }
    base.update(kw)
    return AgentConfig(**base)  # type: ignore[arg-type]  # the test varies every field


@pytest.mark.parametrize(
    "kw",
    [
        {"workload_id": "a b"},
        {"workload_id": "-x"},
        {"workload_id": "x" * 129},
        {"tee": "sev"},
        {"attestation_url": "https://h/'$(reboot)'"},
        {"attestation_url": "https://h:1/p?q=1"},
        {"attestation_url": "ftp://h"},
        {"attestation_url": "https://h\n"},
        {"ca_pem": None},
        {"ca_pem": b"not a certificate"},
        {"retries": 0},
        {"delay": 10, "max_delay": 5},
        {"rsa_bits": 1024},
        {"disk": "/dev/vda; reboot"},
    ],
)
def test_bad_agent_config_is_refused(kw: dict[str, object]) -> None:
    with pytest.raises(BuildError):
        _config(**kw)


def test_http_url_needs_no_ca() -> None:
    assert _config(attestation_url="http://10.0.2.2:8080", ca_pem=None).scheme == "http"


def test_init_holds_the_values_quoted_and_no_template_left() -> None:
    text = render_init(_config(workload_id="wl.1_x-y")).decode()
    assert text.startswith("#!/bin/sh\n")
    assert "WORKLOAD_ID=wl.1_x-y\n" in text
    assert "URL=https://10.0.2.2:8443\n" in text
    assert "SIM_PORT=org.cwbuild.simtee.0\n" in text
    assert "{%" not in text
    assert "{{" not in text
    proc = subprocess.run(["sh", "-n"], input=text.encode(), capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr  # parses as POSIX sh (dash)


def test_agent_files() -> None:
    files = agent_files(_config(), Entrypoint(argv=("/bin/true",)))
    assert set(files) == {
        "init",
        "etc/cwbuild/entrypoint.sh",
        "etc/cwbuild/start.sh",
        "etc/cwbuild/udhcpc.sh",
        "etc/cwbuild/workload-id",
        "etc/cwbuild/ca.pem",
    }
    assert files["etc/cwbuild/ca.pem"] == CA
    for name in ("etc/cwbuild/start.sh", "etc/cwbuild/udhcpc.sh"):
        proc = subprocess.run(["sh", "-n"], input=files[name], capture_output=True, check=False)
        assert proc.returncode == 0, (name, proc.stderr)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"Cmd": []},
        {"Cmd": "echo hi"},
        {"Cmd": ["x"], "Env": ["NOEQUALS"]},
        {"Cmd": ["x"], "Env": ["=v"]},
        {"Cmd": ["x"], "WorkingDir": "relative"},
        {"Cmd": ["x"], "User": "a b"},
        {"Cmd": ["x"], "User": "$(id)"},
        {"Cmd": ["x\0y"]},
    ],
)
def test_bad_image_config_is_refused(config: dict[str, object]) -> None:
    with pytest.raises(BuildError):
        Entrypoint.from_config(config)


HOSTILE = ["it's", "$(touch /tmp/pwned)", "a\nb", "`id`", "\\", '"', "*", " "]


def _words(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def test_entrypoint_file_passes_exact_words(tmp_path: Path) -> None:
    entry = Entrypoint.from_config(
        {
            "Entrypoint": ["prog", *HOSTILE[:3]],
            "Cmd": HOSTILE[3:],
            "Env": ["A=" + HOSTILE[1], "B=x\ny", "PATH=/opt/bin"],
            "WorkingDir": "/w d",
            "User": "1000:1000",
        }
    )
    (tmp_path / "entrypoint.sh").write_bytes(render_entrypoint(entry))
    out = tmp_path / "argv"
    # $BB stands for busybox: here a recorder that prints its argv NUL-separated
    recorder = tmp_path / "bb"
    recorder.write_text(f'#!/bin/sh\nfor a in "$@"; do printf \'%s\\0\' "$a"; done > {out}\n')
    recorder.chmod(0o755)
    script = f"BB={recorder}\n. {tmp_path}/entrypoint.sh\nCW_EXE=/resolved/prog\ncw_run 1000 1001 /home/x\n"
    script += 'printf "%s|%s|%s|%s" "$CW_USER" "$CW_WORKDIR" "$CW_PATH" "$CW_ARG0"\n'
    proc = subprocess.run(["sh", "-c", script], capture_output=True, check=True, cwd=tmp_path)
    assert proc.stdout.decode() == "1000:1000|/w d|/opt/bin|prog"
    assert not Path("/tmp/pwned").exists()
    assert _words(out) == [
        "env",
        "-i",
        "A=" + HOSTILE[1],
        "B=x\ny",
        "PATH=/opt/bin",
        "HOME=/home/x",
        str(recorder),
        "nsenter",
        "-S",
        "1000",
        "-G",
        "1001",
        "-F",
        "--",
        "/resolved/prog",
        *HOSTILE,
    ]


def test_entrypoint_defaults() -> None:
    entry = Entrypoint.from_config({"Cmd": ["/bin/sh"]})
    assert entry.workdir == "/"
    assert entry.user == ""
    text = render_entrypoint(entry).decode()
    assert " PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin " in text
    assert '"HOME=$3"' in text

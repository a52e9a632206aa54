"""Packaging: the wheel carries the templates (rendered from a fresh venv) and the compiled AES-XTS loop
(used there), and the top-level Containerfile builds on a locally made Debian base with the wheel installed,
its last RUN executing `cwbuild --version`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cwbuild import __version__
from tests.conftest import ASSETS, REPO
from tests.integration.podman_env import Podman, remove_store

pytestmark = pytest.mark.integration

_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.egg-info",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "build",
    "dist",
    "*.so",  # a clean checkout's copy: the wheel must compile its own AES-XTS extension
    "*.o",
    "_xts_c.c",
)
#: debootstrap --variant=minbase of Debian 12, tarred; made once per machine (a minute or so, online).
DEBIAN_BASE = ASSETS / "debian-bookworm-minbase.tar"


def _copy_repo(dest: Path) -> Path:
    shutil.copytree(REPO, dest, symlinks=True, ignore=_IGNORE)
    return dest


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build --wheel` of a copy of the checkout (the build writes build/ beside the sources)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_repo(tmp / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", tmp / "dist", src],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("cwbuild-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel (and its dependencies) installed."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", wheel], check=True, timeout=600, capture_output=True)
    return py


def test_wheel_renders_templates_from_a_fresh_venv(venv_python: Path, tmp_path: Path) -> None:
    code = (
        "import cwbuild, cwbuild.resources as r; "
        "print(cwbuild.__file__); print(r.render('hello.txt.j2', version=cwbuild.__version__))"
    )
    proc = subprocess.run([venv_python, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    location, rendered = proc.stdout.split("\n", 1)
    assert Path(location).is_relative_to(venv_python.parent.parent)
    assert rendered.strip() == f"cwbuild {__version__} templates are installed."
    version = subprocess.run(
        [venv_python.parent / "cwbuild", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in version.stdout


#: Run in the wheel's venv: which backend, from where, and the compiled loop against `cryptography` there.
_XTS_CHECK = """
import os
from cwbuild.disk import xts
key, data = os.urandom(64), os.urandom(8 * 4096)
out = {}
for backend in ("openssl-evp-c", "cryptography"):
    buf = bytearray(data)
    with xts.SectorCrypt(xts.XtsParams(key, 4096), encrypt=True, backend=backend) as c:
        c.run(buf, (1 << 32) - 9)
    out[backend] = bytes(buf)
print(xts.backend_name())
print(xts._compiled().__file__)
print(out["openssl-evp-c"] == out["cryptography"] != data)
"""


def test_wheel_carries_and_uses_the_compiled_xts_loop(wheel: Path, venv_python: Path, tmp_path: Path) -> None:
    """setup.py's cffi extension is compiled into the wheel (so the wheel is platform-specific) and is what
    AES-XTS runs on once installed."""
    with zipfile.ZipFile(wheel) as whl:
        (so,) = [n for n in whl.namelist() if n.startswith("cwbuild/disk/_xts_c.") and n.endswith(".so")]
        assert not [n for n in whl.namelist() if n.endswith((".c", ".o"))]
    assert not wheel.name.endswith("-none-any.whl")
    proc = subprocess.run(
        [venv_python, "-c", _XTS_CHECK], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    backend, module, agree = proc.stdout.split()
    assert backend == "openssl-evp-c"
    assert Path(module).is_relative_to(venv_python.parent.parent)
    assert Path(module).as_posix().endswith(so)
    assert agree == "True"


def _debian_base_tar() -> Path:
    if DEBIAN_BASE.is_file():
        return DEBIAN_BASE
    work = Path(ASSETS) / f"debootstrap.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", work, "http://deb.debian.org/debian"],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    partial = DEBIAN_BASE.with_suffix(f".{os.getpid()}.partial")
    subprocess.run(["tar", "-C", work, "--numeric-owner", "-cf", partial, "."], check=True, timeout=600)
    shutil.rmtree(work)
    partial.rename(DEBIAN_BASE)
    return DEBIAN_BASE


@pytest.fixture
def overlay_podman(tmp_path: Path) -> Iterator[Podman]:
    """A throwaway store with the overlay driver (vfs would copy the whole image at every step)."""
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{tmp_path}/graph"\nrunroot = "{tmp_path}/run"\n'
    )
    podman = Podman(tmp_path, {"CONTAINERS_STORAGE_CONF": str(conf)})
    try:
        yield podman
    finally:
        remove_store(podman)


@pytest.mark.slow
def test_containerfile_builds_with_the_wheel(overlay_podman: Podman, wheel: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    base = "localhost/cwbuild-test-debian:bookworm"
    overlay_podman("import", str(_debian_base_tar()), base)
    ctx = _copy_repo(tmp_path / "ctx")
    (ctx / "dist").mkdir()
    shutil.copy(wheel, ctx / "dist")
    # The machine's CA bundle goes in too, for networks whose proxy re-signs TLS (pip reaches PyPI).
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    proc = overlay_podman(
        "build",
        "--volume",
        f"{ca}:/run/pip-ca.crt:ro",
        "--build-arg",
        "PIP_CA=/run/pip-ca.crt",
        "--isolation",
        "chroot",
        "--pull=never",
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        f"WHEEL=dist/{wheel.name}",
        "-t",
        "localhost/cwbuild:test",
        str(ctx),
    )
    assert f"cwbuild, version {__version__}" in proc.stdout
    print(f"Containerfile build took {time.monotonic() - start:.0f} s")

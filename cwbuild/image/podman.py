"""Images in the local Podman store, read through the Podman REST API (podman-py), never by scraping the CLI.

The socket is `$CONTAINER_HOST` if set (Podman's own variable, unix:// only), else root's
/run/podman/podman.sock or a rootless user's $XDG_RUNTIME_DIR/podman/podman.sock (podman-system-service(1)).
If nothing answers there, cwbuild starts `podman system service --time=0` on a socket in a private directory
for the duration of the command and stops it after.

The image is exported once (`GET /images/{id}/get?format=docker-archive`, uncompressed layers, no
recompression; `oci-archive` for images with zstd layers, which Podman cannot write as docker-archive) into a
private spool file — disk, not memory, since the archive lists its manifest after the layers — and then read
like any archive: the config's sha256 must equal the store's image id and every
layer's content must hash to the diff_id that `podman image inspect` reports (RootFS.Layers).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from podman import PodmanClient
from podman.api.client import APIResponse
from podman.errors import APIError, ImageNotFound, PodmanError

from cwbuild import run
from cwbuild.errors import ImageError, ToolError
from cwbuild.image.blobs import CHUNK
from cwbuild.image.docker import open_docker_archive
from cwbuild.image.model import Image, Platform
from cwbuild.image.oci import TarBlobs, open_layout_archive
from cwbuild.interrupts import deferred

log = logging.getLogger("cwbuild.image.podman")

ROOT_SOCKET = "/run/podman/podman.sock"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


def socket_url() -> str:
    """Where the user's Podman service listens (or would)."""
    host = os.environ.get("CONTAINER_HOST")
    if host:
        if not host.startswith("unix://"):
            raise ImageError(
                f"CONTAINER_HOST={host} is not a unix:// socket", hint="only local stores are read"
            )
        return host
    if os.geteuid() == 0:
        return f"unix://{ROOT_SOCKET}"
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    return f"unix://{runtime}/podman/podman.sock"


def _answers(url: str) -> bool:
    path = url.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


@contextmanager
def podman_client() -> Iterator[PodmanClient]:
    """A client for the user's Podman service, or for a private one started (and stopped) for us."""
    url = socket_url()
    if _answers(url):
        with PodmanClient(base_url=url) as client:
            yield client
        return
    with _private_service() as private_url, PodmanClient(base_url=private_url) as client:
        yield client


@contextmanager
def _private_service() -> Iterator[str]:
    with ExitStack() as stack:
        # Each thing made has its undo registered before a signal is acted on (cwbuild.interrupts): a SIGTERM
        # right after the spawn must not leave a service running, or its directory behind.
        with deferred():
            workdir = Path(tempfile.mkdtemp(prefix="cwbuild-podman-"))  # mode 0700
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            log = stack.enter_context((workdir / "service.log").open("wb"))
            url = f"unix://{workdir / 'podman.sock'}"
            proc = run.spawn(
                ["podman", "system", "service", "--time=0", url],
                stdout=log.fileno(),
                stderr=log.fileno(),
                new_session=True,  # a Ctrl-C must not stop it before our cleanup (container removal) used it
            )
            stack.callback(_stop, proc)
        deadline = time.monotonic() + _START_TIMEOUT
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "service.log").read_text("utf-8", "replace")[-2000:]
                raise ToolError("podman system service did not start", stderr_tail=tail)
            time.sleep(0.05)
        yield url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def open_podman_image(name: str, ref: str, platform: Platform, stack: ExitStack) -> Image:
    """Export `name` from the store into a private spool and open it; `stack` owns every resource."""
    client = stack.enter_context(podman_client())
    return open_exported(client, inspect(client, name), ref, platform, stack)


def open_exported(
    client: PodmanClient, attrs: dict[str, Any], ref: str, platform: Platform, stack: ExitStack
) -> Image:
    """`open_podman_image` once the store's inspect data (`attrs`) is known."""
    image_id = str(attrs.get("Id", ""))
    spool_dir = Path(tempfile.mkdtemp(prefix="cwbuild-image-"))  # mode 0700
    stack.callback(shutil.rmtree, spool_dir, ignore_errors=True)
    image = _export_and_open(client, image_id, spool_dir, ref, platform, stack)
    digest = attrs.get("Digest")
    image = replace(image, manifest_digest=digest if isinstance(digest, str) else None)
    if image.id.removeprefix("sha256:") != image_id.removeprefix("sha256:"):
        raise ImageError(f"{ref}: exported config {image.id} is not the store's image {image_id}")
    rootfs = attrs.get("RootFS")
    want = rootfs.get("Layers") if isinstance(rootfs, dict) else None
    if want != [layer.diff_id for layer in image.layers]:
        raise ImageError(f"{ref}: exported layers do not match the store's RootFS.Layers")
    return image


def _export_and_open(
    client: PodmanClient, image_id: str, spool_dir: Path, ref: str, platform: Platform, stack: ExitStack
) -> Image:
    """docker-archive first (layers as stored, uncompressed, no recompression); Podman cannot write an image
    with zstd layers in that format, so then oci-archive (layers recompressed by Podman)."""
    try:
        spool = _export(client, image_id, spool_dir / "docker-archive.tar", "docker-archive")
    except ImageError as exc:
        log.debug("docker-archive export refused (%s); trying oci-archive", exc.message)
        spool = _export(client, image_id, spool_dir / "oci-archive.tar", "oci-archive")
        blobs = TarBlobs(spool)
        stack.callback(blobs.close)
        return open_layout_archive(blobs, None, platform, ref)
    blobs = TarBlobs(spool)
    stack.callback(blobs.close)
    return open_docker_archive(blobs, ref)


def inspect(client: PodmanClient, name: str) -> dict[str, Any]:
    try:
        attrs = client.images.get(name).attrs
    except ImageNotFound as exc:
        raise ImageError(
            f"image {name} not found in the Podman store", hint="podman images lists them"
        ) from exc
    except (APIError, PodmanError, OSError) as exc:
        raise ImageError(f"cannot inspect {name} through the Podman API: {exc}") from exc
    if not isinstance(attrs, dict):
        raise ImageError(f"Podman returned no inspect data for {name}")
    return attrs


def export_response(client: PodmanClient, image_id: str, fmt: str) -> APIResponse:
    """The export request, its body not read yet (the caller closes the response)."""
    try:
        response = client.api.get(
            f"/images/{quote(image_id, safe='')}/get", params={"format": fmt}, stream=True
        )
        response.raise_for_status()
    except (APIError, PodmanError, OSError, requests.RequestException) as exc:
        raise ImageError(f"exporting {image_id[:12]} through the Podman API failed: {exc}") from exc
    return response


def _export(client: PodmanClient, image_id: str, dest: Path, fmt: str) -> Path:
    response = export_response(client, image_id, fmt)
    try:
        with closing(response), dest.open("xb") as out:
            for chunk in response.iter_content(CHUNK):
                out.write(chunk)
        return dest
    except (APIError, PodmanError, OSError, requests.RequestException) as exc:
        raise ImageError(f"exporting {image_id[:12]} through the Podman API failed: {exc}") from exc

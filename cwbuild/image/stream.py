"""Flatten an image from the local Podman store while Podman exports it: no spool file, and the two processes
(Podman writing the archive, cwbuild applying it) use the machine's cores at the same time.

Podman writes a docker-archive in a fixed order (containers/image docker/internal/tarfile Writer: each layer
blob as `<diff_id hex>.tar` when it is copied, in the image's layer order; then the config as
`<image id hex>.json`; then the legacy per-layer directories, manifest.json and repositories). So each layer
is applied as it arrives and checked, when its last byte has been read, against the diff_id that
`podman image inspect` reports for its position (RootFS.Layers). The config arrives last: its sha256 must be
the store's image id and its rootfs.diff_ids the layers applied. Any mismatch fails the flatten, and what
was written is removed (`rootfs.flatten_layers`), exactly as for a spooled export.

Images this order cannot serve use the spooled export (`podman.open_exported`): zstd layers (Podman refuses
docker-archive for them) and a layer listed twice (the archive holds its blob once).
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, cast

import requests
import urllib3

from cwbuild.errors import DigestMismatchError, FormatError, ImageError
from cwbuild.image import Destination, resolve_destination
from cwbuild.image.blobs import CHUNK, Digest, HashingReader, check
from cwbuild.image.docker import DOCKER_TAR
from cwbuild.image.model import (
    MAX_CONFIG_BYTES,
    Image,
    Layer,
    Platform,
    config_diff_ids,
    config_platform,
    parse_json,
)
from cwbuild.image.oci import MAX_ARCHIVE_MEMBERS
from cwbuild.image.rootfs import Limits, RootfsResult, flatten, flatten_layers

log = logging.getLogger("cwbuild.image.stream")
_NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)
#: What a failed layer's remainder is drained through to tell a corrupt blob from a bad tar.
_DRAIN_ERRORS = (OSError, *_NETWORK_ERRORS)


def flatten_podman(
    name: str,
    ref: str,
    platform: Platform,
    dest: Destination,
    stack: ExitStack,
    *,
    limits: Limits | None = None,
) -> tuple[Image, RootfsResult]:
    """The image `name` from the store flattened into `dest` (which must not exist; a function of the store's
    size for the image), and the image read."""
    from cwbuild.image import podman  # noqa: PLC0415 - podman-py only when needed

    client = stack.enter_context(podman.podman_client())
    attrs = podman.inspect(client, name)
    size = attrs.get("Size")
    dest = resolve_destination(dest, size if isinstance(size, int) and size >= 0 else None)
    image_id = str(attrs.get("Id", "")).removeprefix("sha256:")
    diff_ids = _store_layers(attrs)
    response = None
    if diff_ids is not None and len(set(diff_ids)) == len(diff_ids):
        try:
            response = podman.export_response(client, image_id, "docker-archive")
        except ImageError as exc:
            _log_fallback(exc.message)
    if response is None:
        image = podman.open_exported(client, attrs, ref, platform, stack)
        return image, flatten(image, dest, limits=limits)
    assert diff_ids is not None  # narrowed above: a response is only requested with them
    digest = attrs.get("Digest")
    with closing(response):
        return flatten_export(
            cast(BinaryIO, response.raw),
            image_id=image_id,
            diff_ids=diff_ids,
            ref=ref,
            dest=dest,
            manifest_digest=digest if isinstance(digest, str) else None,
            limits=limits,
        )


def flatten_export(  # noqa: PLR0913 - keyword-only facts from the store's inspect
    raw: BinaryIO,
    *,
    image_id: str,
    diff_ids: list[str],
    ref: str,
    dest: Path,
    manifest_digest: str | None = None,
    limits: Limits | None = None,
) -> tuple[Image, RootfsResult]:
    """Flatten a docker-archive read once from `raw` in Podman's order, checked against the store's image id
    and layer diff_ids; `dest` is removed again on any failure, including a bad config at the end."""
    archive = _Archive(raw, image_id, ref)
    openers = [partial(archive.layer, i, d) for i, d in enumerate(diff_ids)]
    result = flatten_layers(openers, dest, limits=limits)
    try:
        image = archive.finish(diff_ids, manifest_digest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return image, result


def _log_fallback(why: str) -> None:
    log.debug("docker-archive refused (%s); spooling instead", why)


def _store_layers(attrs: dict[str, Any]) -> list[str] | None:
    rootfs = attrs.get("RootFS")
    layers = rootfs.get("Layers") if isinstance(rootfs, dict) else None
    if not isinstance(layers, list):
        return None
    return [str(Digest.parse(d)) for d in layers]


class _Archive:
    """Podman's docker-archive export, read once in order from the HTTP response."""

    def __init__(self, raw: BinaryIO, image_id: str, ref: str) -> None:
        self.ref = ref
        self.config_name = f"{Digest.parse('sha256:' + image_id.removeprefix('sha256:')).hex}.json"
        self.config: bytes | None = None
        self.sizes: list[int] = []
        self.members = 0
        try:
            self._tar = tarfile.open(fileobj=raw, mode="r|", bufsize=CHUNK)  # noqa: SIM115 - ends with the response
        except (tarfile.TarError, *_NETWORK_ERRORS) as exc:
            raise ImageError(f"{ref}: Podman's export is not a tar archive: {exc}") from exc

    def _next(self) -> tarfile.TarInfo | None:
        try:
            member = self._tar.next()
        except (tarfile.TarError, *_NETWORK_ERRORS) as exc:
            raise ImageError(f"{self.ref}: reading Podman's export failed: {exc}") from exc
        self._tar.members = []  # type: ignore[attr-defined] # stream mode keeps every header; we need none
        self.members += 1
        if self.members > MAX_ARCHIVE_MEMBERS:
            raise FormatError(f"{self.ref}: Podman's export has more than {MAX_ARCHIVE_MEMBERS} members")
        if member is not None and _norm(member.name) == self.config_name and member.isreg():
            if member.size > MAX_CONFIG_BYTES:
                raise ImageError(f"{self.ref}: the image config is larger than {MAX_CONFIG_BYTES} bytes")
            self.config = self._read(member)
        return member

    def _read(self, member: tarfile.TarInfo) -> bytes:
        f = self._tar.extractfile(member)
        try:
            data = f.read() if f is not None else b""
        except (tarfile.TarError, *_NETWORK_ERRORS) as exc:
            raise ImageError(f"{self.ref}: reading Podman's export failed: {exc}") from exc
        if len(data) != member.size:
            raise DigestMismatchError(f"{self.ref}: {member.name} is truncated in Podman's export")
        return data

    @contextmanager
    def layer(self, index: int, diff_id: str) -> Iterator[BinaryIO]:
        """Layer `index`'s tar from the stream; its sha256 must be `diff_id` (checked on a normal exit)."""
        what = f"layer {index + 1} ({diff_id[:19]}…)"
        want = f"{Digest.parse(diff_id).hex}.tar"
        while (member := self._next()) is not None:
            if _norm(member.name) == want and member.isreg():
                break
        else:
            raise ImageError(f"{self.ref}: Podman's export lacks {what} where the store lists it")
        reader = HashingReader(self._tar.extractfile(member), limit=member.size, what=what)  # type: ignore[arg-type] # a regular member always has a file
        try:
            yield io.BufferedReader(reader, CHUNK)
            reader.drain()
        except tarfile.TarError as exc:  # the outer archive: what apply_layer reads is already a LayerError
            raise DigestMismatchError(f"{what} is truncated in Podman's export: {exc}") from exc
        except _NETWORK_ERRORS as exc:
            raise ImageError(f"{self.ref}: reading Podman's export failed: {exc}") from exc
        except Exception as exc:  # re-raised below; a corrupt blob is named in its place instead
            _blame_blob(reader, diff_id, member.size, what, exc)
            raise
        check(reader, digest=Digest.parse(diff_id), size=member.size, what=what)
        self.sizes.append(member.size)

    def finish(self, diff_ids: list[str], manifest_digest: str | None) -> Image:
        """Read the rest of the export; the config must be the store's image and list the layers applied."""
        while self._next() is not None:
            pass
        if self.config is None:
            raise ImageError(f"{self.ref}: Podman's export has no config {self.config_name}")
        got = hashlib.sha256(self.config).hexdigest()
        if f"{got}.json" != self.config_name:
            raise DigestMismatchError(
                f"{self.ref}: the exported config is sha256:{got}, not the store's image"
            )
        config = parse_json(self.config, "image config")
        if config_diff_ids(config) != diff_ids:
            raise ImageError(
                f"{self.ref}: the exported config's layers do not match the store's RootFS.Layers"
            )
        return Image(
            ref=self.ref,
            id=f"sha256:{got}",
            manifest_digest=manifest_digest,
            platform=config_platform(config),
            config=config,
            layers=tuple(Layer(d, d, DOCKER_TAR, s) for d, s in zip(diff_ids, self.sizes, strict=True)),
            _open=self._gone,
        )

    def _gone(self, index: int) -> BinaryIO:
        raise ImageError(f"{self.ref}: layer {index + 1} was streamed from Podman once and is not kept")


def _blame_blob(reader: HashingReader, diff_id: str, size: int, what: str, exc: Exception) -> None:
    """After a failure while applying a streamed layer: if the blob itself is bad, say that instead."""
    if isinstance(exc, DigestMismatchError):
        return
    try:
        reader.drain()
        check(reader, digest=Digest.parse(diff_id), size=size, what=what)
    except DigestMismatchError as mismatch:
        raise mismatch from exc
    except tarfile.TarError as eof:
        raise DigestMismatchError(f"{what} is truncated in Podman's export") from eof
    except _DRAIN_ERRORS:
        return


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")

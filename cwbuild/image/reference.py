"""Image references, as Podman and skopeo spell them (containers-transports(5)).

NAME | containers-storage:NAME     an image in the local Podman store
oci:DIR[:TAG]                     an OCI image layout directory (image-spec v1.1 image-layout.md)
oci-archive:FILE[:TAG]            a tar of an OCI image layout
docker-archive:FILE               `docker save` / `podman save --format docker-archive` output
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cwbuild.errors import UsageError

_MAX_REF = 4096


class Transport(StrEnum):
    """Where an image comes from (the transport prefix of containers-transports(5))."""

    PODMAN = "containers-storage"
    OCI = "oci"
    OCI_ARCHIVE = "oci-archive"
    DOCKER_ARCHIVE = "docker-archive"

    @property
    def is_file(self) -> bool:
        return self is not Transport.PODMAN


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference: a store name, or a path with an optional tag (`oci`, `oci-archive` only)."""

    transport: Transport
    name: str
    tag: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.name)

    def __str__(self) -> str:
        text = f"{self.transport}:{self.name}"
        return f"{text}:{self.tag}" if self.tag else text


def parse_reference(text: str) -> ImageRef:
    """Parse `text`; a reference without a known transport prefix is a Podman store name."""
    if not text or len(text) > _MAX_REF or "\0" in text or text != text.strip():
        raise UsageError(f"invalid image reference {text[:80]!r}")
    prefix, sep, rest = text.partition(":")
    if sep and prefix in {t.value for t in Transport}:
        transport = Transport(prefix)
        if not rest:
            raise UsageError(f"image reference {text!r} names no image")
        if transport is Transport.PODMAN:
            return ImageRef(transport, rest)
        if transport is Transport.DOCKER_ARCHIVE:
            # containers-transports(5) allows docker-archive:PATH[:REF]; a trailing reference selects an image
            # in a multi-image archive, which cwbuild does not support: refuse it rather than misread it.
            return ImageRef(transport, rest)
        return _path_and_tag(transport, rest)
    return ImageRef(Transport.PODMAN, text)


def _path_and_tag(transport: Transport, rest: str) -> ImageRef:
    """`PATH[:TAG]`: the tag is what follows the last colon, if the whole string is not an existing path."""
    path, sep, tag = rest.rpartition(":")
    if not sep or Path(rest).exists() or "/" in tag:
        return ImageRef(transport, rest)
    if not path or not tag:
        raise UsageError(f"invalid {transport} reference {rest!r}", hint=f"use {transport}:PATH[:TAG]")
    return ImageRef(transport, path, tag)

"""The resolved image: identity, platform, parsed config, ordered layers, and verified layer streams."""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import zstandard

from cwbuild.errors import CwbuildError, DigestMismatchError, FormatError, ImageError
from cwbuild.image.blobs import CHUNK, Compression, Digest, HashingReader, check, decompressor

#: Bounds on untrusted image metadata and layers. Manifests and configs are small JSON documents
#: (registries cap manifests at 4 MiB, distribution-spec v1.1 "Pushing Manifests"); layers are bounded too.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 16 << 20
MAX_LAYERS = 1000
MAX_LAYER_BYTES = 1 << 40

#: OCI image-spec v1.1 media-types.md and the Docker image manifest v2 schema 2 equivalents.
LAYER_MEDIA_TYPES: dict[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}
MEDIA_TYPE_FOR: dict[Compression, str] = {
    Compression.NONE: "application/vnd.oci.image.layer.v1.tar",
    Compression.GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
    Compression.ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
}
#: The keys of the OCI image config's `config` object (image-spec v1.1 config.md "Properties") that `inspect`
#: always shows, null when absent.
CONFIG_KEYS = ("Entrypoint", "Cmd", "Env", "WorkingDir", "User")

_DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


@dataclass(frozen=True)
class Layer:
    """One layer as read: the blob's digest, media type and size, and its uncompressed digest (diff_id)."""

    digest: str
    diff_id: str
    media_type: str
    size: int

    @property
    def compression(self) -> Compression:
        return LAYER_MEDIA_TYPES[self.media_type]


@dataclass(frozen=True)
class Platform:
    """os/architecture[/variant] (image-spec v1.1 image-index.md `platform`)."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"invalid platform {text!r}", hint="use OS/ARCH[/VARIANT], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, other: Platform) -> bool:
        """`other` (from an index or config) satisfies this request; no variant requested means any."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return self.variant is None or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def require(self, other: Platform, ref: str) -> None:
        """ImageError unless `other` (an image's config) satisfies this request: a store or archive holds a
        single image, whatever its platform, and nothing else would notice a wrong one before boot."""
        if not self.matches(other):
            raise ImageError(
                f"{ref} is a {other} image, not {self}",
                hint="build or pull the image for the platform the bundle runs on",
            )


@dataclass(frozen=True)
class Image:
    """An image resolved from a reference. Use `layer_stream` to read a layer's tar, checked end to end."""

    ref: str
    id: str
    manifest_digest: str | None
    platform: Platform
    config: dict[str, Any]
    layers: tuple[Layer, ...]
    _open: Callable[[int], BinaryIO] = field(repr=False, compare=False)

    @property
    def created(self) -> str | None:
        value = self.config.get("created")
        return value if isinstance(value, str) else None

    @property
    def runtime_config(self) -> dict[str, Any]:
        """The config's `config` object (Entrypoint, Cmd, Env, WorkingDir, User, ...)."""
        value = self.config.get("config")
        return value if isinstance(value, dict) else {}

    def to_json(self) -> dict[str, Any]:
        """The shape `cwbuild inspect --json` prints (issue 2, item 4)."""
        runtime = {key: self.runtime_config.get(key) for key in CONFIG_KEYS}
        runtime.update({k: v for k, v in self.runtime_config.items() if k not in runtime})
        return {
            "id": self.id,
            "manifest_digest": self.manifest_digest,
            "platform": str(self.platform),
            "layers": [
                {"digest": ly.digest, "diff_id": ly.diff_id, "media_type": ly.media_type, "size": ly.size}
                for ly in self.layers
            ],
            "config": runtime,
        }

    @contextmanager
    def layer_stream(self, index: int) -> Iterator[BinaryIO]:
        """The uncompressed tar of layer `index`. On a normal exit the rest of the stream is read and both the
        blob digest (and size) and the diff_id are checked; on an error inside the block, a corrupt blob is
        reported as `DigestMismatchError` in preference to whatever its corruption caused."""
        layer = self.layers[index]
        what = f"layer {index + 1} ({layer.digest[:19]}…)"
        raw = self._open(index)
        try:
            outer = HashingReader(raw, limit=layer.size, what=what)
            unpacked = decompressor(layer.compression)(io.BufferedReader(outer, CHUNK))
            inner = HashingReader(unpacked, limit=MAX_LAYER_BYTES, what=f"{what} uncompressed")
            try:
                yield io.BufferedReader(inner, CHUNK)
                inner.drain()
            except Exception as exc:
                _blame_blob(outer, layer, what, exc)
                raise
            outer.drain()
            check(outer, digest=Digest.parse(layer.digest), size=layer.size, what=what)
            check(inner, digest=Digest.parse(layer.diff_id), size=None, what=f"{what} uncompressed (diff_id)")
        finally:
            raw.close()


def _blame_blob(outer: HashingReader, layer: Layer, what: str, exc: Exception) -> None:
    """After a failure while reading a layer: if the blob itself is bad, say that instead."""
    if isinstance(exc, DigestMismatchError):
        return
    try:
        outer.drain()
        check(outer, digest=Digest.parse(layer.digest), size=layer.size, what=what)
    except DigestMismatchError as mismatch:
        raise mismatch from exc
    if isinstance(exc, _DECOMPRESSION_ERRORS) and not isinstance(exc, CwbuildError):
        raise FormatError(f"{what} cannot be decompressed: {exc}") from exc


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from untrusted bytes, or `FormatError`."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise FormatError(f"{what} is not a JSON object")
    return value


def config_platform(config: dict[str, Any]) -> Platform:
    os_, arch = config.get("os"), config.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
        raise FormatError("image config lacks os/architecture")
    variant = config.get("variant")
    return Platform(os_, arch, variant if isinstance(variant, str) and variant else None)


def config_diff_ids(config: dict[str, Any]) -> list[str]:
    """rootfs.diff_ids (image-spec v1.1 config.md), each a valid digest."""
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or len(ids) > MAX_LAYERS:
        raise FormatError("image config has no valid rootfs.diff_ids")
    return [str(Digest.parse(d)) for d in ids]

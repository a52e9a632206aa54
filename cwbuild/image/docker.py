"""`docker-archive:` files: `docker save` / `podman save --format docker-archive` output.

The archive's manifest.json lists exactly one image: its config file and its layer files, in order
(moby image/spec/v1.2.md "Combined Image JSON + Filesystem Changeset Format"). Nothing there is digested
except through the config: its sha256 is the image id, and its rootfs.diff_ids name each layer's
uncompressed content, which is checked while the layer streams. Compressed layers (allowed by newer Docker)
are hashed once up front so that `Layer.digest` is known before reading.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cwbuild.errors import FormatError, ImageError
from cwbuild.image.blobs import CHUNK, Compression
from cwbuild.image.model import (
    MAX_CONFIG_BYTES,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    MEDIA_TYPE_FOR,
    Image,
    Layer,
    config_diff_ids,
    config_platform,
    parse_json,
)
from cwbuild.image.oci import TarBlobs

#: The media type of an uncompressed docker-archive layer (Docker image manifest v2 schema 2).
DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


def open_docker_archive(blobs: TarBlobs, ref: str, manifest_digest: str | None = None) -> Image:
    """`blobs` stays open while the Image is used; `manifest_digest` is known only when Podman exported it."""
    doc = _one_image(blobs.read_small("manifest.json", MAX_MANIFEST_BYTES))
    config_name, layer_names = doc["Config"], doc["Layers"]
    config_bytes = blobs.read_small(config_name, MAX_CONFIG_BYTES)
    config = parse_json(config_bytes, "image config")
    diff_ids = config_diff_ids(config)
    if len(diff_ids) != len(layer_names):
        raise FormatError(f"manifest.json lists {len(layer_names)} layers but the config {len(diff_ids)}")
    layers = tuple(_layer(blobs, name, diff_id) for name, diff_id in zip(layer_names, diff_ids, strict=True))
    return Image(
        ref=ref,
        id="sha256:" + hashlib.sha256(config_bytes).hexdigest(),
        manifest_digest=manifest_digest,
        platform=config_platform(config),
        config=config,
        layers=layers,
        _open=lambda i: blobs.open(layer_names[i]),
    )


def _one_image(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise FormatError(f"manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(doc, list) or len(doc) != 1 or not isinstance(doc[0], dict):
        raise ImageError("docker-archive must hold exactly one image", hint="save one image per archive")
    entry = doc[0]
    layers = entry.get("Layers")
    if (
        not isinstance(entry.get("Config"), str)
        or not isinstance(layers, list)
        or len(layers) > MAX_LAYERS
        or not all(isinstance(x, str) for x in layers)
    ):
        raise FormatError("manifest.json entry lacks Config or Layers")
    return entry


def _layer(blobs: TarBlobs, name: str, diff_id: str) -> Layer:
    size = blobs.size(name)
    with blobs.open(name) as f:
        compression = Compression.sniff(f.read(4))
    if compression is Compression.NONE:
        return Layer(diff_id, diff_id, DOCKER_TAR, size)
    digest = hashlib.sha256()
    with blobs.open(name) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return Layer("sha256:" + digest.hexdigest(), diff_id, MEDIA_TYPE_FOR[compression], size)

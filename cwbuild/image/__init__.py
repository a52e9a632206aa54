"""Image input: resolve a reference to a verified image (`open_image`) and flatten it (`rootfs.flatten`).

with open_image("localhost/app:latest") as image:
    image.id, image.manifest_digest, image.platform, image.config, image.created, image.layers
    with image.layer_stream(0) as tar_stream: ...          # uncompressed tar, digest + diff_id checked
    result = flatten(image, dest_dir)                       # cwbuild.image.rootfs
with ExitStack() as stack:
    image, result = flatten_image("localhost/app:latest", dest_dir, stack)  # Podman: while it exports
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from cwbuild.errors import ImageError
from cwbuild.image.blobs import Compression
from cwbuild.image.docker import open_docker_archive
from cwbuild.image.model import Image, Layer, Platform
from cwbuild.image.oci import TarBlobs, open_layout_archive, open_layout_dir
from cwbuild.image.reference import ImageRef, Transport, parse_reference
from cwbuild.image.rootfs import RootfsResult, flatten

__all__ = [
    "DEFAULT_PLATFORM",
    "Image",
    "ImageRef",
    "Layer",
    "Platform",
    "Transport",
    "flatten_image",
    "open_image",
    "parse_reference",
]

DEFAULT_PLATFORM = "linux/amd64"


def _podman(ref: ImageRef, platform: Platform, stack: ExitStack) -> Image:
    from cwbuild.image.podman import open_podman_image  # noqa: PLC0415 - podman-py only when needed

    return open_podman_image(ref.name, str(ref), platform, stack)


def _oci(ref: ImageRef, platform: Platform, _stack: ExitStack) -> Image:
    if not ref.path.is_dir():
        raise ImageError(f"{ref.path} is not a directory")
    return open_layout_dir(ref.path, ref.tag, platform, str(ref))


def _oci_archive(ref: ImageRef, platform: Platform, stack: ExitStack) -> Image:
    blobs = _archive(ref, stack)
    return open_layout_archive(blobs, ref.tag, platform, str(ref))


def _docker_archive(ref: ImageRef, _platform: Platform, stack: ExitStack) -> Image:
    return open_docker_archive(_archive(ref, stack), str(ref))


def _archive(ref: ImageRef, stack: ExitStack) -> TarBlobs:
    if not ref.path.is_file():
        raise ImageError(f"{ref.path} is not a file")
    blobs = TarBlobs(ref.path)
    stack.callback(blobs.close)
    return blobs


_OPENERS: dict[Transport, Callable[[ImageRef, Platform, ExitStack], Image]] = {
    Transport.PODMAN: _podman,
    Transport.OCI: _oci,
    Transport.OCI_ARCHIVE: _oci_archive,
    Transport.DOCKER_ARCHIVE: _docker_archive,
}


@contextmanager
def open_image(ref: str | ImageRef, *, platform: str = DEFAULT_PLATFORM) -> Iterator[Image]:
    """Resolve `ref`; manifests and config are checked here, layers while `Image.layer_stream` reads them.
    Resources (a spool file, a private Podman service) live until the block exits."""
    parsed = parse_reference(ref) if isinstance(ref, str) else ref
    want = Platform.parse(platform)
    with ExitStack() as stack:
        yield _OPENERS[parsed.transport](parsed, want, stack)


#: Where a flatten writes: a path, or a function of the image's uncompressed size (None when unknown, e.g.
#: compressed layers) called once, before anything is written.
Destination = Path | Callable[[int | None], Path]


def flatten_image(
    ref: str | ImageRef, dest: Destination, stack: ExitStack, *, platform: str = DEFAULT_PLATFORM
) -> tuple[Image, RootfsResult]:
    """`open_image` + `rootfs.flatten`, except that an image in the Podman store is flattened while Podman
    exports it (`stream.flatten_podman`). The image's resources live on `stack`; its layers were read once."""
    parsed = parse_reference(ref) if isinstance(ref, str) else ref
    want = Platform.parse(platform)
    if parsed.transport is Transport.PODMAN:
        from cwbuild.image.stream import flatten_podman  # noqa: PLC0415 - podman-py only when needed

        return flatten_podman(parsed.name, str(parsed), want, dest, stack)
    image = _OPENERS[parsed.transport](parsed, want, stack)
    plain = all(layer.compression is Compression.NONE for layer in image.layers)
    return image, flatten(
        image, resolve_destination(dest, sum(ly.size for ly in image.layers) if plain else None)
    )


def resolve_destination(dest: Destination, size: int | None) -> Path:
    return dest if isinstance(dest, Path) else dest(size)

"""OCI image layouts (image-spec v1.1 image-layout.md), as a directory or a tar of one, and the manifest walk
shared with them: index → (platform) → manifest → config + layers, every blob checked against its digest."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cwbuild.errors import FormatError, ImageError
from cwbuild.image.blobs import Digest, read_verified
from cwbuild.image.model import (
    LAYER_MEDIA_TYPES,
    MAX_CONFIG_BYTES,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    Image,
    Layer,
    Platform,
    config_diff_ids,
    config_platform,
    parse_json,
)

#: image-spec v1.1 media-types.md, and Docker's manifest v2 schema 2 / manifest list equivalents.
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
#: image-spec v1.1 annotations.md: the tag of a manifest in an image layout's index.json.
REF_NAME = "org.opencontainers.image.ref.name"
MAX_ARCHIVE_MEMBERS = 100_000

BlobOpener = Callable[[Digest], BinaryIO]


def open_layout_dir(path: Path, tag: str | None, platform: Platform, ref: str) -> Image:
    """An OCI image layout directory."""
    if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
        raise ImageError(f"{path} is not an OCI image layout", hint="it needs oci-layout and index.json")

    def opener(digest: Digest) -> BinaryIO:
        try:
            return (path / "blobs" / "sha256" / digest.hex).open("rb")
        except FileNotFoundError as exc:
            raise ImageError(f"blob {digest} missing from {path}") from exc

    with (path / "index.json").open("rb") as f:
        index = parse_json(f.read(MAX_MANIFEST_BYTES + 1), "index.json")
    return resolve(index, opener, tag=tag, platform=platform, ref=ref)


class TarBlobs:
    """Random access to the regular files of a tar archive (the archive must be a seekable file)."""

    def __init__(self, path: Path) -> None:
        try:
            self._tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by close()
        except (OSError, tarfile.TarError) as exc:
            raise ImageError(f"cannot read archive {path}: {exc}") from exc
        self.path = path
        self._members: dict[str, tarfile.TarInfo] = {}
        for count, member in enumerate(self._tar):
            if count >= MAX_ARCHIVE_MEMBERS:
                raise FormatError(f"{path} has more than {MAX_ARCHIVE_MEMBERS} members")
            self._members[_norm(member.name)] = member
            self._tar.members = []  # type: ignore[attr-defined] # keep memory flat: the index above is all we need

    def open(self, name: str, *, depth: int = 0) -> BinaryIO:
        member = self._members.get(_norm(name))
        if member is not None and member.issym() and depth < 8:
            return self.open(str(Path(_norm(name)).parent / member.linkname), depth=depth + 1)
        if member is None or not member.isreg():
            raise ImageError(f"{name} missing from archive {self.path}")
        stream = self._tar.extractfile(member)
        assert stream is not None
        return stream  # type: ignore[return-value] # ExFileObject is a BinaryIO

    def size(self, name: str) -> int:
        member = self._members.get(_norm(name))
        return member.size if member is not None else -1

    def read_small(self, name: str, limit: int) -> bytes:
        if self.size(name) > limit:
            raise ImageError(f"{name} in {self.path} is larger than {limit} bytes")
        with self.open(name) as f:
            return f.read(limit)

    def close(self) -> None:
        self._tar.close()


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def open_layout_archive(blobs: TarBlobs, tag: str | None, platform: Platform, ref: str) -> Image:
    """A tar of an OCI image layout (`oci-archive:`); `blobs` stays open for the Image's lifetime."""
    if blobs.size("oci-layout") < 0:
        raise ImageError(f"{blobs.path} is not an OCI archive (no oci-layout)")
    index = parse_json(blobs.read_small("index.json", MAX_MANIFEST_BYTES), "index.json")
    return resolve(index, lambda d: blobs.open(f"blobs/sha256/{d.hex}"), tag=tag, platform=platform, ref=ref)


def resolve(
    index: dict[str, Any], opener: BlobOpener, *, tag: str | None, platform: Platform, ref: str
) -> Image:
    """index.json → the manifest named by `tag` (or the only one, or the one for `platform`) → Image."""
    descs = _descriptors(index, "manifests", "index.json")
    if tag is not None:
        descs = [d for d in descs if _annotations(d).get(REF_NAME) == tag]
        if not descs:
            raise ImageError(f"no image tagged {tag!r} in {ref}")
    desc = descs[0] if len(descs) == 1 else _pick_platform(descs, platform, ref)
    for _ in range(2):  # an index may point at one nested index (image-spec v1.1 image-index.md)
        if desc.get("mediaType") not in INDEX_TYPES:
            break
        nested = parse_json(_read_desc(opener, desc, MAX_MANIFEST_BYTES, "image index"), "image index")
        desc = _pick_platform(_descriptors(nested, "manifests", "image index"), platform, ref)
    if desc.get("mediaType") not in MANIFEST_TYPES:
        raise ImageError(f"{ref}: unsupported manifest media type {desc.get('mediaType')!r}")
    manifest_bytes = _read_desc(opener, desc, MAX_MANIFEST_BYTES, "manifest")
    return _from_manifest(manifest_bytes, str(Digest.parse(desc["digest"])), opener, ref)


def _from_manifest(data: bytes, manifest_digest: str, opener: BlobOpener, ref: str) -> Image:
    manifest = parse_json(data, "manifest")
    config_desc = manifest.get("config")
    if not isinstance(config_desc, dict):
        raise FormatError("manifest has no config descriptor")
    config_bytes = _read_desc(opener, config_desc, MAX_CONFIG_BYTES, "image config")
    config = parse_json(config_bytes, "image config")
    layer_descs = _descriptors(manifest, "layers", "manifest")
    diff_ids = config_diff_ids(config)
    if len(diff_ids) != len(layer_descs) or len(layer_descs) > MAX_LAYERS:
        raise FormatError(f"manifest lists {len(layer_descs)} layers but the config {len(diff_ids)} diff_ids")
    layers = tuple(_layer(d, diff_id) for d, diff_id in zip(layer_descs, diff_ids, strict=True))
    return Image(
        ref=ref,
        id=str(Digest.parse(config_desc["digest"])),
        manifest_digest=manifest_digest,
        platform=config_platform(config),
        config=config,
        layers=layers,
        _open=lambda i: opener(Digest.parse(layers[i].digest)),
    )


def _layer(desc: dict[str, Any], diff_id: str) -> Layer:
    media_type = desc.get("mediaType")
    if media_type not in LAYER_MEDIA_TYPES:
        raise ImageError(f"unsupported layer media type {media_type!r}")
    return Layer(str(Digest.parse(desc.get("digest"))), diff_id, media_type, _size(desc))


def _read_desc(opener: BlobOpener, desc: dict[str, Any], limit: int, what: str) -> bytes:
    digest = Digest.parse(desc.get("digest"))
    with opener(digest) as raw:
        return read_verified(raw, digest=digest, size=_size(desc), limit=limit, what=what)


def _size(desc: dict[str, Any]) -> int:
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"descriptor has an invalid size {size!r}")
    return size


def _descriptors(doc: dict[str, Any], key: str, what: str) -> list[dict[str, Any]]:
    value = doc.get(key)
    if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):
        raise FormatError(f"{what} has no valid {key!r} list")
    if key == "manifests" and not value:
        raise ImageError(f"{what} lists no images")
    return value


def _annotations(desc: dict[str, Any]) -> dict[str, Any]:
    value = desc.get("annotations")
    return value if isinstance(value, dict) else {}


def _pick_platform(descs: list[dict[str, Any]], want: Platform, ref: str) -> dict[str, Any]:
    for desc in descs:
        plat = desc.get("platform")
        if not isinstance(plat, dict):
            continue
        found = Platform(str(plat.get("os", "")), str(plat.get("architecture", "")), plat.get("variant"))
        if want.matches(found):
            return desc
    raise ImageError(f"{ref} has no image for platform {want}", hint="choose one with --platform")

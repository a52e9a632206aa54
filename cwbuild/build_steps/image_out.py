"""`--tag`: the bundle as a FROM-scratch, single-layer OCI image loaded into Podman through its REST API, or
(`--tag oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`) written as an OCI image layout by cwbuild itself, the same
image (same config bytes, same id) at the cost of a copy and one SHA-256 pass (hashlib: OpenSSL, SHA-NI).

The layer holds the bundle's files (for `--target krun`, exactly buildah mkcw's four: entrypoint,
krun-sev.json, tmp/, disk.img, so crun + libkrun run it as buildah's). Labels say what it is, so
`cwbuild inspect IMAGE` and `podman image inspect` show the workload without unpacking it. The layer is
produced deterministically (sorted names, owner 0, mtime SOURCE_DATE_EPOCH) and a docker-archive around it
(layer, then config, then manifest.json) is streamed to `POST /images/load` in one pass: the bundle's files
are read once and never copied to a temporary file.

What Podman 4.3.1 does with it, per byte (strace of the service, the bench's 446 MB bundle, 2 shared cores):
spools the body to /var/tmp (0.5 s when the client only sends it); unpacks it as an oci-archive attempt into
/var/tmp (0.3-1.3 s, avoided: `NOT_OCI_LINK`); copies the layer into a pending blob file, checking its digest
and computing its diff_id on the way: two SHA-256 passes in Go 1.19 (2.2-3 s; perf of `podman load`: 43% of
its samples in the AVX2 sha256 block function, the CPU's SHA-NI unused); applies it to the store: tar-split's
CRC-64 in the service, the extraction in a chrooted child (0.7-2 s). No fsync of the data, a few fdatasync of
the store's metadata. The copy and the application are what every way in through the API costs at least: `POST
/commit` of a container the files are written into (the layer diffed into one more temporary blob first, then
the same copy: 6.1 s, 7.9 s squashed into one layer, against 4.7-5.1 s for `podman load` of the same archive,
and the config's creation time is the commit's), `POST /images/import` (the tarball transport reads the file
twice more to hash it: 6.2-7.2 s). So the bundle is loaded, with as little as possible around Podman's own
copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import IO, Any, cast

import requests
from podman import PodmanClient
from podman.errors import APIError, PodmanError

from cwbuild.build import BuildContext, chmod_tree
from cwbuild.config import BuildTarget
from cwbuild.errors import BuildError, UsageError
from cwbuild.image.podman import podman_client
from cwbuild.image.reference import ImageRef, Transport
from cwbuild.interrupts import deferred

#: Label keys (OCI annotations/labels use reverse-DNS prefixes: image-spec annotations.md "Rules").
LABEL_PREFIX = "org.cwbuild."
LABEL_BUNDLE = LABEL_PREFIX + "bundle"
#: buildah mkcw's image layer (cw-format.md §1.3), in the order `buildah push` writes it (sorted).
KRUN_LAYER = ("disk.img", "entrypoint", "krun-sev.json", "tmp")
CHUNK = 1 << 20
#: The layer's name in the docker-archive (any name works: manifest.json lists it).
DOCKER_LAYER = "layer.tar"
#: The archive's first member: a hard link to a name the archive does not hold. Podman's load (libimage
#: `Runtime.Load`, containers/common v0.50.1 as in Podman 4.3.1, the same order at the 2025 head) tries the
#: body as an OCI directory, then as an oci-archive, whose source (containers/image v5.23.1 oci/archive
#: `createUntarTempDir`) unpacks the whole archive into a temporary directory before it finds no
#: index.json, and only then as a docker-archive. The unpacking (containers/storage v1.43.0 pkg/archive
#: `Unpack`) stops at this member, whose link target does not exist, so the bundle is not written out once
#: more for nothing; the docker-archive reader finds members by name (manifest.json and what it lists) and
#: never opens this one, and the image is the same (same id) with or without it.
NOT_OCI_LINK = (".cwbuild-docker-archive", ".cwbuild-absent")


def labels(ctx: BuildContext) -> dict[str, str]:
    spec = ctx.spec
    out = {
        LABEL_BUNDLE: "1",
        LABEL_PREFIX + "workload-id": spec.workload_id,
        LABEL_PREFIX + "target": str(spec.target),
        LABEL_PREFIX + "tee": ctx.facts["manifest"]["tee"],
        LABEL_PREFIX + "development-only": "true" if spec.development_only else "false",
        LABEL_PREFIX + "source-image": str(ctx.facts["image"]["id"]),
    }
    for tee, entry in sorted(ctx.facts.get("measurements", {}).items()):
        value = entry.get("measurement") or entry.get("mrtd")
        if value:
            out[f"{LABEL_PREFIX}measurement.{tee}"] = value
    return out


def _members(root: Path, target: BuildTarget) -> Iterator[Path]:
    if target is BuildTarget.KRUN:
        yield from (root / name for name in KRUN_LAYER)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        if base != root:
            yield base
        yield from (base / name for name in sorted(filenames))


def _tarinfo(path: Path, name: str, mtime: int) -> tarfile.TarInfo:
    st = path.lstat()
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = mtime
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISREG(st.st_mode):
        info.size = st.st_size
    else:
        raise BuildError(f"bundle entry {name} is neither a file nor a directory")
    return info  # uid/gid 0, empty uname/gname: TarInfo's defaults


def _member(info: tarfile.TarInfo, body: Path | bytes | None) -> Iterator[bytes]:
    """One tar member: its header (POSIX.1-2001 pax when needed), data, zero padding to 512."""
    yield info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    if isinstance(body, bytes):
        yield body
    elif body is not None:
        left = info.size
        with body.open("rb") as f:
            while left and (chunk := f.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk
        if left:
            raise BuildError(f"{body.name} changed size while being stored")
    if info.size % tarfile.BLOCKSIZE:
        yield bytes(tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)


def layer_stream(root: Path, *, target: BuildTarget, mtime: int) -> Iterator[bytes]:
    """The bundle as an uncompressed tar, produced on the fly: sorted, owner 0:0, fixed mtime."""
    for path in _members(root, target):
        info = _tarinfo(path, path.relative_to(root).as_posix(), mtime)
        yield from _member(info, path if info.isreg() else None)
    yield bytes(2 * tarfile.BLOCKSIZE)  # end-of-archive marker (POSIX ustar: two zero blocks)


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def image_config(ctx: BuildContext, diff_id: str, created: str) -> dict[str, Any]:
    config: dict[str, Any] = {"Labels": labels(ctx)}
    if ctx.spec.target is BuildTarget.KRUN:
        config["Entrypoint"] = ["/entrypoint"]  # buildah mkcw's SetEntrypoint (cw-format.md §1.8)
    return {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": f"cwbuild build --target {ctx.spec.target}"}],
    }


def config_blob(ctx: BuildContext, diff_id: str, mtime: int) -> tuple[str, bytes]:
    """The config's digest (the image id) and bytes: the same for Podman and for an OCI layout."""
    return _blob(json.dumps(image_config(ctx, diff_id, _rfc3339(mtime)), sort_keys=True).encode())


def layer_size(root: Path, *, target: BuildTarget, mtime: int) -> int:
    """The length of `layer_stream`'s output, from the headers and file sizes alone (no data read)."""
    size = 2 * tarfile.BLOCKSIZE
    for path in _members(root, target):
        info = _tarinfo(path, path.relative_to(root).as_posix(), mtime)
        size += len(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
        size += info.size + (-info.size % tarfile.BLOCKSIZE)
    return size


def _not_oci_member(mtime: int) -> bytes:
    info = tarfile.TarInfo(NOT_OCI_LINK[0])
    info.type, info.linkname, info.mtime = tarfile.LNKTYPE, NOT_OCI_LINK[1], mtime
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


class DockerArchive:
    """A docker-archive (moby image/spec/v1.2.md "Combined Image JSON + Filesystem Changeset Format") of the
    bundle, produced in one pass by iterating: `NOT_OCI_LINK`; the layer, as `layer.tar`, hashed while it is
    sent; then the config naming that diff_id; then manifest.json, which a reader finds wherever it is (Podman
    spools the upload and reads it as a file). An oci-archive Podman first unpacks into a temporary layout,
    which cost 6.4-6.8 s against 3.9 s for the bench's 450 MB bundle. `image_id` (the config's digest) is
    known once the iteration has ended; `on_end` is called then, before the last block goes out."""

    def __init__(self, ctx: BuildContext, *, mtime: int, on_end: Callable[[], None] = lambda: None) -> None:
        self._ctx, self._mtime, self._on_end = ctx, mtime, on_end
        self.image_id: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        root, target, mtime = self._ctx.spec.output, self._ctx.spec.target, self._mtime
        size = layer_size(root, target=target, mtime=mtime)
        yield _not_oci_member(mtime)
        info = tarfile.TarInfo(DOCKER_LAYER)
        info.size, info.mode, info.mtime = size, 0o644, mtime
        yield info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
        h, sent = hashlib.sha256(), 0
        for chunk in layer_stream(root, target=target, mtime=mtime):
            h.update(chunk)
            sent += len(chunk)
            yield chunk
        if sent != size:
            raise BuildError("the bundle changed while it was being stored as an image")
        yield bytes(-size % tarfile.BLOCKSIZE)
        cfg_digest, cfg = config_blob(self._ctx, f"sha256:{h.hexdigest()}", mtime)
        manifest = [{"Config": f"{cfg_digest[7:]}.json", "RepoTags": None, "Layers": [DOCKER_LAYER]}]
        for name, data in ((f"{cfg_digest[7:]}.json", cfg), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, mtime
            yield from _member(info, data)
        self.image_id = cfg_digest
        self._on_end()
        yield bytes(2 * tarfile.BLOCKSIZE)


_API_ERRORS = (APIError, PodmanError, OSError, ValueError, requests.RequestException)


def store_bundle_image(ctx: BuildContext, tag: str) -> str:
    """Stream the bundle as a docker-archive into Podman, then tag it; returns the image id. The image's
    removal is in `ctx.rollbacks` before this returns, also when the tagging fails. SIGTERM/SIGHUP/SIGINT are
    held (`deferred`) from the end of the upload until then: a signal while Podman stores the layer would
    otherwise leave a bundle-sized image nobody removes (the server finishes the load, the client never
    learns its id); before that, an interrupted upload is an incomplete body, which Podman refuses."""
    repo, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
    with ExitStack() as held:
        archive = DockerArchive(
            ctx, mtime=int(ctx.facts["source_date_epoch"]), on_end=lambda: held.enter_context(deferred())
        )
        try:
            with podman_client() as client:
                names = _load(client, archive)
                for name in names:
                    ctx.rollbacks.append(partial(_remove, name))
                image_id = archive.image_id
                if image_id is None or names != [image_id]:
                    raise BuildError(f"Podman loaded {names}, not the bundle image {image_id}")
                client.images.get(image_id).tag(repo, version or "latest")
        except _API_ERRORS as exc:
            raise BuildError(f"storing the bundle image in Podman failed: {exc}") from exc
    return image_id


def _load(client: PodmanClient, archive: DockerArchive) -> list[str]:
    """The ids Podman reports loaded. requests sends an iterable of bytes as a chunked body, each chunk as
    it comes (podman-py's `_Data` type leaves iterables out); a file-like body goes in urllib3's 16 KiB
    blocks."""
    body = cast(Any, archive)
    resp = client.api.post("/images/load", data=body, headers={"Content-Type": "application/x-tar"})
    resp.raise_for_status()
    names = resp.json().get("Names")
    if not isinstance(names, list) or not names:
        raise BuildError("Podman loaded no image from the bundle archive")
    return [str(name) for name in names]


def _remove(image_id: str) -> None:
    try:
        with podman_client() as client:
            client.images.remove(image_id, force=True)
    except (APIError, PodmanError, OSError, requests.RequestException) as exc:
        raise BuildError(f"cannot remove image {image_id[:19]}: {exc}") from exc


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"  # uncompressed: its digest is its diff_id
OCI_REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
#: The layer's name in an oci-archive until its digest is known (same length: the header is rewritten).
_PENDING_LAYER = "blobs/sha256/" + "0" * 64


def write_oci_image(ctx: BuildContext, ref: ImageRef) -> str:
    """`--tag oci:DIR[:TAG]` / `oci-archive:FILE[:TAG]`: the image Podman would store (same config bytes, so
    the same id, which this returns) as an OCI image layout (image-spec v1.1 image-layout.md), or a tar of
    one. Written into a private temporary directory beside the destination, the layer hashed as it is written,
    then renamed into place; removed on any failure (SIGTERM is SystemExit in a build). The removal of the
    destination is in `ctx.rollbacks` before this returns (signals are held from the rename until then)."""
    dest, mtime = ref.path, int(ctx.facts["source_date_epoch"])
    name = ref.tag or "latest"
    try:
        with ExitStack() as stack:
            with deferred():  # made and its removal registered before a signal is acted on
                tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.absolute().parent))
                stack.callback(_remove_held, tmp)
            if ref.transport is Transport.OCI:
                image_id = _write_layout_dir(ctx, tmp, mtime, name)
                chmod_tree(tmp)
                written = tmp
            else:
                written = tmp / "image.tar"
                with written.open("xb") as f:
                    image_id = _write_layout_tar(ctx, f, mtime, name)
                written.chmod(0o644)
            with deferred():
                if os.path.lexists(dest):
                    raise UsageError(f"{dest} appeared during the build; not overwriting it")
                os.rename(written, dest)
                ctx.rollbacks.append(partial(_remove_path, dest))
    except OSError as exc:
        raise BuildError(f"writing the bundle image to {ref} failed: {exc.strerror or exc}") from exc
    return image_id


def _remove_held(path: Path) -> None:
    with deferred():  # a signal does not cut the removal short
        shutil.rmtree(path, ignore_errors=True)


def _write_hashed(f: IO[bytes], chunks: Iterator[bytes]) -> tuple[str, int]:
    """Write `chunks` to `f`: their sha256 ("sha256:HEX") and length, nothing read back."""
    h, size = hashlib.sha256(), 0
    for chunk in chunks:
        h.update(chunk)
        f.write(chunk)
        size += len(chunk)
    return f"sha256:{h.hexdigest()}", size


def _layout_docs(
    ctx: BuildContext, layer: str, size: int, mtime: int, name: str
) -> tuple[str, list[tuple[str, bytes]], bytes]:
    """The image id (the config's digest), the config and manifest blobs with their digests, index.json."""
    cfg_digest, cfg = config_blob(ctx, layer, mtime)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": len(cfg)},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer, "size": size}],
    }
    man_digest, man = _blob(json.dumps(manifest, sort_keys=True).encode())
    entry = {
        "mediaType": OCI_MANIFEST,
        "digest": man_digest,
        "size": len(man),
        "annotations": {OCI_REF_NAME: name},
    }
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    return cfg_digest, [(cfg_digest, cfg), (man_digest, man)], json.dumps(index, sort_keys=True).encode()


def _write_layout_dir(ctx: BuildContext, root: Path, mtime: int, name: str) -> str:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    pending = blobs / ".layer.partial"
    with pending.open("xb") as f:
        layer, size = _write_hashed(f, layer_stream(ctx.spec.output, target=ctx.spec.target, mtime=mtime))
    pending.rename(blobs / layer[7:])
    image_id, small, index = _layout_docs(ctx, layer, size, mtime, name)
    for digest, data in small:
        (blobs / digest[7:]).write_bytes(data)
    (root / "oci-layout").write_bytes(OCI_LAYOUT)
    (root / "index.json").write_bytes(index)
    return image_id


def _header(name: str, mtime: int, size: int | None) -> bytes:
    """A tar header: a 0644 file of `size` bytes, or (None) a 0755 directory; owner 0:0."""
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    if size is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = size, 0o644
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _write_layout_tar(ctx: BuildContext, f: IO[bytes], mtime: int, name: str) -> str:
    """The layout as an uncompressed tar (what skopeo's oci-archive: reads). The layer member's header is
    written with a placeholder name and rewritten in place once the layer's digest is known."""
    root, target = ctx.spec.output, ctx.spec.target
    size = layer_size(root, target=target, mtime=mtime)
    for dirname in ("blobs", "blobs/sha256"):
        f.write(_header(dirname, mtime, None))
    f.write(_header("oci-layout", mtime, len(OCI_LAYOUT)) + OCI_LAYOUT)
    f.write(bytes(-len(OCI_LAYOUT) % tarfile.BLOCKSIZE))
    at = f.tell()
    pending = _header(_PENDING_LAYER, mtime, size)
    f.write(pending)
    layer, sent = _write_hashed(f, layer_stream(root, target=target, mtime=mtime))
    if sent != size:
        raise BuildError("the bundle changed while it was being stored as an image")
    f.write(bytes(-size % tarfile.BLOCKSIZE))
    header = _header(f"blobs/sha256/{layer[7:]}", mtime, size)
    if len(header) != len(pending):
        raise BuildError("internal: the layer's tar header changed length")
    f.seek(at)
    f.write(header)
    f.seek(0, os.SEEK_END)
    image_id, small, index = _layout_docs(ctx, layer, size, mtime, name)
    members = [(f"blobs/sha256/{digest[7:]}", data) for digest, data in small]
    for member, data in [*members, ("index.json", index)]:
        f.write(_header(member, mtime, len(data)) + data + bytes(-len(data) % tarfile.BLOCKSIZE))
    f.write(bytes(2 * tarfile.BLOCKSIZE))
    return image_id


def _remove_path(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot remove {path}: {exc.strerror or exc}") from exc


def _rfc3339(epoch: int) -> str:
    import datetime as dt  # noqa: PLC0415

    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

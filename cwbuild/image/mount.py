"""The rootfs of an image in the local Podman store, used in place: a container is created from the image and
its storage mounted through the libpod REST API (`POST /libpod/containers/create`, `.../{id}/mount`), so
nothing is exported and no layer is applied by cwbuild. Root only (the store's overlay mount needs it).

The container is never initialised or started, so Podman writes nothing into its tree (no /etc/hosts, no
work directory, no volume mount points: `image_volume_mode` is `ignore`, the network namespace `none`). It is
unmounted and removed on every exit path (the `ExitStack` given).

What is checked: the container's image is the resolved image; the image config is read from the store
(containers/storage keeps it as the image's big-data item `sha256:<id>`) and must hash to the image id and
list the store's RootFS.Layers. Anything the export path would treat differently makes `mount_rootfs` return
None, and the caller exports instead: not root, a mount that fails, a store driver other than overlay or vfs,
device nodes in the tree (the export path skips and lists them), or a store layout it does not know.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from podman import PodmanClient
from podman.errors import APIError, PodmanError

from cwbuild.errors import CwbuildError, ImageError
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
from cwbuild.image.rootfs import RootfsResult
from cwbuild.interrupts import deferred

log = logging.getLogger("cwbuild.image.mount")
#: A store's images.json and layers.json hold one record per image/layer on the machine; bounded all the same.
MAX_STORE_JSON = 64 << 20
#: Store drivers whose image and layer records (`DRIVER-images/`, `DRIVER-layers/layers.json`) are read here;
#: vfs gives a container a full copy of the image's tree, overlay a mount of the layers' directories.
STORE_DRIVERS = ("overlay", "vfs")
_API_ERRORS = (APIError, PodmanError, OSError, requests.RequestException, ValueError, KeyError, TypeError)


class _NoMount(Exception):
    """The mount path cannot serve this image; the reason is logged and the export path used."""


@dataclass(frozen=True)
class MountedRootfs:
    """An image's tree, mounted read-write in a private container's storage (writes go to its upper dir)."""

    image: Image
    result: RootfsResult


def mount_rootfs(name: str, ref: str, stack: ExitStack, platform: Platform) -> MountedRootfs | None:
    """`name`'s tree mounted (or None, with the reason logged, if the export path must be used instead).
    An image whose config is not for `platform` is an ImageError, before any container is made."""
    if os.geteuid() != 0:
        log.info("rootfs via export: not running as root")
        return None
    from cwbuild.image import podman  # noqa: PLC0415 - podman-py only when needed

    client = stack.enter_context(podman.podman_client())
    attrs = podman.inspect(client, name)
    with ExitStack() as inner:  # a refused mount is undone at once, before the export starts
        try:
            mounted = _mount(client, attrs, ref, inner, platform)
        except _NoMount as exc:
            log.info("rootfs via export: %s", exc)
            return None
        stack.push(inner.pop_all())
    return mounted


def _mount(
    client: PodmanClient, attrs: dict[str, Any], ref: str, stack: ExitStack, platform: Platform
) -> MountedRootfs:
    image_id = str(attrs.get("Id", "")).removeprefix("sha256:")
    if len(image_id) != 64:
        raise _NoMount(f"the store reports image id {image_id[:80]!r}")
    graph_root, driver = _store(client)
    if driver not in STORE_DRIVERS:
        raise _NoMount(f"the store's driver is {driver!r}, not one of {', '.join(STORE_DRIVERS)}")
    config = _store_config(graph_root, driver, image_id)
    platform.require(config_platform(config), ref)
    rootfs = attrs.get("RootFS")
    diff_ids = rootfs.get("Layers") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or config_diff_ids(config) != diff_ids:
        raise _NoMount("the config's layers are not the store's RootFS.Layers")
    sizes, chain = _layers(graph_root, driver, image_id, diff_ids)
    check = _overlay_check(chain) if driver == "overlay" else _vfs_check(chain)
    # A signal during a request would leave the server's work unknown to us (and a removal sent at once can
    # overtake the creation): both requests complete, with their undo registered, before a signal is acted on.
    cid = f"cwbuild-rootfs-{os.urandom(6).hex()}"
    with deferred():
        stack.callback(_remove, client, cid)  # by name: covers a failed request the server did carry out
        _create(client, image_id, cid)
        stack.callback(_unmount, client, cid)
        path = _mount_container(client, cid)
    _check_container(client, cid, image_id)
    entries, total = _scan(path, check)
    digest = attrs.get("Digest")
    image = Image(
        ref=ref,
        id=f"sha256:{image_id}",
        manifest_digest=digest if isinstance(digest, str) else None,
        platform=config_platform(config),
        config=config,
        layers=tuple(Layer(d, d, DOCKER_TAR, s) for d, s in zip(diff_ids, sizes, strict=True)),
        _open=_not_read,
    )
    return MountedRootfs(image, RootfsResult(path, entries, total, (), ()))


def _not_read(index: int) -> Any:
    raise ImageError(f"layer {index + 1} was not read: the rootfs came from Podman's mount")


def _store(client: PodmanClient) -> tuple[Path, str]:
    try:
        response = client.api.get("/info")
        response.raise_for_status()
        store = response.json()["store"]
        return Path(str(store["graphRoot"])), str(store["graphDriverName"])
    except _API_ERRORS as exc:
        raise _NoMount(f"podman info: {exc}") from None


def _store_config(graph_root: Path, driver: str, image_id: str) -> dict[str, Any]:
    """containers/storage images.go: an image's big data item KEY is the file `=` + base64(KEY)."""
    key = base64.b64encode(f"sha256:{image_id}".encode()).decode()
    path = graph_root / f"{driver}-images" / image_id / f"={key}"
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise _NoMount(f"cannot read the image config in the store: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES or hashlib.sha256(data).hexdigest() != image_id:
        raise _NoMount("the store's image config does not hash to the image id")
    try:
        return parse_json(data, "image config")
    except CwbuildError as exc:
        raise _NoMount(exc.message) from None


def _read_json(path: Path) -> Any:
    with path.open("rb") as f:
        data = f.read(MAX_STORE_JSON + 1)
    if len(data) > MAX_STORE_JSON:
        raise ValueError(f"{path} is over {MAX_STORE_JSON} bytes")
    return json.loads(data)


def _layers(graph_root: Path, driver: str, image_id: str, diff_ids: list[str]) -> tuple[list[int], _Chain]:
    """The image's layers from the store's records (containers/storage `DRIVER-images/images.json` names the
    top layer, `DRIVER-layers/layers.json` each layer's parent, `diff-digest`, `diff-size` and `created`):
    the sizes as the export reports them, bottom first, and each layer's directory with the time it was
    recorded in the store (before it was extracted), top first."""
    try:
        images = _read_json(graph_root / f"{driver}-images" / "images.json")
        top = next(str(r["layer"]) for r in images if r.get("id") == image_id)
        records = {str(r["id"]): r for r in _read_json(graph_root / f"{driver}-layers" / "layers.json")}
        chain: list[dict[str, Any]] = []
        layer: str | None = top
        while layer:
            if len(chain) >= len(diff_ids):
                raise ValueError("the layer chain is longer than the image's layers")
            chain.append(records[layer])
            layer = records[layer].get("parent")
        sizes = [r["diff-size"] for r in reversed(chain)]
        if [r["diff-digest"] for r in reversed(chain)] != diff_ids:
            raise ValueError("the store's layer chain is not the image's RootFS.Layers")
        dirs = [
            (_layer_dir(graph_root, driver, str(r["id"])), _nanoseconds(str(r["created"]))) for r in chain
        ]
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        raise _NoMount(f"cannot read the store's layer records: {exc!r}") from None
    if not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise _NoMount("the store's layer sizes are not sizes")
    return sizes, dirs


def _layer_dir(graph_root: Path, driver: str, layer_id: str) -> Path:
    """containers/storage drivers: overlay keeps a layer's files in overlay/ID/diff, vfs in vfs/dir/ID."""
    if not re.fullmatch(r"[0-9a-f]{64}", layer_id):
        raise ValueError(f"layer id {layer_id[:80]!r}")
    return (
        graph_root / "overlay" / layer_id / "diff"
        if driver == "overlay"
        else graph_root / "vfs/dir" / layer_id
    )


def _nanoseconds(text: str) -> int:
    """RFC 3339 with up to nanoseconds (Go's time.Time JSON) to nanoseconds since the epoch."""
    m = re.fullmatch(r"([^.]+?)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", text)
    if m is None:
        raise ValueError(f"time {text[:60]!r} is not RFC 3339")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    whole = int(datetime.fromisoformat(m.group(1) + zone).timestamp())
    return whole * 10**9 + int((m.group(2) or "0").ljust(9, "0"))


def _create(client: PodmanClient, image_id: str, name: str) -> None:
    # libpod SpecGenerator: never started, so the command is never looked up.
    spec = {
        "image": image_id,
        "command": ["/.cwbuild-never-run"],
        "netns": {"nsmode": "none"},
        "image_volume_mode": "ignore",
        "name": name,
    }
    try:
        response = client.api.post(
            "/containers/create", data=json.dumps(spec), headers={"content-type": "application/json"}
        )
        response.raise_for_status()
    except _API_ERRORS as exc:
        raise _NoMount(f"creating a container from the image failed: {exc}") from None


def _mount_container(client: PodmanClient, cid: str) -> Path:
    try:
        response = client.api.post(f"/containers/{quote(cid, safe='')}/mount")
        response.raise_for_status()
        text = response.text.strip()
    except _API_ERRORS as exc:
        raise _NoMount(f"mounting the container failed: {exc}") from None
    if text.startswith('"'):
        text = str(json.loads(text))
    path = Path(text)
    if not path.is_absolute() or not path.is_dir():
        raise _NoMount(f"the container's mount {text[:200]!r} is not a directory")
    return path


def _check_container(client: PodmanClient, cid: str, image_id: str) -> None:
    try:
        response = client.api.get(f"/containers/{quote(cid, safe='')}/json")
        response.raise_for_status()
        got = str(response.json()["Image"]).removeprefix("sha256:")
    except _API_ERRORS as exc:
        raise _NoMount(f"inspecting the container failed: {exc}") from None
    if got != image_id:
        raise ImageError(f"the mounted container's image is {got[:12]}, not {image_id[:12]}")


def _unmount(client: PodmanClient, cid: str) -> None:
    _undo(client, "post", f"/containers/{quote(cid, safe='')}/unmount", cid, "unmounting")


def _remove(client: PodmanClient, cid: str) -> None:
    _undo(client, "delete", f"/containers/{quote(cid, safe='')}?force=true&v=true", cid, "removing")


def _undo(client: PodmanClient, method: str, path: str, cid: str, what: str) -> None:
    """A cleanup request; a container that was never made (404) is nothing to undo."""
    try:
        response = getattr(client.api, method)(path)
        if response.status_code != HTTPStatus.NOT_FOUND:
            response.raise_for_status()
    except APIError as exc:
        if getattr(exc, "status_code", None) != HTTPStatus.NOT_FOUND and "no such container" not in str(exc):
            log.warning("%s container %s failed: %s (podman rm -f %s)", what, cid, exc, cid)
    except _API_ERRORS as exc:
        log.warning("%s container %s failed: %s (podman rm -f %s)", what, cid, exc, cid)


#: An image's layer directories in the store, top first, each with when it was recorded there (ns).
_Chain = list[tuple[Path, int]]
#: A directory's path below the root and its lstat: raises `_NoMount` if the export path's would differ.
DirCheck = Callable[[str, os.stat_result], None]


def _overlay_check(chain: _Chain) -> DirCheck:
    """overlay shows a directory with the metadata of the topmost layer holding it: that layer's own entry
    for it, unless the layer only wrote into it, when it is Podman's extraction time (newer than the layer's
    record in the store) and the implicit 0755 root:root, hiding the lower layer's entry that cwbuild keeps
    (rootfs.py)."""

    def check(rel: str, st: os.stat_result) -> None:
        for layer_dir, recorded in chain:
            try:
                held = stat.S_ISDIR(os.lstat(layer_dir / rel).st_mode)
            except FileNotFoundError:
                continue
            if held and st.st_mtime_ns > recorded:
                raise _NoMount(f"directory /{rel[:200]} carries Podman's extraction time, not its entry's")
            return

    return check


def _vfs_check(chain: _Chain) -> DirCheck:
    """vfs copies the layer below (times kept) and applies the next layer onto the copy: a directory's
    metadata was set by the lowest layer from which it is unchanged up to the top, and a mtime newer than
    that layer's record is the time the layer wrote into it without an entry of its own."""

    def check(rel: str, st: os.stat_result) -> None:
        key = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
        recorded = chain[0][1]
        for layer_dir, when in chain:
            try:
                lst = os.lstat(layer_dir / rel)
            except FileNotFoundError:
                break
            if (lst.st_mode, lst.st_uid, lst.st_gid, lst.st_mtime_ns) != key:
                break
            recorded = when
        if st.st_mtime_ns > recorded:
            raise _NoMount(f"directory /{rel[:200]} carries Podman's extraction time, not its entry's")

    return check


def _scan(root: Path, check_dir: DirCheck) -> tuple[int, int]:
    """(entries, bytes) of the tree, or `_NoMount` where the export path's tree would differ: a device node
    or socket (the export path skips devices and lists them), or a directory `check_dir` refuses.
    The root itself is not checked: it is the container's own directory, and mke2fs 1.47.0 `-d` takes none
    of its metadata (root is 0755 root:root at mke2fs's clock whatever the tree's root is; checked by hand:
    two roots differing in mode, owner and mtime give the same image)."""
    entries, total = 0, 0
    prefix = len(str(root)) + 1
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                entries += 1
                if stat.S_ISDIR(st.st_mode):
                    check_dir(entry.path[prefix:], st)
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    total += st.st_size
                elif not (stat.S_ISLNK(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
                    raise _NoMount(f"/{entry.path[prefix:][:200]} is a device node or socket")
    return entries, total

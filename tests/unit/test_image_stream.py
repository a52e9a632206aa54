"""A docker-archive flattened while it is read once, in Podman's order (layers, then config, then the rest):
the same tree and image as the spooled path, and every mismatch with the store's facts refused with the
partial tree removed."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from cwbuild.errors import DigestMismatchError, ImageError
from cwbuild.image import open_image
from cwbuild.image.rootfs import flatten
from cwbuild.image.stream import flatten_export
from tests.imagekit import E, config_for, docker_archive, layer_tar, sha

TARS = [
    layer_tar([E("etc/a", data=b"one\n", mtime=1_600_000_000), E("big", data=os.urandom(300_000))]),
    layer_tar([E("etc/.wh.a"), E("etc/b", data=b"two\n", mode=0o600)]),
]


def podman_order(tars: list[bytes], cfg: bytes, *, names: list[str] | None = None) -> bytes:
    """What Podman's export writes: `<diff_id>.tar` layers in order, the config, legacy dirs, manifest."""
    names = names or [sha(t)[7:] + ".tar" for t in tars]
    cfg_name = sha(cfg)[7:] + ".json"
    legacy = [(f"{sha(t)[7:16]}/VERSION", b"1.0") for t in tars]
    manifest = json.dumps([{"Config": cfg_name, "Layers": names}]).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for name, data in [
            *zip(names, tars, strict=True),
            (cfg_name, cfg),
            *legacy,
            ("manifest.json", manifest),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, path.read_bytes() if path.is_file() else b"")
    return out


def run(data: bytes, dest: Path, cfg: bytes, diff_ids: list[str] | None = None):  # type: ignore[no-untyped-def]
    return flatten_export(
        io.BufferedReader(io.BytesIO(data)),
        image_id=sha(cfg),
        diff_ids=diff_ids or [sha(t) for t in TARS],
        ref="test",
        dest=dest,
    )


def test_streamed_equals_spooled(tmp_path: Path) -> None:
    cfg = json.dumps(config_for(TARS)).encode()
    image, result = run(podman_order(TARS, cfg), tmp_path / "streamed", cfg)
    with open_image(f"docker-archive:{docker_archive(tmp_path / 'a.tar', TARS)}") as spooled:
        want = flatten(spooled, tmp_path / "spooled")
        assert (image.id, image.config, image.layers) == (spooled.id, spooled.config, spooled.layers)
    assert (result.entries, result.bytes) == (want.entries, want.bytes)
    assert tree(tmp_path / "streamed") == tree(tmp_path / "spooled")
    with pytest.raises(ImageError, match="streamed"):
        image.layer_stream(0).__enter__()


def test_corrupt_layer_is_a_digest_mismatch(tmp_path: Path) -> None:
    cfg = json.dumps(config_for(TARS)).encode()
    data = bytearray(podman_order(TARS, cfg))
    at = data.index(b"one\n")
    data[at] ^= 1
    with pytest.raises(DigestMismatchError):
        run(bytes(data), tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_truncated_export_is_refused(tmp_path: Path) -> None:
    cfg = json.dumps(config_for(TARS)).encode()
    data = podman_order(TARS, cfg)
    # Everything up to the config's last byte is checked; what follows it (legacy files, manifest.json) is not
    # needed and not read for facts.
    for cut in (len(data) // 3, len(data) // 2, data.index(cfg) + len(cfg) - 1):
        with pytest.raises((DigestMismatchError, ImageError)):
            run(data[:cut], tmp_path / "out", cfg)
        assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out").exists()


def test_layers_out_of_order_are_refused(tmp_path: Path) -> None:
    cfg = json.dumps(config_for(TARS)).encode()
    swapped = podman_order(TARS[::-1], cfg)
    with pytest.raises(ImageError, match="lacks layer 2"):
        run(swapped, tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_config_not_the_store_image_is_refused_after_the_layers(tmp_path: Path) -> None:
    cfg = json.dumps(config_for(TARS)).encode()
    other = json.dumps(config_for(TARS, created="2000-01-01T00:00:00Z")).encode()
    with pytest.raises(ImageError, match="no config"):
        run(podman_order(TARS, other), tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_config_listing_other_layers_is_refused(tmp_path: Path) -> None:
    cfg = json.dumps(config_for(TARS[:1])).encode()  # lists only the first layer
    with pytest.raises(ImageError, match=r"RootFS\.Layers"):
        run(podman_order(TARS, cfg), tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_store_listing_an_unexported_layer_is_refused(tmp_path: Path) -> None:
    cfg = json.dumps(config_for(TARS)).encode()
    extra = [sha(t) for t in TARS] + ["sha256:" + "0" * 64]
    with pytest.raises(ImageError, match="lacks layer 3"):
        run(podman_order(TARS, cfg), tmp_path / "out", cfg, diff_ids=extra)
    assert not (tmp_path / "out").exists()

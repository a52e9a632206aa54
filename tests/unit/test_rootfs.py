"""Flattening: every hostile case of tests/hostile.py gives Podman's tree or refuses where Podman refuses,
nothing lands outside the root, and no output is left behind on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cwbuild.errors import LayerError, UsageError
from cwbuild.image import open_image
from cwbuild.image.rootfs import Limits, flatten
from tests.conftest import cwbuild
from tests.hostile import CANARY, CASES, Refused, snapshot
from tests.imagekit import E, docker_archive, layer_tar, oci_layout


def _no_canary_outside(tmp_path: Path, out: Path) -> None:
    for dirpath, _dirs, files in os.walk(tmp_path):
        if Path(dirpath).is_relative_to(out):
            continue
        assert not [f for f in files if CANARY in f], dirpath
    for base in (Path("/"), Path("/tmp"), tmp_path.parent, tmp_path.parent.parent):
        assert not list(base.glob(f"{CANARY}*")), base


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_case(name: str, tmp_path: Path) -> None:
    layers, expected = CASES[name]
    archive = docker_archive(tmp_path / "image.tar", [layer_tar(entries) for entries in layers])
    out = tmp_path / "box" / "out"
    out.parent.mkdir()
    with open_image(f"docker-archive:{archive}") as image:
        if isinstance(expected, Refused):
            with pytest.raises(LayerError) as info:
                flatten(image, out)
            assert expected.words in info.value.message
            assert not out.exists()
        else:
            flatten(image, out)
            assert snapshot(out) == expected
    _no_canary_outside(tmp_path, out)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layers_owners_modes_xattrs_times(compression: str, tmp_path: Path) -> None:
    l1 = layer_tar(
        [
            E("etc", kind="dir", mode=0o755, mtime=1_000_000_000),
            E("etc/shadow", data=b"s", uid=0, gid=42, mode=0o640, mtime=1_100_000_000),
            E("usr/bin/su", data=b"su", mode=0o4755),
            E("srv", kind="dir", uid=1234, gid=5678, mode=0o1777),
            E("srv/x", data=b"x", xattrs={"user.cwbuild": "yes"}),
            E("old/a", data=b"a"),
            E("old/b", data=b"b"),
        ]
    )
    l2 = layer_tar(
        [E("old/.wh..wh..opq"), E("old/c", data=b"c"), E("etc/.wh.shadow"), E("srv/new", data=b"n")]
    )
    oci_layout(tmp_path / "layout", [l1, l2], compression=compression)
    with open_image(f"oci:{tmp_path / 'layout'}:latest") as image:
        result = flatten(image, tmp_path / "out")
    out = tmp_path / "out"
    assert snapshot(out) == {
        "etc": "d 755",
        "old": "d 755",
        "old/c": "f 644 c",
        "srv": "d 1777",
        "srv/new": "f 644 n",
        "srv/x": "f 644 x",
        "usr": "d 755",
        "usr/bin": "d 755",
        "usr/bin/su": "f 4755 su",
    }
    st = (out / "srv").lstat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert stat.S_IMODE((out / "usr/bin/su").lstat().st_mode) == 0o4755
    assert (out / "etc").lstat().st_mtime == 1_000_000_000  # not disturbed by the later whiteout
    assert os.getxattr(out / "srv/x", "user.cwbuild") == b"yes"
    assert result.entries == 11
    assert stat.S_IMODE(out.lstat().st_mode) == 0o755


def test_dest_must_not_exist(tmp_path: Path) -> None:
    oci_layout(tmp_path / "layout", [layer_tar([E("f", data=b"x")])])
    (tmp_path / "out").mkdir()
    with open_image(f"oci:{tmp_path / 'layout'}") as image, pytest.raises(UsageError, match="already exists"):
        flatten(image, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_size_limit(tmp_path: Path) -> None:
    oci_layout(tmp_path / "layout", [layer_tar([E("a", data=b"x" * 100), E("b", data=b"y" * 100)])])
    with open_image(f"oci:{tmp_path / 'layout'}") as image, pytest.raises(LayerError, match="'b'"):
        flatten(image, tmp_path / "out", limits=Limits(max_bytes=150))
    assert not (tmp_path / "out").exists()


def test_single_zero_block_then_data_is_refused(tmp_path: Path) -> None:
    """Go's archive/tar: a zero block must be followed by another; Python's tarfile would stop silently."""
    good = layer_tar([E("a", data=b"x")])
    end = good.index(b"\0" * 1024, 1024)
    broken = good[:end] + b"\0" * 512 + layer_tar([E("b", data=b"y")])
    oci_layout(tmp_path / "layout", [broken])
    with open_image(f"oci:{tmp_path / 'layout'}") as image, pytest.raises(LayerError, match="zero block"):
        flatten(image, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_rootfs_failure_leaves_nothing(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "image.tar", [layer_tar([E("h", kind="hardlink", link="/missing")])])
    proc = cwbuild(["rootfs", f"docker-archive:{archive}", tmp_path / "out"])
    assert proc.returncode == 1
    assert b"'h'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_depth_bound(tmp_path: Path) -> None:
    deep = "/".join(["d"] * 500) + "/f"
    oci_layout(tmp_path / "ok", [layer_tar([E(deep, data=b"x")])])
    with open_image(f"oci:{tmp_path / 'ok'}") as image:
        flatten(image, tmp_path / "out")
    assert (tmp_path / "out" / deep).read_bytes() == b"x"
    too_deep = "/".join(["d"] * 600) + "/f"
    oci_layout(tmp_path / "deep", [layer_tar([E(too_deep, data=b"x")])])
    with open_image(f"oci:{tmp_path / 'deep'}") as image, pytest.raises(LayerError, match="deeper than 512"):
        flatten(image, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    # deeper through a symlink: the walk refuses to go past the bound
    link = "/".join(["d"] * 400)
    oci_layout(
        tmp_path / "via",
        [
            layer_tar(
                [
                    E(link + "/x", data=b"x"),
                    E("l", kind="symlink", link=link),
                    E("l/" + "/".join(["e"] * 200) + "/f", data=b"y"),
                ]
            )
        ],
    )
    with (
        open_image(f"oci:{tmp_path / 'via'}") as image,
        pytest.raises(LayerError, match="512 directory levels"),
    ):
        flatten(image, tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_empty_layers(compression: str, tmp_path: Path) -> None:
    """A 0-byte layer and a tar holding only its end marker are both empty layers (Go's archive/tar)."""
    oci_layout(tmp_path / "l", [b"", layer_tar([E("f", data=b"x")]), layer_tar([])], compression=compression)
    with open_image(f"oci:{tmp_path / 'l'}") as image:
        flatten(image, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["f"]

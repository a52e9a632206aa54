"""The filesystem image: reproducible (flatten twice with a pause -> same sha256), e2fsck-clean, layers'
owners/modes/mtimes kept, the runtime config written where both krun inits read it, slop grammar."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cwbuild.disk.fs import FsSpec, apply_slop, derived_uuid, make_filesystem
from cwbuild.errors import UsageError
from cwbuild.image import open_image
from cwbuild.image.rootfs import flatten
from tests.imagekit import E, config_for, layer_tar, oci_layout

pytestmark = pytest.mark.integration

GiB = 1 << 30


@pytest.mark.parametrize(
    ("size", "slop", "expected"),
    [  # buildah internal/mkcw/archive_test.go (cw-format.md §1.6), plus what buildah's int8 bug broke
        (100, "", 125),
        (100, "10%", 110),
        (100, "100%", 200),
        (100, "10GB", 10 * GiB + 100),
        (100, "10%+10GB", 10 * GiB + 110),
        (100, "10% + 10GB", 10 * GiB + 110),
        (100, "200%", 300),
        (100, "64mb", 64 * 1024 * 1024 + 100),
        (100, "1k+1", 1125),
    ],
)
def test_slop(size: int, slop: str, expected: int) -> None:
    assert apply_slop(size, slop) == expected


@pytest.mark.parametrize("slop", ["x", "10%%", "-5%", "10GiBs", "1.5G"])
def test_bad_slop_is_an_error(slop: str) -> None:
    with pytest.raises(UsageError):
        apply_slop(100, slop)


def _layers() -> list[bytes]:
    return [
        layer_tar(
            [
                E("etc", kind="dir", mtime=1_600_000_000),
                E("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", mtime=1_600_000_001),
                E("etc/shadow", data=b"s", uid=0, gid=42, mode=0o640),
                E("home/u", kind="dir", uid=1000, gid=1000, mode=0o700),
                E("home/u/notes", data=b"n" * 10000, uid=1000, gid=1000, mtime=1_650_000_000),
                E("usr/bin/su", data=b"su", mode=0o4755),
                E("usr/bin/sh", kind="symlink", link="busybox"),
                E("usr/bin/busybox", data=os.urandom(50_000), mode=0o755),
                E("usr/bin/ash", kind="hardlink", link="usr/bin/busybox"),
                E("srv", kind="dir", uid=1234, gid=5678, mode=0o1777),
            ]
        ),
        layer_tar([E("srv/data", data=b"d" * 5000, uid=33, gid=33), E("etc/.wh.shadow")]),
    ]


def _flatten_and_build(layout: Path, work: Path, out: Path) -> str:
    with open_image(f"oci:{layout}:latest") as image:
        work.mkdir()
        root = work / "rootfs"
        flatten(image, root)
        spec = FsSpec(
            image_digest=image.id,
            source_date_epoch=FsSpec.epoch_from_created(image.created),
            config=image.runtime_config,
        )
        return make_filesystem(root, out, spec=spec).sha256 or ""


def _debugfs(img: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, str(img)], capture_output=True, text=True, check=True).stdout


def test_reproducible_ext4_from_an_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    tars = _layers()
    cfg = config_for(
        tars, config={"Entrypoint": ["/usr/bin/sh"], "Cmd": ["-c", "x"], "Env": ["A=1"], "User": "1000"}
    )
    layout = oci_layout(tmp_path / "layout", tars, config=cfg)
    a = _flatten_and_build(layout, tmp_path / "a", tmp_path / "a.img")
    time.sleep(1.5)  # extraction ctimes and atimes differ between the two trees
    b = _flatten_and_build(layout, tmp_path / "b", tmp_path / "b.img")
    assert a == b
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    img = tmp_path / "a.img"
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    stat_notes = _debugfs(img, "stat /home/u/notes")
    assert "User:  1000   Group:  1000" in stat_notes
    assert f"mtime: {1_650_000_000:#x}:00000000" in stat_notes  # from the layer, untouched
    created = 1_704_067_200  # 2024-01-01T00:00:00Z, the image's `created` = SOURCE_DATE_EPOCH
    assert f"ctime: {created:#x}:00000000" in stat_notes
    assert f"atime: {created:#x}:00000000" in stat_notes
    assert "User:  1234   Group:  5678" in _debugfs(img, "stat /srv")
    assert "Mode:  04755" in _debugfs(img, "stat /usr/bin/su")
    assert "Links: 2" in _debugfs(img, "stat /usr/bin/busybox")
    assert 'Fast link dest: "busybox"' in _debugfs(img, "stat /usr/bin/sh")
    krun = json.loads(_debugfs(img, "cat /.krun_config.json"))
    assert krun == {"Entrypoint": ["/usr/bin/sh"], "Cmd": ["-c", "x"], "Env": ["A=1"], "User": "1000"}
    ours = json.loads(_debugfs(img, "cat /.cwbuild/config.json"))
    assert ours["config"] == krun
    uuid = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True, check=True).stdout
    with open_image(f"oci:{layout}:latest") as image:
        assert derived_uuid(image.id, "ext4 uuid") in uuid


def test_inputs_change_the_image(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/x").write_bytes(b"x")
    digests = set()
    for i, spec in enumerate(
        [
            FsSpec("sha256:aa", 1_700_000_000),
            FsSpec("sha256:ab", 1_700_000_000),
            FsSpec("sha256:aa", 1_700_000_001),
            FsSpec("sha256:aa", 1_700_000_000, config={"Cmd": ["x"]}),
        ]
    ):
        digests.add(make_filesystem(tree, tmp_path / f"{i}.img", spec=spec).sha256)
    assert len(digests) == 4


def test_unprivileged_owners_applied_by_debugfs(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "data").mkdir(parents=True)
    (tree / "data/f").write_bytes(b"f")
    spec = FsSpec("sha256:aa", 1_700_000_000, owners={"data": (7, 8), "data/f": (9, 10)})
    img = make_filesystem(tree, tmp_path / "o.img", spec=spec).path
    assert "User:     7   Group:     8" in _debugfs(img, "stat /data")
    assert "User:     9   Group:    10" in _debugfs(img, "stat /data/f")


def test_failed_mkfs_leaves_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(12 * 1024 * 1024))  # more than the 10 MiB floor
    with pytest.raises(Exception, match="mkfs"):
        make_filesystem(tree, tmp_path / "x.img", spec=FsSpec("sha256:aa", 0, size=4096 * 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_existing_config_links_are_replaced_not_followed(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    os.link(tree / "etc/passwd", tree / ".krun_config.json")  # a hardlink planted by the image
    (tree / ".cwbuild").symlink_to("/tmp")  # and a symlink out of the tree
    img = make_filesystem(tree, tmp_path / "x.img", spec=FsSpec("sha256:aa", 0, config={"Cmd": ["x"]})).path
    assert (tree / "etc/passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    assert json.loads(_debugfs(img, "cat /.krun_config.json")) == {"Cmd": ["x"]}
    assert "Type: directory" in _debugfs(img, "stat /.cwbuild")
    assert "User:     0   Group:     0" in _debugfs(img, "stat /.cwbuild/config.json")


@pytest.mark.parametrize("slop", ["0%", "10%"])
def test_small_slop_still_fits(slop: str, tmp_path: Path) -> None:
    """The size covers ext4's own overhead (journal, inode tables, directory entries) before the slop."""
    tree = tmp_path / "t"
    (tree / "many").mkdir(parents=True)
    (tree / "big").write_bytes(os.urandom(30 * 1024 * 1024))
    for i in range(2000):
        (tree / "many" / f"file-with-a-long-name-{i:05d}").write_bytes(b"x")
    img = make_filesystem(tree, tmp_path / "x.img", spec=FsSpec("sha256:aa", 0, slop=slop)).path
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout


def test_make_encrypted_disk_leaves_no_plaintext(tmp_path: Path) -> None:
    from cwbuild.disk.luks import LuksSpec, decrypt_image
    from cwbuild.disk.pipeline import make_encrypted_disk
    from cwbuild.fileio import sha256_file

    tree = tmp_path / "t"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_bytes(b"cw\n")
    work = tmp_path / "work"
    work.mkdir()
    spec = FsSpec("sha256:aa", 1_700_000_000)
    result = make_encrypted_disk(
        tree, tmp_path / "disk.img", fs=spec, luks=LuksSpec(), passphrase=b"p", workdir=work
    )
    assert list(work.iterdir()) == []  # the private plaintext directory is gone
    decrypt_image(result.disk.path, tmp_path / "plain", passphrase=b"p")
    assert sha256_file(tmp_path / "plain") == result.filesystem.sha256
    with pytest.raises(Exception, match="empty"):
        make_encrypted_disk(tree, tmp_path / "d2.img", fs=spec, luks=LuksSpec(), passphrase=b"", workdir=work)
    assert list(work.iterdir()) == []
    assert not (tmp_path / "d2.img").exists()


def test_umask_does_not_change_the_image(tmp_path: Path) -> None:
    digests = []
    for i, mask in enumerate((0o022, 0o077)):
        tree = tmp_path / f"t{i}"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/a").write_bytes(b"a")
        (tree / "etc/a").chmod(0o644)
        for d in (tree, tree / "etc"):
            d.chmod(0o755)
            os.utime(d, (1, 1))
        os.utime(tree / "etc/a", (1, 1))
        old = os.umask(mask)
        try:
            digests.append(make_filesystem(tree, tmp_path / f"{i}.img", spec=FsSpec("sha256:aa", 5)).sha256)
        finally:
            os.umask(old)
    assert digests[0] == digests[1]

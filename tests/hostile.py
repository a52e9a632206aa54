"""Hostile and tricky layers, with the outcome Podman gives for each (observed with `podman load` of a
docker-archive of the layers + `podman create` + `podman export`, vfs driver, Podman 4.3.1 on Debian 12 —
tests/integration/test_podman_oracle.py re-checks every expectation against the real Podman).

An outcome is either the exported tree (`snapshot` format) or `Refused(words)`: Podman's load fails and
cwbuild raises LayerError whose message contains `words` (the entry's name)."""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tests.imagekit import E

#: A name that must never appear outside the root, whatever a layer says.
CANARY = "cwbuild-escape-canary"


@dataclass(frozen=True)
class Refused:
    words: str


Tree = dict[str, str]
Case = tuple[list[list[E]], Tree | Refused]

CASES: dict[str, Case] = {
    "dotdot-names": (
        [[E(f"../../../{CANARY}", data=b"x"), E(f"a/../../{CANARY}2", data=b"y")]],
        {CANARY: "f 644 x", f"{CANARY}2": "f 644 y"},
    ),
    "absolute-names": ([[E("/etc/abs", data=b"x")]], {"etc": "d 755", "etc/abs": "f 644 x"}),
    "symlink-parent-absolute-resolves-inside": (
        [[E("etc", kind="dir"), E("l", kind="symlink", link="/etc")], [E("l/file", data=b"x")]],
        {"etc": "d 755", "etc/file": "f 644 x", "l": "l /etc"},
    ),
    "symlink-parent-escape-lower-layer": (
        [[E("l", kind="symlink", link=f"../../../../../../tmp/{CANARY}")], [E("l/file", data=b"x")]],
        Refused("'l/file'"),
    ),
    "symlink-parent-escape-same-layer": (
        [[E("l", kind="symlink", link="../../../../../../tmp"), E(f"l/{CANARY}", data=b"x")]],
        Refused(f"'l/{CANARY}'"),
    ),
    "symlink-parent-dangling": (
        [[E("l", kind="symlink", link="/nonexistent/dir")], [E("l/file", data=b"x")]],
        Refused("'l/file'"),
    ),
    "symlink-loop": (
        [[E("a", kind="symlink", link="b"), E("b", kind="symlink", link="a")], [E("a/x", data=b"x")]],
        Refused("'a/x'"),
    ),
    "symlink-to-file-as-parent": (
        [[E("f", data=b"orig"), E("l", kind="symlink", link="f")], [E("l/x", data=b"new")]],
        Refused("'l/x'"),
    ),
    "write-through-symlink-replaces-it": (
        [[E("f", data=b"orig"), E("l", kind="symlink", link="/f")], [E("l", data=b"new")]],
        {"f": "f 644 orig", "l": "f 644 new"},
    ),
    "symlink-targets-verbatim": (
        [
            [
                E("up", kind="symlink", link="../../../../etc/shadow"),
                E("abs", kind="symlink", link="/proc/1/root"),
            ]
        ],
        {"up": "l ../../../../etc/shadow", "abs": "l /proc/1/root"},
    ),
    "hardlink-escape": ([[E("h", kind="hardlink", link=f"../../../tmp/{CANARY}")]], Refused("'h'")),
    "hardlink-absolute-inside": (
        [[E("etc/passwd", data=b"r")], [E("h", kind="hardlink", link="/../etc/passwd")]],
        {"etc": "d 755", "etc/passwd": "f 644 r =1", "h": "f 644 r =1"},
    ),
    "hardlink-through-symlink": (
        [
            [E("real/f", data=b"r"), E("l", kind="symlink", link="/real")],
            [E("h", kind="hardlink", link="l/f")],
        ],
        {"real": "d 755", "real/f": "f 644 r =1", "h": "f 644 r =1", "l": "l /real"},
    ),
    "hardlink-to-symlink": (
        [[E("s", kind="symlink", link="/nowhere"), E("h", kind="hardlink", link="s")]],
        {"s": "l /nowhere", "h": "l /nowhere"},  # hardlinked symlinks; `podman export` shows two symlinks
    ),
    "hardlink-to-directory": ([[E("d", kind="dir"), E("h", kind="hardlink", link="d")]], Refused("'h'")),
    "whiteout-empty-name-removes-parent": ([[E("d/x", data=b"x")], [E("d/.wh.")]], {}),
    "whiteout-dotdot-removes-grandparent": ([[E("a/b/x", data=b"x")], [E("a/b/.wh..")]], {"a": "d 755"}),
    "whiteout-of-root": ([[E("x", data=b"x")], [E(".wh.")]], Refused("'.wh.'")),
    "whiteout-missing-parent-creates-it": (
        [[E("x", data=b"x")], [E("nod/.wh.x")]],
        {"nod": "d 755", "x": "f 644 x"},
    ),
    "whiteout-through-symlink": (
        [[E("d/x", data=b"x"), E("l", kind="symlink", link="/d")], [E("l/.wh.x")]],
        {"d": "d 755", "l": "l /d"},
    ),
    "opaque-on-symlink-is-ignored": (
        [[E("d/x", data=b"x"), E("l", kind="symlink", link="d")], [E("l/.wh..wh..opq")]],
        {"d": "d 755", "d/x": "f 644 x", "l": "l d"},
    ),
    "opaque-root": (
        [[E("x", data=b"x"), E("d/y", data=b"y")], [E("z", data=b"z"), E(".wh..wh..opq")]],
        {"z": "f 644 z"},
    ),
    "aufs-metadata-skipped": (
        [[E(".wh..wh.plnk/123", data=b"x"), E(".wh..wh.aufs")]],
        {".wh..wh.plnk": "d 755"},
    ),
    "directory-over-symlink": (
        [[E("t", kind="dir"), E("d", kind="symlink", link="t")], [E("d", kind="dir"), E("d/f", data=b"x")]],
        {"d": "d 755", "d/f": "f 644 x", "t": "d 755"},
    ),
    "file-replaces-directory": ([[E("d/x", data=b"x")], [E("d", data=b"file")]], {"d": "f 644 file"}),
    "root-replaced-by-file": ([[E("./", data=b"x")]], Refused("'./'")),
    "directory-removed-by-its-own-layer": ([[E("d", kind="dir"), E(".wh.d")]], Refused("'d'")),
    "huge-declared-size": ([[E("big", data=b"abc", size=1 << 40)]], Refused("'big'")),
    "declared-size-beyond-data": ([[E("short", data=b"abc", size=1 << 20)]], Refused("'short'")),
    "fifo-and-device": (
        [[E("p", kind="fifo"), E("dev/null", kind="char"), E("f", data=b"x")], [E("dev/null", data=b"file")]],
        {"dev": "d 755", "dev/null": "f 644 file", "f": "f 644 x", "p": "p 644"},
    ),
}


def snapshot(root: Path) -> Tree:
    """A directory as `path -> "type mode content|target [=hardlink-group]"` (groups in path order)."""
    out: Tree = {}
    groups: dict[int, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = f"d {stat.S_IMODE(st.st_mode):o}"
                continue
            if stat.S_ISLNK(st.st_mode):
                text = f"l {os.readlink(path)}"
            elif stat.S_ISFIFO(st.st_mode):
                text = f"p {stat.S_IMODE(st.st_mode):o}"
            else:
                text = f"f {stat.S_IMODE(st.st_mode):o} {path.read_bytes().decode(errors='replace')}"
            if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                text += f" ={groups.setdefault(st.st_ino, len(groups) + 1)}"
            out[rel] = text
    return _renumber(out)


def snapshot_tar(path: Path) -> Tree:
    """The same format from a tar (as `podman export` writes it: hardlinks refer to the first path)."""
    out: Tree = {}
    group_of: dict[str, int] = {}
    with tarfile.open(path) as tar:
        members = {m.name.rstrip("/"): m for m in tar.getmembers()}
        for name, m in members.items():
            if m.isdir():
                out[name] = f"d {m.mode & 0o7777:o}"
                continue
            base = members.get(m.linkname, m) if m.islnk() else m
            if base.issym():
                text = f"l {base.linkname}"
            elif base.isfifo():
                text = f"p {base.mode & 0o7777:o}"
            else:
                f = tar.extractfile(base)
                text = f"f {base.mode & 0o7777:o} {(f.read() if f else b'').decode(errors='replace')}"
            if m.islnk() and not base.issym():
                gid = group_of.setdefault(m.linkname, len(group_of) + 1)
                group_of[name] = gid
                out[m.linkname] = out[m.linkname].split(" =")[0] + f" ={gid}"
                text += f" ={gid}"
            out[name] = text
    return _renumber(out)


def _renumber(tree: Tree) -> Tree:
    """Hardlink groups renumbered in path order, so both sides agree on the numbers."""
    mapping: dict[str, str] = {}
    result: Tree = {}
    for key in sorted(tree):
        head, sep, group = tree[key].rpartition(" =")
        if sep and group.isdigit():
            result[key] = f"{head} ={mapping.setdefault(group, str(len(mapping) + 1))}"
        else:
            result[key] = tree[key]
    return result

"""Random layers made of hostile names, symlinks and hardlinks: flattening either succeeds or raises
LayerError, never writes outside the root, never leaves a partial output behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cwbuild.errors import LayerError
from cwbuild.image import open_image
from cwbuild.image.rootfs import flatten
from tests.imagekit import E, docker_archive, layer_tar

_PARTS = ["..", ".", "a", "b", "l", ".wh.a", ".wh.l", ".wh..wh..opq", ".wh.", "outside", "victim"]
_names = st.lists(st.sampled_from(_PARTS), min_size=1, max_size=4).map("/".join)
_names = st.tuples(st.booleans(), _names).map(lambda t: ("/" if t[0] else "") + t[1])
_targets = st.one_of(_names, st.just("../../../outside/victim"), st.just("/"), st.just("../../.."))
_entry = st.one_of(
    st.builds(lambda n: E(n, data=b"new"), _names),
    st.builds(lambda n: E(n, kind="dir"), _names),
    st.builds(lambda n, t: E(n, kind="symlink", link=t), _names, _targets),
    st.builds(lambda n, t: E(n, kind="hardlink", link=t), _names, _targets),
    st.builds(lambda n: E(n, kind="fifo"), _names),
)
_layers = st.lists(st.lists(_entry, min_size=1, max_size=8), min_size=1, max_size=3)


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layers)
def test_random_hostile_layers_stay_inside(layers: list[list[E]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "outside").mkdir()
        (base / "outside" / "victim").write_bytes(b"original")
        archive = docker_archive(base / "image.tar", [layer_tar(entries) for entries in layers])
        before = _listing(base)
        box = base / "box"
        box.mkdir()
        out = box / "out"
        with open_image(f"docker-archive:{archive}") as image:
            try:
                flatten(image, out)
            except LayerError:
                assert not out.exists()
        assert (base / "outside" / "victim").read_bytes() == b"original"
        assert [p for p in _listing(base) if not p.startswith("box")] == before
        assert os.listdir(box) in ([], ["out"])

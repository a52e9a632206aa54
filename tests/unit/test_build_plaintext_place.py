"""Where a build puts its plaintext: the memory file system only when what will be written there fits
(build_steps.common._plaintext_dir). The room is measured against the ext4 image's real size (content,
slop, journal and metadata) plus the rootfs when cwbuild writes it; the Podman mount path writes no rootfs."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from cwbuild.build import BuildContext
from cwbuild.build_steps import common
from cwbuild.config import merge
from cwbuild.disk.fs import apply_slop, with_overhead

MiB = 1 << 20


def _ctx(tmp_path: Path, stack: ExitStack, slop: str | None = None) -> BuildContext:
    spec = merge({"image": "localhost/app:latest", "passphrase_file": "pp", "slop": slop}, {})
    return BuildContext(spec=spec, work=tmp_path / "work", stage=tmp_path / "stage", stack=stack)


@pytest.mark.parametrize(
    ("with_tree", "slop"), [(True, None), (False, None), (False, "100%"), (True, "64MB")]
)
def test_need_is_the_ext4_image_and_the_tree_when_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_tree: bool, slop: str | None
) -> None:
    asked: list[int] = []
    monkeypatch.setattr(common, "_fits_in_memory", lambda need: asked.append(need) or False)
    with ExitStack() as stack:
        ctx = _ctx(tmp_path, stack, slop)
        assert common._plaintext_dir(ctx, 300 * MiB, with_tree=with_tree) == tmp_path / "work"  # did not fit
    image = with_overhead(apply_slop(300 * MiB, slop or ""))
    assert asked == [image + (300 * MiB if with_tree else 0)]
    assert image > 300 * MiB * 5 // 4  # slop and metadata are counted


def test_unknown_size_stays_beside_the_output(tmp_path: Path) -> None:
    with ExitStack() as stack:
        assert common._plaintext_dir(_ctx(tmp_path, stack), None) == tmp_path / "work"


def test_what_fits_goes_to_a_private_directory_in_memory(tmp_path: Path) -> None:
    with ExitStack() as stack:
        ctx = _ctx(tmp_path, stack)
        chosen = common._plaintext_dir(ctx, 1 * MiB)
        assert chosen.parent == Path(common.MEMORY_FS)
        assert ctx.work == chosen
        assert chosen.stat().st_mode & 0o777 == 0o700
    assert not chosen.exists()  # removed with the build's stack


def test_more_than_half_the_memory_does_not_fit() -> None:
    with open("/proc/meminfo", encoding="ascii") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert not common._fits_in_memory(total // 2 + 1)
    assert common._fits_in_memory(1 * MiB)

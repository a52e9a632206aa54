"""Inputs are hashed streaming (bounded memory) and each file is read once for all requested TEE types."""

from __future__ import annotations

import glob
import hashlib
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from cwbuild.measure import api
from cwbuild.measure.api import Blob, MeasureSpec, SevOptions, Target, Tee, measure
from cwbuild.measure.digest import FileDigests, Wants, digest_file
from tests.conftest import ASSETS, FIXTURES


def test_each_input_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = sorted(glob.glob(str(ASSETS / "kernel" / "boot" / "vmlinuz-*")))
    assert kernels, "run scripts/setup.sh"
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"i" * 100_000)
    calls: Counter[Path] = Counter()

    def counting(path: Path, wants: Wants) -> FileDigests:
        calls[path] += 1
        return digest_file(path, wants)

    monkeypatch.setattr(api, "digest_file", counting)
    amd, tdx = FIXTURES / "firmware" / "OVMF.amdsev.fd", FIXTURES / "firmware" / "OVMF.inteltdx.ms.fd"
    spec = MeasureSpec(
        targets=(Target(Tee.SNP, amd), Target(Tee.SEV_ES, amd), Target(Tee.SEV, amd), Target(Tee.TDX, tdx)),
        kernel=Blob(path=Path(kernels[-1])),
        initrd=Blob(path=initrd),
        cmdline="console=ttyS0",
        sev=SevOptions(cpus=2),
    )
    result = measure(spec)
    assert calls == Counter({Path(kernels[-1]): 1, initrd: 1})
    assert all(result.get(t).values for t in (Tee.SNP, Tee.SEV_ES, Tee.SEV, Tee.TDX))


def test_hashing_memory_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        for i in range(48):
            f.write(bytes([i]) * (1 << 20))
    tracemalloc.start()
    try:
        d = digest_file(big, Wants(sha384=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # one 1 MiB chunk buffer, not the 48 MiB file
    assert d.sha256 == hashlib.sha256(big.read_bytes()).digest()
    assert d.size == 48 << 20

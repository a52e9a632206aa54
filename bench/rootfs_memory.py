"""Peak memory and time of `cwbuild rootfs` on a ~1 GiB image (an OCI layout made here with big random files).

Usage: .venv/bin/python bench/rootfs_memory.py [--gib 1] [--workdir DIR] [--podman] [--uncompressed]
With --podman the image is first copied into the local Podman store (skopeo) and read from there through the
Podman REST API (export to a private spool file, then flattening).
Prints the child's peak RSS (ru_maxrss) and wall time; flattening streams, so RSS must stay flat.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import zstandard

CHUNK = 1 << 20


class _RandomReader(io.RawIOBase):
    def __init__(self, size: int, seed: int) -> None:
        self.left = size
        self.rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def _layer(path: Path, files: list[tuple[str, int]], seed: int) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        # Like every real build tool, a layer lists the directories it writes into.
        for parent in sorted({str(Path(name).parent) for name, _ in files} - {"."}):
            info = tarfile.TarInfo(parent)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for i, (name, size) in enumerate(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
            tar.addfile(info, _RandomReader(size, seed + i))


def _blob(layout: Path, src: Path, compress: bool) -> tuple[str, int, str]:
    """Move `src` (optionally zstd-compressed) into blobs/; return (digest, size, diff_id)."""
    diff = hashlib.sha256()
    with src.open("rb") as f:
        while chunk := f.read(CHUNK):
            diff.update(chunk)
    out = src.with_suffix(".blob")
    if compress:
        with src.open("rb") as fin, out.open("wb") as fout:
            zstandard.ZstdCompressor(level=1).copy_stream(fin, fout)
        src.unlink()
    else:
        src.rename(out)
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    size = out.stat().st_size
    out.rename(layout / "blobs" / "sha256" / digest.hexdigest())
    return "sha256:" + digest.hexdigest(), size, "sha256:" + diff.hexdigest()


def _write_json(layout: Path, doc: object) -> tuple[str, int]:
    data = json.dumps(doc).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def make_image(layout: Path, total: int, *, zstd: bool = True) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    quarter = total // 4
    specs = [
        ([("data/a.bin", quarter), ("data/b.bin", quarter)], False),
        ([("data/c.bin", quarter), ("data/d.bin", quarter)], zstd),
        ([(f"small/{i:05d}", 4096) for i in range(5000)], zstd),
    ]
    layers, diff_ids = [], []
    for n, (files, compress) in enumerate(specs):
        _layer(layout / f"layer{n}.tar", files, seed=n * 1000)
        digest, size, diff_id = _blob(layout, layout / f"layer{n}.tar", compress)
        media = "application/vnd.oci.image.layer.v1.tar" + ("+zstd" if compress else "")
        layers.append({"mediaType": media, "digest": digest, "size": size})
        diff_ids.append(diff_id)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdigest, csize = _write_json(layout, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
        "layers": layers,
    }
    mdigest, msize = _write_json(layout, manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize}
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--podman", action="store_true", help="read the image from the Podman store")
    parser.add_argument(
        "--uncompressed", action="store_true", help="no zstd layers (Podman exports those slowly)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="cwbuild-bench-"))
    try:
        make_image(work / "layout", int(args.gib * (1 << 30)), zstd=not args.uncompressed)
        ref = f"oci:{work / 'layout'}"
        if args.podman:
            ref = "localhost/cwbuild-bench:latest"
            copy = ["skopeo", "copy", "-q", f"oci:{work / 'layout'}", f"containers-storage:{ref}"]
            subprocess.run(copy, check=True)
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "cwbuild", "rootfs", ref, work / "out"], check=True)
        elapsed = time.monotonic() - start
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        size = sum(f.stat().st_size for f in (work / "out").rglob("*") if f.is_file())
        print(f"rootfs of {size / (1 << 30):.2f} GiB: {elapsed:.1f} s, peak RSS {peak_kib / 1024:.1f} MiB")
    finally:
        shutil.rmtree(work)
        if args.podman:
            rmi = ["podman", "rmi", "-f", "localhost/cwbuild-bench:latest"]
            subprocess.run(rmi, check=False, capture_output=True)


if __name__ == "__main__":
    main()

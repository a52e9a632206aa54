"""Test helper: layer tars built entry by entry with `tarfile`, and OCI layouts / docker-archives of them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass
class E:
    """One tar entry: kind is file, dir, symlink, hardlink, fifo, char, block."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    xattrs: dict[str, str] = field(default_factory=dict)
    size: int | None = None  # declared size override (huge declared sizes)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}


def layer_tar(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            info.uid, info.gid, info.mtime = e.uid, e.gid, e.mtime
            info.linkname = e.link
            if e.kind in ("char", "block"):
                info.devmajor, info.devminor = 1, 3
            if e.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    data = buf.getvalue()
    if any(e.size is not None for e in entries):
        data = _patch_sizes(data, entries)
    return data


def _patch_sizes(data: bytes, entries: list[E]) -> bytes:
    """Rewrite declared sizes in ustar headers (octal field at 124, checksum at 148) after the fact."""
    out = bytearray(data)
    for e in entries:
        if e.size is None:
            continue
        key = e.name.encode()[:100]
        pos = out.find(key + b"\0")
        header = pos - (pos % 512)
        out[header + 124 : header + 136] = b"%011o\0" % e.size
        out[header + 148 : header + 156] = b" " * 8
        out[header + 148 : header + 156] = b"%06o\0 " % sum(out[header : header + 512])
    return bytes(out)


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(tars: list[bytes], **extra: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
    }
    cfg.update(extra)
    return cfg


def write_blob(layout: Path, data: bytes) -> str:
    digest = sha(data)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest


def oci_layout(
    layout: Path,
    tars: list[bytes],
    *,
    compression: str = "gzip",
    tag: str | None = "latest",
    config: dict[str, object] | None = None,
    blobs: list[bytes] | None = None,
) -> Path:
    """An OCI layout with one image. `blobs` overrides the stored layer blobs (corruption cases) while the
    manifest keeps describing the original compressed layers."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    cfg = json.dumps(config or config_for(tars)).encode()
    layers = []
    for i, t in enumerate(tars):
        blob = compress(t, compression)
        digest = write_blob(layout, blob)
        if blobs is not None:
            (layout / "blobs" / "sha256" / digest[7:]).write_bytes(blobs[i])
        layers.append({"mediaType": MEDIA[compression], "digest": digest, "size": len(blob)})
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": write_blob(layout, cfg),
                "size": len(cfg),
            },
            "layers": layers,
        }
    ).encode()
    desc: dict[str, object] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": write_blob(layout, manifest),
        "size": len(manifest),
    }
    if tag:
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return layout


def docker_archive(
    path: Path, tars: list[bytes], *, repo_tag: str = "localhost/cwbuild-test:latest", **config: object
) -> Path:
    """A docker-archive (`podman load` input) holding one image made of `tars` (uncompressed); `config`
    overrides keys of its config (`config_for`)."""
    cfg = json.dumps(config_for(tars, **config)).encode()
    cfg_name = sha(cfg)[7:] + ".json"
    names = [f"{sha(t)[7:]}/layer.tar" for t in tars]
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [repo_tag], "Layers": names}]).encode()
    with tarfile.open(path, "w") as out:
        for name, data in [(cfg_name, cfg), *zip(names, tars, strict=True), ("manifest.json", manifest)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return path

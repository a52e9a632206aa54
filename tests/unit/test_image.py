"""Image references, OCI layouts and archives, digest checks while streaming, platform selection."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from cwbuild.errors import DigestMismatchError, FormatError, ImageError, UsageError
from cwbuild.image import open_image
from cwbuild.image.reference import ImageRef, Transport, parse_reference
from cwbuild.image.rootfs import flatten
from tests.conftest import cwbuild
from tests.imagekit import E, compress, config_for, docker_archive, layer_tar, oci_layout, sha, write_blob

LAYER = layer_tar([E("hello", data=b"hi\n")])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", ImageRef(Transport.PODMAN, "alpine")),
        ("localhost/app:1.0", ImageRef(Transport.PODMAN, "localhost/app:1.0")),
        ("containers-storage:localhost/app:1.0", ImageRef(Transport.PODMAN, "localhost/app:1.0")),
        ("quay.io/a/b@sha256:" + "a" * 64, ImageRef(Transport.PODMAN, "quay.io/a/b@sha256:" + "a" * 64)),
        ("oci:/x/layout", ImageRef(Transport.OCI, "/x/layout")),
        ("oci:/x/layout:v1", ImageRef(Transport.OCI, "/x/layout", "v1")),
        ("oci-archive:img.tar:latest", ImageRef(Transport.OCI_ARCHIVE, "img.tar", "latest")),
        ("oci-archive:img.tar", ImageRef(Transport.OCI_ARCHIVE, "img.tar")),
        ("docker-archive:/a/b.tar", ImageRef(Transport.DOCKER_ARCHIVE, "/a/b.tar")),
    ],
)
def test_parse_reference(text: str, expected: ImageRef) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize("text", ["", " alpine", "oci:", "docker-archive:", "oci::tag", "a\0b"])
def test_parse_reference_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(text)


def test_oci_path_with_colon_that_exists(tmp_path: Path) -> None:
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_reference(f"oci:{odd}") == ImageRef(Transport.OCI, str(odd))


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_inspect_json_shape(compression: str, tmp_path: Path) -> None:
    oci_layout(tmp_path / "l", [LAYER], compression=compression)
    proc = cwbuild(["inspect", f"oci:{tmp_path / 'l'}:latest", "--json"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"id", "manifest_digest", "platform", "layers", "config"}
    assert doc["platform"] == "linux/amd64"
    assert doc["layers"][0]["diff_id"] == sha(LAYER)
    assert doc["layers"][0]["digest"] == sha(compress(LAYER, compression))
    assert doc["config"]["Entrypoint"] is None
    assert doc["config"]["Cmd"] == ["/bin/sh"]
    index = json.loads((tmp_path / "l" / "index.json").read_text())
    assert doc["manifest_digest"] == index["manifests"][0]["digest"]


def _corrupt_case(tmp_path: Path, blob: bytes) -> Path:
    good = compress(LAYER, "gzip")
    return oci_layout(tmp_path / "l", [LAYER], blobs=[blob if blob else good])


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda b: b[:-10], "truncated"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "does not match its digest"),
        (lambda b: b + b"\0", "longer than its declared size"),
    ],
)
def test_corrupt_blob(mutate: object, words: str, tmp_path: Path) -> None:
    blob = mutate(compress(LAYER, "gzip"))  # type: ignore[operator]
    _corrupt_case(tmp_path, blob)
    with open_image(f"oci:{tmp_path / 'l'}") as image, pytest.raises(DigestMismatchError, match=words):
        flatten(image, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    proc = cwbuild(["rootfs", f"oci:{tmp_path / 'l'}", tmp_path / "out2"])
    assert proc.returncode == 1
    assert words.encode() in proc.stderr
    assert not (tmp_path / "out2").exists()


def test_diff_id_mismatch(tmp_path: Path) -> None:
    cfg = config_for([layer_tar([E("other", data=b"x")])])
    oci_layout(tmp_path / "l", [LAYER], config=cfg)
    with open_image(f"oci:{tmp_path / 'l'}") as image, pytest.raises(DigestMismatchError, match="diff_id"):
        flatten(image, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_manifest_blob(tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "l", [LAYER])
    desc = json.loads((layout / "index.json").read_text())["manifests"][0]
    path = layout / "blobs" / "sha256" / desc["digest"][7:]
    path.write_bytes(path.read_bytes().replace(b"schemaVersion", b"schemaVersioN"))
    with pytest.raises(DigestMismatchError), open_image(f"oci:{layout}"):
        pass


def test_gzip_garbage_with_matching_digest(tmp_path: Path) -> None:
    garbage = b"\x1f\x8b" + b"not gzip at all" * 10
    layout = tmp_path / "l"
    oci_layout(layout, [LAYER])
    digest = write_blob(layout, garbage)
    manifest_desc = json.loads((layout / "index.json").read_text())["manifests"][0]
    manifest = json.loads((layout / "blobs/sha256" / manifest_desc["digest"][7:]).read_bytes())
    manifest["layers"][0].update(digest=digest, size=len(garbage))
    data = json.dumps(manifest).encode()
    manifest_desc.update(digest=write_blob(layout, data), size=len(data))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))
    with open_image(f"oci:{layout}") as image, pytest.raises(FormatError, match="decompressed"):
        flatten(image, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _multiarch(tmp_path: Path) -> Path:
    """An OCI layout whose index.json points at an image index of amd64 and arm64 manifests."""
    layout = tmp_path / "multi"
    descs = []
    for arch in ("arm64", "amd64"):
        sub = oci_layout(
            tmp_path / arch,
            [layer_tar([E(f"arch-{arch}", data=arch.encode())])],
            config=config_for([layer_tar([E(f"arch-{arch}", data=arch.encode())])], architecture=arch),
        )
        desc = json.loads((sub / "index.json").read_text())["manifests"][0]
        desc.pop("annotations")
        desc["platform"] = {"os": "linux", "architecture": arch}
        descs.append(desc)
        layout.mkdir(exist_ok=True)
        for blob in (sub / "blobs" / "sha256").iterdir():
            write_blob(layout, blob.read_bytes())
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": descs}
    ).encode()
    top = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": write_blob(layout, index),
        "size": len(index),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return layout


def test_multiarch_index(tmp_path: Path) -> None:
    layout = _multiarch(tmp_path)
    with open_image(f"oci:{layout}:latest") as image:
        assert str(image.platform) == "linux/amd64"
    with open_image(f"oci:{layout}:latest", platform="linux/arm64") as image:
        assert str(image.platform) == "linux/arm64"
        flatten(image, tmp_path / "out")
    assert (tmp_path / "out" / "arch-arm64").read_bytes() == b"arm64"
    with (
        pytest.raises(ImageError, match="no image for platform linux/s390x"),
        open_image(f"oci:{layout}", platform="linux/s390x"),
    ):
        pass
    proc = cwbuild(["inspect", f"oci:{layout}:latest", "--json", "--platform", "linux/arm64"])
    assert json.loads(proc.stdout)["platform"] == "linux/arm64"


def test_oci_archive_and_unknown_tag(tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "l", [LAYER], compression="zstd", tag="v2")
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    with open_image(f"oci-archive:{archive}:v2") as image:
        flatten(image, tmp_path / "out")
    assert (tmp_path / "out" / "hello").read_bytes() == b"hi\n"
    with pytest.raises(ImageError, match="no image tagged 'v3'"), open_image(f"oci-archive:{archive}:v3"):
        pass


def test_docker_archive_compressed_layer(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "a.tar", [LAYER])
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    with tarfile.open(tmp_path / "gz.tar", "w") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            data = compress(raw, "gzip") if name.endswith("layer.tar") else raw
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open_image(f"docker-archive:{tmp_path / 'gz.tar'}") as image:
        assert image.layers[0].media_type.endswith("+gzip")
        assert image.layers[0].diff_id == sha(LAYER)
        assert image.manifest_digest is None
        flatten(image, tmp_path / "out")
    assert (tmp_path / "out" / "hello").read_bytes() == b"hi\n"


def test_inspect_bundle_seam(tmp_path: Path) -> None:
    (tmp_path / "measurement.json").write_text("{}")
    proc = cwbuild(["inspect", tmp_path])
    assert proc.returncode == 2
    assert b"bundle" in proc.stderr


def test_missing_layout(tmp_path: Path) -> None:
    proc = cwbuild(["inspect", f"oci:{tmp_path}"])
    assert proc.returncode == 1
    assert b"not an OCI image layout" in proc.stderr

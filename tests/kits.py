"""A real kit and a real signed archive sample, fetched once per machine into the test-asset cache.

`cwbuild kit fetch` hits the network, so the kit is cached under $CWBUILD_ASSETS/kits (the cache root given
to --cache) and reused by every later run on the machine. `--allow-expired` because a mirror may serve a
sid InRelease past its Valid-Until (this machine's does); the signature and hash chain are still checked.
The archive sample (trixie's InRelease, its amd64 Packages.xz and one small .deb) feeds the tamper tests,
which then need no network.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cwbuild import net
from cwbuild.boot import debian
from cwbuild.boot.kit import Kit, latest, load
from tests.conftest import ASSETS, cwbuild

KIT_CACHE = ASSETS / "kits"
SAMPLE_DIR = KIT_CACHE / "archive-sample"
SAMPLE_SUITE = "trixie"
SAMPLE_PACKAGE = "libkeyutils1"  # ~10 KB


def cached_kit() -> Kit:
    """The newest cached trixie kit, fetched through the CLI if there is none."""
    kit = latest(KIT_CACHE, "trixie")
    if kit is not None:
        return kit
    proc = cwbuild(["kit", "fetch", "--cache", KIT_CACHE, "--allow-expired", "--json"], timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()
    return load(KIT_CACHE, json.loads(proc.stdout)["id"])


@dataclass(frozen=True)
class Sample:
    """Real, consistent archive files: InRelease, the Packages.xz it lists, one .deb listed there."""

    inrelease: Path
    packages_xz: Path
    deb: Path


def archive_sample() -> Sample:
    """Download the sample once (InRelease first, then the index by its hash, so the pair is consistent)."""
    sample = Sample(
        SAMPLE_DIR / "InRelease", SAMPLE_DIR / "Packages.xz", SAMPLE_DIR / f"{SAMPLE_PACKAGE}.deb"
    )
    if sample.inrelease.is_file() and sample.packages_xz.is_file() and sample.deb.is_file():
        return sample
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    base = f"{debian.DEFAULT_ARCHIVE}/dists/{SAMPLE_SUITE}"
    opts = net.Options(timeout=60, max_bytes=64 << 20)
    raw = net.fetch(f"{base}/InRelease", options=opts)
    release = debian.parse_release(debian.verify_inrelease(raw, keyring=debian.DEFAULT_KEYRING))
    digest, _ = release.sha256[debian.index_path("Packages.xz")]
    index = net.fetch(f"{base}/main/binary-amd64/by-hash/SHA256/{digest}", options=opts)
    assert hashlib.sha256(index).hexdigest() == digest
    packages, _ = debian.parse_packages(
        debian.verify_index(release, "Packages.xz", index), suite=SAMPLE_SUITE
    )
    deb = net.fetch(f"{debian.DEFAULT_ARCHIVE}/{packages[SAMPLE_PACKAGE].filename}", options=opts)
    sample.deb.write_bytes(deb)
    sample.packages_xz.write_bytes(index)
    sample.inrelease.write_bytes(raw)
    return sample

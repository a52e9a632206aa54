"""`cwbuild build` against `buildah mkcw` on the same ~300 MB multi-layer image, in one run.

    .venv/bin/python bench/build.py [--mib 300] [--runs 3] [--workdir /var/tmp] [--kit-cache DIR]
                                    [--sid /tmp/sid]

The image: bench/rootfs_memory.py's generator (two layers of big random files, one of 5000 small files,
uncompressed) copied into the local Podman store with skopeo, plus an ENTRYPOINT (podman build, no new layer).
buildah gets the same image in its own store inside the Debian sid chroot (`podman save` + `buildah pull`,
not timed), overlay driver, private root. Timed, in --runs rounds (each tool once per round), wall clock
and peak memory (sum of PSS and of RSS over the whole process tree, sampled every 20 ms, bench/encrypt.py's
sampler; and the peak growth of the host's Shmem, where cwbuild's plaintext rootfs and ext4 image live when
they fit in /dev/shm):

  - buildah mkcw --type snp --passphrase P IMAGE DEST   (LUKS1 + krun footer, committed as an image)
  - cwbuild build IMAGE --target krun --type snp         (the same output: LUKS1 + footer, buildah's layout)
  - the same with --tag                                 (the directory also stored as an image in Podman)
  - the same with --tag oci-archive:FILE                (the image written as an OCI archive instead)
  - cwbuild build IMAGE --tee snp                   (the full qemu bundle: LUKS2, kit kernel, initrd with
                                                      the agent, SNP measurement, launch configs)

cwbuild reads the image from Podman through its REST API (a private `podman system service` is started when
none is listening: it is a child, so its memory is counted). The kit must be cached (kit fetch). Not run by
pytest. The machine may be shared: the load before and after is printed; medians are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from encrypt import _tree_mem  # noqa: E402  (bench/encrypt.py: PSS/RSS over a process tree)
from rootfs_memory import make_image  # noqa: E402

#: Named per process, so two runs on one machine (and their clean-up) do not remove each other's images.
IMAGE = f"localhost/cwbuild-bench-build-{os.getpid()}:latest"
BASE = f"localhost/cwbuild-bench-build-{os.getpid()}-base:latest"
TAGGED = f"localhost/cwbuild-bench-build-{os.getpid()}-cw:latest"
PASSPHRASE = b"bench-passphrase-0123456789abcdef"
MiB = 1 << 20


def shmem() -> int:
    """The host's memory held by tmpfs and shared memory (proc(5) /proc/meminfo Shmem, kB)."""
    with open("/proc/meminfo", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


def measure(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int, int]:
    """(wall seconds, peak PSS, peak RSS, peak growth of Shmem) of one run of argv. cwbuild keeps its
    plaintext in /dev/shm when it fits: that memory belongs to no process, so it is reported apart."""
    base_shm = shmem()
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    peak_pss = peak_rss = peak_shm = 0
    while proc.poll() is None:
        pss, rss = _tree_mem(proc.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        peak_shm = max(peak_shm, shmem() - base_shm)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"{argv[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, peak_pss, peak_rss, peak_shm


def make_podman_image(work: Path, mib: int) -> None:
    make_image(work / "layout", mib * MiB, zstd=False)
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{work / 'layout'}", f"containers-storage:{BASE}"], check=True
    )
    (work / "Containerfile").write_text(f'FROM {BASE}\nENTRYPOINT ["/data/a.bin"]\n')
    subprocess.run(
        ["podman", "build", "-q", "--pull=never", "-t", IMAGE, "-f", str(work / "Containerfile"), str(work)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def buildah_argv(sid: Path, root: str) -> list[str]:
    return ["chroot", str(sid), "buildah", "--root", f"{root}/root", "--runroot", f"{root}/run",
            "--storage-driver", "overlay"]  # fmt: skip


def prepare_buildah(sid: Path, root: str) -> str:
    archive = sid / f"var/tmp/cwbuild-bench-{os.getpid()}.tar"
    subprocess.run(["podman", "save", "-q", "--format", "oci-archive", "-o", str(archive), IMAGE], check=True)
    pulled = subprocess.run(
        [*buildah_argv(sid, root), "pull", "-q", f"oci-archive:/var/tmp/cwbuild-bench-{os.getpid()}.tar"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    archive.unlink()
    return pulled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--kit-cache", type=Path, default=Path("/var/cache/cwbuild-test-assets/kits"))
    parser.add_argument("--sid", type=Path, default=Path("/tmp/sid"))
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are compared [3]")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="cwbuild-bench-build-"))
    broot = f"/var/tmp/cwbuild-bench-buildah-{os.getpid()}"
    try:
        make_podman_image(work, args.mib)
        image_id = prepare_buildah(args.sid, broot)
        fd = os.open(work / "pass", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, PASSPHRASE)
        os.close(fd)
        archive = work / "cw-oci.tar"
        cw = [sys.executable, "-m", "cwbuild", "build", IMAGE, "--passphrase-file", str(work / "pass")]
        cw += ["--kit-cache", str(args.kit_cache), "--offline"]
        buildah = [*buildah_argv(args.sid, broot), "mkcw", "--type", "snp"]
        buildah += ["--passphrase", PASSPHRASE.decode()]
        configs: dict[str, tuple[list[str], str | None]] = {
            "buildah mkcw (snp)": ([*buildah, image_id, "localhost/cwbuild-bench-cw"], None),
            "cwbuild build --target krun": ([*cw, "--target", "krun"], "krun"),
            "cwbuild build --target krun --tag": ([*cw, "--target", "krun", "--tag", TAGGED], "krun-tag"),
            "cwbuild ... krun --tag oci-archive:F": (
                [*cw, "--target", "krun", "--tag", f"oci-archive:{archive}"],
                "krun-oci",
            ),
            "cwbuild build --tee snp (bundle)": ([*cw, "--tee", "snp"], "snp"),
        }
        runs: dict[str, list[tuple[float, int, int, int]]] = {name: [] for name in configs}
        for _ in range(args.runs):  # rounds: each tool once per round, so load drifts hit all alike
            for name, (argv, out) in configs.items():
                if out is not None:
                    shutil.rmtree(work / out, ignore_errors=True)
                if out == "krun-tag":  # the last round's image, else re-tagging leaves it dangling (untimed)
                    subprocess.run(["podman", "rmi", "-f", TAGGED], check=False, capture_output=True)
                if out == "krun-oci":
                    archive.unlink(missing_ok=True)
                runs[name].append(measure(argv if out is None else [*argv, "-o", str(work / out)]))
        report(runs, work, load_before)
    finally:
        subprocess.run(["podman", "rmi", "-f", IMAGE, BASE, TAGGED], check=False, capture_output=True)
        subprocess.run([*buildah_argv(args.sid, broot), "rmi", "-a", "-f"], check=False, capture_output=True)
        shutil.rmtree(args.sid / broot.lstrip("/"), ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def report(runs: dict[str, list[tuple[float, int, int, int]]], work: Path, load_before: float) -> None:
    size = sum(f.stat().st_size for f in (work / "layout/blobs/sha256").iterdir())
    rounds = len(next(iter(runs.values())))
    blobs = f"{size / MiB:.0f} MiB of layer blobs"
    print(f"image: {blobs}, 3 layers (+ config-only ENTRYPOINT), {rounds} rounds;")
    print(f"{os.cpu_count()} CPUs, load {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          "median (min-max) wall, peak memory the highest of the rounds")  # fmt: skip
    base = statistics.median(r[0] for r in runs["buildah mkcw (snp)"])
    for name, results in runs.items():
        walls = [r[0] for r in results]
        wall = statistics.median(walls)
        pss, rss, shm = (max(r[i] for r in results) for i in (1, 2, 3))
        spread = f"({min(walls):5.2f}-{max(walls):5.2f})"
        print(f"  {name:<34} {wall:6.2f} s {spread}  x{base / wall:4.2f} vs buildah  "
              f"peak PSS {pss / MiB:5.0f} MiB  RSS-sum {rss / MiB:5.0f} MiB  "
              f"tmpfs +{shm / MiB:4.0f} MiB")  # fmt: skip
    print(f"  disk.img: cwbuild krun {(work / 'krun/disk.img').stat().st_size / MiB:.0f} MiB, "
          f"bundle {(work / 'snp/disk.img').stat().st_size / MiB:.0f} MiB")  # fmt: skip
    for out in ("krun", "snp"):
        manifest = json.loads((work / out / "manifest.json").read_text())
        timed = [s for s in manifest["steps"] if s["seconds"] >= 0.05]
        steps = ", ".join(f"{s['step']} {s['seconds']:.2f}" for s in timed)
        source = manifest["image"].get("rootfs_source", "export")
        print(f"  last {out}: rootfs via {source}; steps (s): {steps}")


if __name__ == "__main__":
    main()

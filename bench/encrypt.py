"""Disk encryption throughput: cwbuild against `luksy encrypt` and the openssl single-core AES-XTS figure.

    .venv/bin/python bench/encrypt.py [--size-mib 1024] [--runs 2] [--workdir /tmp] [--luksy PATH] [--skip-4g]

Measures, on the same random input:
  - whole command, default settings: `cwbuild disk encrypt` (LUKS2 4096, and LUKS1) vs `luksy encrypt`
    (v2, and v1 `--luks1`), each with a passphrase file, wall clock including start-up and KDF;
  - payload only: cwbuild's streamed AES-XTS of the file (xts.crypt_span, file to file) at 4096- and 512-byte
    sectors, written with O_DIRECT (the default) and buffered, and with the output's sha256 computed on the
    way (what `cwbuild build` asks for); in memory (one process, and one per CPU at once: compute only, like
    openssl speed), then in memory on one process for each backend (the compiled EVP loop, the Python EVP
    loop, `cryptography`);
    luksy's payload estimated as its whole time minus its time on a 1 MiB input (KDF benchmarks);
  - `openssl speed -evp aes-256-xts` (one core, 16 KiB blocks): the machine's AES-XTS limit;
  - peak memory (sum of PSS over the process tree, sampled every 20 ms) of `cwbuild disk encrypt` on 4 GiB.
Not run by pytest. The machine may be shared: each figure is the best of --runs runs, all runs are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cwbuild.disk.xts import (  # noqa: E402
    BACKENDS,
    SectorCrypt,
    Span,
    XtsParams,
    backend_name,
    crypt_span,
    default_workers,
)
from cwbuild.errors import DiskError  # noqa: E402

MiB = 1 << 20
DEFAULT_LUKSY = Path("/var/cache/cwbuild-test-assets/x/usr/bin/luksy")


CPU: dict[str, list[float]] = {}


def _timed(argv: list[str]) -> float:
    """Wall seconds of one run on a fresh output (the last argument, removed and synced away first, so
    neither tool pays for dropping the previous run's file); CPU seconds (user+sys of the whole process
    tree) go to CPU."""
    Path(argv[-1]).unlink(missing_ok=True)
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    CPU.setdefault(" ".join(argv), []).append(cpu)
    return wall


def _best(runs: int, argv: list[str]) -> tuple[float, list[float]]:
    times = [_timed(argv) for _ in range(runs)]
    return min(times), times


def _cpu(argv: list[str]) -> float:
    return min(CPU[" ".join(argv)])


def _openssl() -> dict[int, float]:
    """`openssl speed` bytes/s by block size (16 B .. 16 KiB; one XTS data unit per call)."""
    out = subprocess.run(
        ["openssl", "speed", "-evp", "aes-256-xts", "-seconds", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header = next(ln for ln in out.splitlines() if ln.startswith("type"))
    line = next(ln for ln in out.splitlines() if ln.upper().startswith("AES-256-XTS"))
    sizes = [int(n) for n in re.findall(r"(\d+) bytes", header)]
    rates = [float(v) * 1000 for v in re.findall(r"([\d.]+)k", line)]
    return dict(zip(sizes, rates, strict=True))


def _tree_mem(pid: int) -> tuple[int, int]:
    """(sum of Pss, sum of Rss) in bytes over `pid` and its descendants. Pss divides shared pages among
    their users, so forked workers sharing the parent's pages are not counted twice; the Rss sum is an upper
    bound."""
    pss = rss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
            pss += int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1)) * 1024  # type: ignore[union-attr]
            rss += int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1)) * 1024  # type: ignore[union-attr]
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            continue
    return pss, rss


def _peak_memory(argv: list[str]) -> tuple[int, int]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss, rss = _tree_mem(proc.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{argv} failed")
    return peak_pss, peak_rss


def _payload_only(
    files: tuple[Path, Path], size: int, sector: int, runs: int, *, direct: bool = True, digest: bool = False
) -> tuple[float, list[float]]:
    """Best and all wall times of crypt_span from `src` to a fresh `dst` (created, then synced away before
    each run, as a build's output is new)."""
    src, dst = files
    times = []
    for _ in range(runs):
        dst.unlink(missing_ok=True)
        dst.write_bytes(b"")
        os.truncate(dst, size)
        os.sync()
        start = time.perf_counter()
        crypt_span(
            Span(str(src), str(dst), 0, 0, size),
            params=XtsParams(os.urandom(64), sector),
            encrypt=True,
            direct=direct,
            digest=hashlib.sha256() if digest else None,
        )
        times.append(time.perf_counter() - start)
    return min(times), times


def _in_memory_job(sector: int, backend: str | None = None) -> float:
    """Seconds for one process to encrypt 64 MiB in memory, 4 times (no file I/O): compute only."""
    buf = bytearray(os.urandom(64 * MiB))
    with SectorCrypt(XtsParams(os.urandom(64), sector), encrypt=True, backend=backend) as c:
        start = time.perf_counter()
        for rep in range(4):
            c.run(buf, rep * len(buf) // 512)
        return time.perf_counter() - start


def _in_memory(sector: int, workers: int) -> float:
    """Aggregate bytes/s of `workers` processes encrypting in memory at once."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        times = pool.map(_in_memory_job, [sector] * workers)
    return workers * 4 * 64 * MiB / max(times)


def _by_backend(sector: int) -> dict[str, float]:
    """Bytes/s of one process in memory, for each backend this machine has (best of 2)."""
    out = {}
    for backend in BACKENDS:
        try:
            out[backend] = 4 * 64 * MiB / min(_in_memory_job(sector, backend) for _ in range(2))
        except DiskError as exc:  # e.g. the compiled loop was not built
            print(f"backend {backend}: {exc}", file=sys.stderr)
    return out


def _payload_figures(files: tuple[Path, Path], size: int, sector: int, runs: int) -> dict[str, object]:
    results: dict[str, object] = {}
    variants: list[tuple[str, dict[str, bool]]] = [
        ("", {}),
        ("_buffered", {"direct": False}),
        ("_sha256", {"digest": True}),
    ]
    for name, opts in variants:
        best, times = _payload_only(files, size, sector, runs, **opts)
        results[f"cwbuild_payload_{sector}{name}_s"] = {"best": best, "runs": times, "Bps": size / best}
    results[f"cwbuild_in_memory_{sector}_Bps"] = {
        "one_process": _in_memory(sector, 1),
        f"{default_workers()}_processes": _in_memory(sector, default_workers()),
    }
    results[f"cwbuild_in_memory_{sector}_by_backend_Bps"] = _by_backend(sector)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--luksy", type=Path, default=DEFAULT_LUKSY)
    ap.add_argument("--skip-4g", action="store_true", help="skip the 4 GiB peak-memory run")
    args = ap.parse_args()
    size = args.size_mib * MiB
    cw = [sys.executable, "-m", "cwbuild", "disk", "encrypt", "--force"]
    results: dict[str, object] = {
        "input_bytes": size,
        "cpus": os.cpu_count(),
        "workers": default_workers(),
        "backend": backend_name(),
        "loadavg_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="cwbuild-bench-") as tmp:
        work = Path(tmp)
        src, small, out = work / "plain.img", work / "small.img", work / "out.img"
        pw = work / "pass"
        pw.write_bytes(b"benchmark passphrase\n")
        pw.chmod(0o600)
        with src.open("wb") as f:
            for _ in range(size // (64 * MiB)):
                f.write(os.urandom(64 * MiB))
        small.write_bytes(os.urandom(MiB))
        os.sync()  # the input is on disk before anything is timed
        by_block = _openssl()
        results["openssl_aes_256_xts_one_core_Bps"] = by_block[max(by_block)]  # largest block
        results["openssl_aes_256_xts_one_core_by_block_Bps"] = by_block
        for name, extra in (("luks2", []), ("luks1", ["--format", "luks1"])):
            argv = [*cw, "--passphrase-file", str(pw), *extra, str(src), str(out)]
            best, times = _best(args.runs, argv)
            results[f"cwbuild_{name}_whole_s"] = {"best": best, "runs": times, "cpu_s": _cpu(argv)}
            out.unlink()
        for sector in (4096, 512):
            results.update(_payload_figures((src, out), size, sector, args.runs))
        if args.luksy.exists():
            for name, extra in (("v2", []), ("v1", ["--luks1"])):
                base = [str(args.luksy), "encrypt", "--password-file", str(pw), *extra, "-f"]
                best, times = _best(args.runs, [*base, str(src), str(out)])
                fixed, _ = _best(args.runs, [*base, str(small), str(out)])
                cpu = _cpu([*base, str(src), str(out)])
                results[f"luksy_{name}_whole_s"] = {"best": best, "runs": times, "cpu_s": cpu}
                results[f"luksy_{name}_payload_estimate_s"] = best - fixed
        out.unlink(missing_ok=True)
        if not args.skip_4g:
            big = work / "big.img"
            big.write_bytes(b"")
            os.truncate(big, 4 << 30)  # sparse: reading it costs no disk, memory is what is measured
            argv = [*cw, str(big), str(out), "--passphrase-file", str(pw), "--kdf", "pbkdf2"]
            pss, rss = _peak_memory(argv)
            results["cwbuild_peak_pss_4GiB_bytes"], results["cwbuild_peak_rss_sum_4GiB_bytes"] = pss, rss
    results["loadavg_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    _summary(results, size)


def _summary(r: dict[str, object], size: int) -> None:
    def best(key: str) -> float:
        value = r.get(key)
        return float(value["best"]) if isinstance(value, dict) else float("nan")  # type: ignore[arg-type]

    ossl = float(r["openssl_aes_256_xts_one_core_Bps"])  # type: ignore[arg-type]
    print(f"\nopenssl aes-256-xts, one core: {ossl / 1e9:.2f} GB/s")
    by_block = r["openssl_aes_256_xts_one_core_by_block_Bps"]
    print("    by block size: " + ", ".join(f"{b} B {v / 1e9:.2f}" for b, v in by_block.items()))  # type: ignore[attr-defined]
    for sector in (4096, 512):
        bps = size / best(f"cwbuild_payload_{sector}_s")
        share = 100 * bps / ossl
        print(
            f"cwbuild payload file to file, {sector} B sectors: {bps / 1e9:.2f} GB/s = {share:.0f}% of ossl"
        )
        for name in ("buffered", "sha256"):
            bps = size / best(f"cwbuild_payload_{sector}_{name}_s")
            print(f"    {name}: {bps / 1e9:.2f} GB/s")
        mem = r[f"cwbuild_in_memory_{sector}_Bps"]
        for who, v in mem.items():  # type: ignore[attr-defined]
            print(f"    in memory, {who}: {v / 1e9:.2f} GB/s = {100 * v / ossl:.0f}% of openssl")
        by_backend = r[f"cwbuild_in_memory_{sector}_by_backend_Bps"]
        for who, v in by_backend.items():  # type: ignore[attr-defined]
            print(f"    in memory, one process, backend {who}: {v / 1e9:.2f} GB/s = {100 * v / ossl:.0f}%")
    for cw_key, lk_key in (
        ("cwbuild_luks2_whole_s", "luksy_v2_whole_s"),
        ("cwbuild_luks1_whole_s", "luksy_v1_whole_s"),
    ):
        c, lk = best(cw_key), best(lk_key)
        print(f"{cw_key}: {c:.2f} s vs {lk_key}: {lk:.2f} s -> {lk / c:.1f}x (wall)")
        c_cpu, lk_cpu = r[cw_key]["cpu_s"], r[lk_key]["cpu_s"]  # type: ignore[index]
        print(f"    CPU seconds: cwbuild {c_cpu:.2f}, luksy {lk_cpu:.2f} -> {lk_cpu / c_cpu:.1f}x")
    for v in ("v2", "v1"):
        est = r.get(f"luksy_{v}_payload_estimate_s")
        if isinstance(est, float):
            print(f"luksy {v} payload (estimate): {est:.2f} s = {size / est / 1e9:.2f} GB/s")
    peak = r.get("cwbuild_peak_pss_4GiB_bytes")
    if isinstance(peak, int):
        rss = int(r["cwbuild_peak_rss_sum_4GiB_bytes"])  # type: ignore[call-overload]
        print(f"cwbuild encrypting 4 GiB, tree peak: PSS {peak / MiB:.0f} MiB, RSS sum {rss / MiB:.0f} MiB")


if __name__ == "__main__":
    main()

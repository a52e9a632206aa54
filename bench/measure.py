"""Benchmark: cwbuild's SNP launch digest vs sev-snp-measure's Python API, same inputs, same run.

    .venv/bin/python bench/measure.py [--workdir DIR] [--kernel-mib 16] [--initrd-mib 512] [--repeat 3]
                                      [--json]

Each implementation runs in its own child process (so that peak memory is that child's ru_maxrss, read with
os.wait4) on the Debian OVMF.amdsev.fd with a generated kernel and initrd (page cache warmed first). Also
reports the cost of 64 vCPUs relative to 1 vCPU. Targets (issue #8): at least as fast as sev-snp-measure,
peak memory under 64 MB, 64 vCPUs < 2x one vCPU. Not run by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = REPO.parent / "shared" / "fixtures" / "firmware" / "OVMF.amdsev.fd"
CMDLINE = "console=ttyS0 root=/dev/vda1 ro"
MIB = 1 << 20


def _write(path: Path, mib: int, tag: bytes) -> None:
    """A file of `mib` MiB with non-repeating-page content (cheap to generate)."""
    if path.exists() and path.stat().st_size == mib * MIB:
        return
    block = (tag * (MIB // len(tag) + 1))[:MIB]
    with path.open("wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "little") + block[8:])


def _warm(*paths: Path) -> None:
    for p in paths:
        with p.open("rb") as f:
            while f.read(8 * MIB):
                pass


def child_ours(kernel: str, initrd: str, vcpus: int, repeat: int) -> dict[str, object]:
    # each child imports only its own implementation, so that its peak RSS is its own
    from cwbuild.measure.api import Blob, MeasureSpec, SevOptions, Target, Tee, measure  # noqa: PLC0415

    spec = MeasureSpec(
        targets=(Target(Tee.SNP, FIRMWARE),),
        kernel=Blob(path=Path(kernel)) if kernel else None,
        initrd=Blob(path=Path(initrd)) if initrd else None,
        cmdline=CMDLINE if kernel else None,
        sev=SevOptions(cpus=vcpus, vcpu_type="EPYC-v4"),
    )
    times, value = [], ""
    for _ in range(repeat):
        t = time.perf_counter()
        value = measure(spec).get(Tee.SNP).values["measurement"] or ""
        times.append(time.perf_counter() - t)
    return {"seconds": min(times), "digest": value}


def child_ssm(kernel: str, initrd: str, vcpus: int, repeat: int) -> dict[str, object]:
    from sevsnpmeasure import guest  # noqa: PLC0415 - see child_ours
    from sevsnpmeasure.sev_mode import SevMode  # noqa: PLC0415
    from sevsnpmeasure.vcpu_types import CPU_SIGS  # noqa: PLC0415

    times, value = [], b""
    for _ in range(repeat):
        t = time.perf_counter()
        value = guest.calc_launch_digest(
            SevMode.SEV_SNP,
            vcpus,
            CPU_SIGS["EPYC-v4"],
            str(FIRMWARE),
            kernel or None,
            initrd or None,
            CMDLINE if kernel else None,
            0x1,
        )
        times.append(time.perf_counter() - t)
    return {"seconds": min(times), "digest": value.hex()}


def run_child(impl: str, kernel: str, initrd: str, vcpus: int, repeat: int) -> dict[str, object]:
    argv = [sys.executable, __file__, "--child", impl, kernel, initrd, str(vcpus), str(repeat)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} child failed with {proc.returncode}")
    result: dict[str, object] = json.loads(out)
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux: KiB
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--kernel-mib", type=int, default=16)
    ap.add_argument("--initrd-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        kernel, initrd = Path(tmp) / "vmlinuz", Path(tmp) / "initrd.img"
        _write(kernel, args.kernel_mib, b"kernel")
        _write(initrd, args.initrd_mib, b"initrd")
        _warm(FIRMWARE, kernel, initrd)
        report: dict[str, object] = {"inputs": {"kernel_mib": args.kernel_mib, "initrd_mib": args.initrd_mib}}
        for impl in ("cwbuild", "sev-snp-measure"):
            name = "ours" if impl == "cwbuild" else "ssm"
            big = run_child(name, str(kernel), str(initrd), 4, args.repeat)
            one = run_child(name, "", "", 1, args.repeat * 3)
            many = run_child(name, "", "", 64, args.repeat * 3)
            report[impl] = {
                "snp_4vcpu_kernel_initrd": big,
                "snp_1vcpu_firmware_only": one,
                "snp_64vcpu_firmware_only": many,
                "ratio_64_to_1_vcpu": round(float(many["seconds"]) / float(one["seconds"]), 3),  # type: ignore[arg-type]
            }
        ours, ssm = report["cwbuild"], report["sev-snp-measure"]
        assert isinstance(ours, dict)
        assert isinstance(ssm, dict)
        same = all(ours[k]["digest"] == ssm[k]["digest"] for k in ours if k.startswith("snp_"))
        report["digests_identical"] = same
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    print(f"inputs: Debian OVMF.amdsev.fd, kernel {args.kernel_mib} MiB, initrd {args.initrd_mib} MiB")
    for impl in ("cwbuild", "sev-snp-measure"):
        r = report[impl]
        assert isinstance(r, dict)
        big = r["snp_4vcpu_kernel_initrd"]
        print(
            f"{impl:16s} SNP 4 vCPU + kernel + initrd: {big['seconds']:.3f} s, "
            f"peak RSS {big['peak_rss_mb']} MB; "
            f"firmware only: 1 vCPU {r['snp_1vcpu_firmware_only']['seconds'] * 1000:.1f} ms, "
            f"64 vCPU {r['snp_64vcpu_firmware_only']['seconds'] * 1000:.1f} ms "
            f"(x{r['ratio_64_to_1_vcpu']})"
        )
    print(f"digests identical: {report['digests_identical']}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, k, i, n, rep = sys.argv[2:7]
        fn = child_ours if impl == "ours" else child_ssm
        sys.path.insert(0, str(REPO))
        print(json.dumps(fn(k, i, int(n), int(rep))))
    else:
        main()

"""`cwbuild run BUNDLE`: boot a bundle and exit with its workload's status (issue #7 item 1).

On an SEV-SNP or TDX host it runs the confidential launch as configured (and refuses a host whose KVM, QEMU
or firmware differs from what measurement.json assumed). `--tee sim` boots the same kernel, initrd, command
line and disk under plain QEMU and plays the TEE on the host: it signs the guest's report requests with
`--sim-key` (a P-384 PEM private key, 0600; default $CWBUILD_SIM_KEY), whose public half the endpoint must
trust with `--insecure-sim-trust`.
"""

from __future__ import annotations

from pathlib import Path

import click

from cwbuild.errors import UsageError
from cwbuild.launch.spec import Tee
from cwbuild.runner.vm import RunOptions, run_bundle


@click.command(name="run")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--tee", type=click.Choice(["snp", "tdx", "sim"]), help="Launch as (default: what the bundle says)."
)
@click.option("--accel", type=click.Choice(["kvm", "tcg"]), help="QEMU accelerator (sim only may use tcg).")
@click.option("--console", "console", is_flag=True, help="Stream the serial console to stdout (default).")
@click.option(
    "--log", "log", type=click.Path(dir_okay=False, path_type=Path), help="Append the console here."
)
@click.option("--memory", "memory", type=click.IntRange(128, 4 * 1024 * 1024), help="Guest memory in MiB.")
@click.option(
    "--sim-key",
    "sim_key",
    envvar="CWBUILD_SIM_KEY",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The simulated TEE's P-384 signing key (PEM, mode 0600); env CWBUILD_SIM_KEY.",
)
@click.option("--timeout", type=click.FloatRange(1, None), help="Kill the guest after this many seconds.")
def command(  # noqa: PLR0913, PLR0917 - click passes one parameter per flag
    bundle: Path,
    tee: str | None,
    accel: str | None,
    console: bool,
    log: Path | None,
    memory: int | None,
    sim_key: Path | None,
    timeout: float | None,
) -> int:
    """Boot BUNDLE under QEMU; exit with the workload's status."""
    if console and log is not None:
        raise UsageError("--console and --log are exclusive")
    opts = RunOptions(
        bundle=bundle,
        tee=Tee(tee) if tee else None,
        accel=accel,
        log=log,
        memory_mib=memory,
        sim_key=sim_key,
        timeout=timeout,
    )
    return run_bundle(opts)

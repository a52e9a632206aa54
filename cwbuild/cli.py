"""The command line: a root group, a dispatch table of subcommands, and the one top-level error handler.

Each subcommand lives in `cwbuild/commands/<name>.py` as a click command named `command`; it parses flags
into frozen dataclasses and calls plain functions (STYLE.md rule 2). Subcommands are imported lazily so
`cwbuild --help` stays fast and one broken module cannot take the others down.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import traceback

import click
from rich.console import Console
from rich.logging import RichHandler

from cwbuild import __version__
from cwbuild.errors import CwbuildError

#: name -> (module, one-line help). The dispatch table; a module that does not exist yet is not listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("cwbuild.commands.build", "Build a confidential workload from an image."),
    "inspect": ("cwbuild.commands.inspect", "Show a resolved image or a bundle."),
    "rootfs": ("cwbuild.commands.rootfs", "Write the flattened root filesystem of an image."),
    "measure": ("cwbuild.commands.measure", "Compute expected launch measurements."),
    "disk": ("cwbuild.commands.disk", "Encrypt, decrypt and inspect LUKS disk images."),
    "verify-evidence": ("cwbuild.commands.verify_evidence", "Verify an SNP report or a TDX quote offline."),
    "kit": ("cwbuild.commands.kit", "Fetch, list, export and import boot kits."),
    "run": ("cwbuild.commands.run", "Boot a bundle under QEMU."),
    "serve": ("cwbuild.commands.serve", "Run the attestation endpoint."),
    "register": ("cwbuild.commands.register", "Register a workload with an attestation endpoint."),
}


class _State:
    debug = False


def _available(name: str) -> bool:
    module = COMMANDS[name][0]
    return importlib.util.find_spec(module) is not None


class DispatchGroup(click.Group):
    """A group whose subcommands come from `COMMANDS`, imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: ARG002 - click's signature
        return sorted(name for name in COMMANDS if _available(name))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:  # noqa: ARG002
        if cmd_name not in COMMANDS or not _available(cmd_name):
            return None
        module = importlib.import_module(COMMANDS[cmd_name][0])
        command: click.Command = module.command
        return command


@click.group(cls=DispatchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="cwbuild")
@click.option("--debug", is_flag=True, help="Log every external command and show tracebacks.")
def cli(debug: bool) -> None:
    """cwbuild turns OCI container images into confidential workloads."""
    _State.debug = debug
    _setup_logging(debug)


def _setup_logging(debug: bool) -> None:
    handler = RichHandler(show_time=False, show_path=False, console=Console(stderr=True))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", handlers=[handler], force=True
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn every outcome into an exit status (0 ok, 1 error, 2 usage)."""
    try:
        result = cli.main(args=argv, prog_name="cwbuild", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except CwbuildError as exc:
        if _State.debug:
            traceback.print_exc()
        click.echo(exc.diagnostics(), err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # the one catch-all (STYLE.md rule 7)
        if _State.debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc}", err=True)
        click.echo("hint: rerun with --debug for the traceback and report it", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)

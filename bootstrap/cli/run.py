"""`metalseed run`: the seed daemon (boot services + orchestrator)."""

from __future__ import annotations

from pathlib import Path

import click

from . import Ctx, cli
from .boot import announce_serving, serve, serve_overrides


@cli.command("run")
@click.option(
    "--range",
    "ranges",
    multiple=True,
    help="A BMC RANGE to sweep (repeatable; default: discovery.ranges).",
)
@click.option(
    "--credentials",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Candidate BMC logins, username:password per line (mode 0600).",
)
@click.option(
    "--sweep-interval",
    type=float,
    default=None,
    help="Seconds between BMC sweeps of discovery.ranges (0: once at start).",
)
@click.option(
    "--auto-boot/--no-auto-boot",
    default=None,
    help="Netboot newly enrolled machines (default: run.auto_boot, on).",
)
@click.pass_obj
def run_daemon(
    obj: Ctx,
    ranges: tuple[str, ...],
    credentials: Path | None,
    sweep_interval: float | None,
    auto_boot: bool | None,
    **flags,
) -> int:
    """Run the seed: boot services, BMC sweeps, and every node carried to enlisted.

    Takes the boot-service options of `metalseed serve`. Newly enrolled
    machines are set to PXE and powered on; boots that time out are retried
    (run.boot_attempts, run.boot_timeout). Stops on SIGTERM or Ctrl-C.
    """
    from ..controlplane.daemon import run

    config = obj.config(
        **serve_overrides(**flags),
        **{
            "run.sweep_interval": sweep_interval,
            "run.auto_boot": auto_boot,
            "discovery.ranges": tuple(ranges) or None,
            "discovery.credentials_file": credentials,
        },
    )
    run(config, on_ready=announce_serving)
    return 0


# the same boot-service options as `serve`, declared once there
run_daemon.params.extend(p for p in serve.params if p.name != "help")

"""`metalseed lab ...`: simulated machines for labs and tests."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from ..errors import UsageError
from . import cli

# -- the lab --------------------------------------------------------------------------


@cli.group()
def lab() -> None:
    """Simulated machines for labs and tests."""


@lab.command("bmc")
@click.option("--count", type=int, default=8, show_default=True, help="How many BMCs.")
@click.option("--address", default="127.0.1.1", show_default=True, help="First BMC address.")
@click.option("--port", type=int, default=623, show_default=True, help="(First) UDP port.")
@click.option(
    "--vary",
    type=click.Choice(["address", "port"]),
    default="address",
    show_default=True,
    help="Give each BMC the next address, or the next port.",
)
@click.option(
    "--credentials",
    type=click.Path(path_type=Path),
    default=None,
    help="username:password per line: the users every BMC starts with.",
)
@click.option(
    "--spec",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help='JSON {"bmcs": [...]} with per-BMC settings and faults (replaces --count).',
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the BMCs served (JSON, no passwords) here once all are listening.",
)
@click.option(
    "--power-hook",
    default=None,
    help="Command run on every power change, with METALSEED_POWER=on|off|reset "
    "and METALSEED_BMC_* in its environment.",
)
@click.option("--powered-on", is_flag=True, help="Machines start powered on.")
@click.option("--latency", type=float, default=0.0, help="Fault: seconds added to every answer.")
@click.option("--drop", type=float, default=0.0, help="Fault: probability of dropping a packet.")
@click.option("--sha1-only", is_flag=True, help="Fault: refuse cipher suite 17 (SHA-256).")
@click.option("--unresponsive", is_flag=True, help="Fault: answer nothing.")
@click.option(
    "--power-delay",
    type=float,
    default=0.0,
    help="Fault: seconds before a power change takes effect.",
)
@click.option("--seed", type=int, default=None, help="Random seed for packet drops.")
def lab_bmc(
    count: int,
    address: str,
    port: int,
    vary: str,
    credentials: Path | None,
    spec: Path | None,
    manifest: Path | None,
    power_hook: str | None,
    powered_on: bool,
    latency: float,
    drop: float,
    sha1_only: bool,
    unresponsive: bool,
    power_delay: float,
    seed: int | None,
) -> int:
    """Run simulated BMCs (real IPMI over UDP) until interrupted."""
    import json
    import shlex

    from ..discovery import load_credentials
    from ..lab.bmcrun import BmcSimulator, BmcSpec, command_power_hook, generate_specs
    from ..lab.bmcsim import Faults

    users = (
        [(c.username, c.password.reveal()) for c in load_credentials(credentials)]
        if credentials
        else []
    )
    faults = Faults(
        latency=latency,
        drop=drop,
        unresponsive=unresponsive,
        sha1_only=sha1_only,
        power_delay=power_delay,
    )
    if spec is not None:
        try:
            doc = json.loads(spec.read_text())
            specs = [BmcSpec.from_json(b) for b in doc["bmcs"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{spec}: not a BMC spec file ({type(exc).__name__}: {exc})") from None
    else:
        specs = generate_specs(
            count, address, port, vary, faults=faults, power="on" if powered_on else "off"
        )
    hook = command_power_hook(shlex.split(power_hook)) if power_hook else None
    sim = BmcSimulator(specs, default_users=users, power_hook=hook, seed=seed)
    sim.start()
    if manifest is not None:
        sim.write_manifest(manifest)
    click.echo(
        f"serving {len(sim.bmcs)} simulated BMCs "
        f"({specs[0].endpoint} .. {specs[-1].endpoint}); Ctrl-C to stop",
        err=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sim.run(stop)
    return 0

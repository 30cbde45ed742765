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
    "--silent-unknown-user",
    is_flag=True,
    help="Fault: say nothing to a login as an unknown user (no RAKP 2), as many BMCs do.",
)
@click.option(
    "--refuse-sessions",
    type=int,
    default=0,
    help="Fault: answer this many logins per BMC with 'no free session slot' (-1: all).",
)
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
    silent_unknown_user: bool,
    refuse_sessions: int,
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
        silent_unknown_user=silent_unknown_user,
        refuse_sessions=refuse_sessions,
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


# -- the rack: lab up | down | status ------------------------------------------------------


def _parse_machines(values: tuple[str, ...], kind: str) -> dict[str, int]:
    """``--machines 3`` (of --kind) or ``--machines netns=2 --machines qemu=1``."""
    counts: dict[str, int] = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep:
            name, number = kind, value
        if not number.isdigit() or int(number) < 1:
            raise UsageError(f"--machines {value!r}: give N or KIND=N, N at least 1")
        counts[name] = counts.get(name, 0) + int(number)
    return counts


@lab.command("up")
@click.option(
    "--machines",
    "machines",
    multiple=True,
    default=(),
    help="How many machines: N (of --kind) or KIND=N; repeat to mix kinds.",
)
@click.option(
    "--kind",
    type=click.Choice(["qemu", "netns", "fake"]),
    default="qemu",
    show_default=True,
    help="The kind for a plain --machines N.",
)
@click.option("--disks", default="", help="Data disks per machine, e.g. 2x20G (sparse files).")
@click.option("--memory", type=int, default=1536, show_default=True, help="MiB per QEMU VM.")
@click.option("--no-seed", is_flag=True, help="Do not start the seed daemon in the lab.")
@click.option(
    "--no-join",
    is_flag=True,
    help="The lab's seed does not join enlisted machines into Ceph (join.auto = false); "
    "set when the lab is made.",
)
@click.option(
    "--image",
    type=click.Choice(["node", "callback", "current"]),
    default="node",
    show_default=True,
    help="What the seed boots: the node image (built, cached), the small call-back "
    "image, or whatever the catalogue's current image is.",
)
@click.pass_obj
def lab_up(
    obj,
    machines: tuple[str, ...],
    kind: str,
    disks: str,
    memory: int,
    no_seed: bool,
    no_join: bool,
    image: str,
) -> int:
    """Build the lab (or add machines to it, powered off) and start its seed."""
    from ..lab.rack import Rack, parse_disks

    config = obj.config()
    rack = Rack(config)

    def ensure_image() -> None:
        from ..image.catalogue import Catalogue

        if image == "current":
            if Catalogue(config.images_dir).current() is None:
                raise UsageError("--image current: the catalogue has no current image")
        elif image == "callback":
            from ..image.callback import default_cache, ensure_callback_image

            ensure_callback_image(config.images_dir, cache_dir=default_cache(), make_current=True)
        else:
            from ..image import build

            built = build.build_image(progress=lambda text, fraction: None)
            build.install_image(built, config.images_dir, name="node", make_current=True)

    state, added = rack.up(
        _parse_machines(machines, kind),
        disks=parse_disks(disks),
        memory=memory,
        seed=not no_seed,
        join=not no_join,
        image=ensure_image,
        progress=lambda text: click.echo(text, err=True),
    )
    click.echo(f"lab {state.id} up: {len(state.machines)} machines ({len(added)} new)")
    return 0


@lab.command("down")
@click.pass_obj
def lab_down(obj) -> int:
    """Remove every namespace, process, loop device and mount the lab made."""
    from ..lab.rack import Rack

    done = Rack(obj.config()).down(progress=lambda text: click.echo(text, err=True))
    if not any(done.values()):
        click.echo("no lab is up")
    return 0


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_obj
def lab_status(obj, as_json: bool) -> int:
    """The lab's machines: kind, power, BMC, address, node state, disks."""
    from .. import ui
    from ..lab.rack import Rack

    state, rows = Rack(obj.config()).status()
    if as_json:
        ui.print_json({"lab": state.id if state else None, "machines": rows})
        return 0
    if state is None:
        click.echo("no lab is up")
        return 0
    headers = ["machine", "kind", "power", "mac", "bmc", "ip", "node", "state", "disks"]
    ui.print_table(
        headers,
        [[r[h] if h != "disks" else " ".join(r["disks"]) for h in headers] for r in rows],
        title=f"lab {state.id}",
    )
    return 0


@lab.command("console")
@click.argument("machine")
@click.option("--lines", "-n", type=int, default=60, show_default=True, help="Last N lines.")
@click.pass_obj
def lab_console(obj, machine: str, lines: int) -> int:
    """Print the end of MACHINE's console (QEMU serial port, or the container's console)."""
    from ..errors import NotFoundError
    from ..lab.machines import console_log
    from ..lab.rack import Rack

    rack = Rack(obj.config())
    state = rack.store.load()
    found = state.machine(machine) if state else None
    if found is None:
        raise NotFoundError(f"no lab machine {machine!r}")
    path = console_log(rack.dir, found)
    if path is None:
        raise UsageError(f"{found.name} is a {found.kind} machine: it has no console")
    if not path.exists():
        click.echo(f"({found.name} has not been powered on yet)")
        return 0
    text = path.read_text(errors="replace").splitlines()
    click.echo("\n".join(text[-lines:]))
    return 0


@lab.command(
    "seed",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_obj
def lab_seed(obj, args: tuple[str, ...]) -> int:
    """Run `metalseed ARGS` as the lab's seed: in its namespace, with its config.

    e.g. `metalseed lab seed cluster status`, `metalseed lab seed power off NODE`.
    """
    import os
    import sys

    from ..lab.rack import Rack

    rack = Rack(obj.config())
    state = rack.store.load()
    if state is None:
        raise UsageError("no lab is up")
    argv = ["ip", "netns", "exec", state.ns("seed"), sys.executable, "-m", "bootstrap",
            "--config", str(rack.dir / "seed.toml"), *args]  # fmt: skip
    os.execvp(argv[0], argv)
    return 0  # not reached

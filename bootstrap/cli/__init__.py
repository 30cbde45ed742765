"""The ``metalseed`` command: click commands only.

Each command parses its arguments, builds the one Config (file < env <
flags), calls into ``actions`` (or the lab), prints, and returns an exit code.
Errors from the metalseed tree become ``metalseed: error: ...`` on stderr and
the exit code their class carries.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from .. import actions, ui
from .. import config as configmod
from ..errors import MetalseedError
from ..states import NodeState

log = logging.getLogger("metalseed")


class Ctx:
    def __init__(self, config_file: Path | None, flags: dict) -> None:
        self.config_file = config_file
        self.flags = flags

    def config(self, **more) -> configmod.Config:
        config = configmod.load(self.config_file, flags={**self.flags, **more})
        logging.getLogger().setLevel(config.log_level.upper())
        return config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pyghmi and asyncio chatter is not the operator's business at INFO
    logging.getLogger("pyghmi").setLevel(logging.WARNING)
    # sushy warns of every refused login and connection retry: discovery expects those
    logging.getLogger("sushy").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    envvar=None,
    help="Config file (default /etc/metalseed/metalseed.toml or $METALSEED_CONFIG).",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="State directory (default /var/lib/metalseed or $METALSEED_STATE_DIR).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Log level for stderr (default info).",
)
@click.pass_context
def cli(
    ctx: click.Context, config_file: Path | None, state_dir: Path | None, log_level: str | None
) -> None:
    """metalseed: find machines over IPMI, netboot them, join them into Ceph."""
    ctx.obj = Ctx(config_file, {"state_dir": state_dir, "log_level": log_level})
    _setup_logging(log_level or "info")


# -- nodes and events ---------------------------------------------------------------


@cli.group()
def nodes() -> None:
    """Read the nodes metalseed knows."""


@nodes.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in NodeState]),
    help="Only nodes in this state (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def nodes_list(obj: Ctx, states: tuple[str, ...], as_json: bool) -> int:
    store = actions.open_store(obj.config())
    found = store.list_nodes([NodeState(s) for s in states] if states else None)
    if as_json:
        ui.print_json([n.to_json() for n in found])
        return 0
    rows = []
    for n in found:
        cred = store.get_credential(n.id)
        user = cred.username if cred else ""
        power = n.facts.get("power", "")
        since = ui.ago(n.state_since)
        driver = n.bmc.driver if n.bmc else ""
        rows.append((n.id, n.state, driver, n.bmc, user, power, n.guid or "", since, n.reason))
    headers = ["node", "state", "driver", "bmc", "bmc user", "power", "guid", "since", "reason"]
    ui.print_table(headers, rows)
    return 0


@nodes.command("show")
@click.argument("node")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_obj
def nodes_show(obj: Ctx, node: str, as_json: bool) -> int:
    store = actions.open_store(obj.config())
    found = store.find_node(node)
    events = store.events(found.id, limit=20)
    inventory = store.get_inventory(found.id)
    if as_json:
        data = found.to_json()
        data["events"] = [e.to_json() for e in events]
        cred = store.get_credential(found.id)
        data["bmc_user"] = cred.username if cred else None
        data["inventory"] = inventory.to_json() if inventory else None
        ui.print_json(data)
        return 0
    cred = store.get_credential(found.id)
    fields = [
        ("node", found.id),
        ("state", found.state),
        ("reason", found.reason),
        ("since", ui.ago(found.state_since)),
        ("guid", found.guid),
        ("driver", found.bmc.driver if found.bmc else "(none)"),
        ("bmc", found.bmc),
        ("bmc user", cred.username if cred else "(none)"),
    ]
    fields += [(k, v) for k, v in sorted(found.facts.items()) if k != "fru"]
    fields += [(f"fru {k}", v) for k, v in sorted(found.facts.get("fru", {}).items())]
    if inventory is not None:
        fields += _inventory_fields(inventory)
    ui.print_table(["field", "value"], fields)
    if inventory is not None:
        _print_inventory(inventory.inventory)
    _print_events(events)
    return 0


def _size(n: int | None) -> str:
    if not n:
        return ""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _inventory_fields(found) -> list[tuple[str, object]]:
    """The enlisted inventory's one-line facts (NodeInventory)."""
    inv = found.inventory
    system = " ".join(v for v in (inv.system.vendor, inv.system.product) if v)
    return [
        ("enlisted", f"{ui.ago(found.received)} from {found.mac}, boot {found.boot_id}"),
        ("system", system or "(unknown)"),
        ("system uuid", inv.system.uuid or ""),
        ("system serial", inv.system.serial or ""),
        ("cpus", f"{inv.cpus.count} x {inv.cpus.model or '?'}"),
        ("memory", _size(inv.memory_bytes)),
    ]


def _print_inventory(inv) -> None:
    """Disks, NICs and LLDP neighbours of an ``Inventory`` as tables."""
    disks = [
        (
            d.name,
            _size(d.size_bytes),
            {True: "yes", False: "no", None: "unknown"}[d.empty],
            d.signature
            or (f"{d.partitions} partitions" if d.partitions else "")
            or (f"used by {', '.join(d.holders)}" if d.holders else ""),
            "yes" if d.rotational else "no",
            d.model or "",
            d.serial or "",
            d.wwn or "",
        )
        for d in inv.disks
    ]
    headers = ["disk", "size", "empty", "holds", "rotational", "model", "serial", "wwn"]
    ui.print_table(headers, disks)
    nics = [
        (n.name, n.mac, n.driver or "", n.link, f"{n.speed_mbps} Mb/s" if n.speed_mbps else "")
        for n in inv.nics
    ]
    ui.print_table(["nic", "mac", "driver", "link", "speed"], nics)
    if inv.lldp:
        rows = [
            (n.interface, n.chassis_name or n.chassis_id or "", n.port_id or "", n.management_ip)
            for n in inv.lldp
        ]
        ui.print_table(["nic", "switch", "port", "switch address"], rows)


def _print_events(events) -> None:
    rows = [
        (time.strftime("%H:%M:%S", time.localtime(e.ts)), e.node_id, e.kind, e.message)
        for e in events
    ]
    ui.print_table(["time", "node", "kind", "message"], rows)


@cli.command()
@click.argument("node", required=False)
@click.option("--limit", type=int, default=50, show_default=True, help="Newest N events.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def events(obj: Ctx, node: str | None, limit: int, as_json: bool) -> int:
    """The event log: every state change and action, for one node or all."""
    store = actions.open_store(obj.config())
    node_id = store.find_node(node).id if node else None
    found = store.events(node_id, limit=limit)
    if as_json:
        ui.print_json([e.to_json() for e in found])
    else:
        _print_events(found)
    return 0


# -- discovery and power --------------------------------------------------------------


@cli.command()
@click.argument("ranges", nargs=-1)
@click.option(
    "--credentials",
    type=click.Path(path_type=Path),
    default=None,
    help="File with username:password per line, tried in order.",
)
@click.option(
    "--rotate/--no-rotate",
    default=None,
    help="Create a dedicated metalseed BMC user with a random password.",
)
@click.option("--port", type=int, default=None, help="Default BMC UDP port (623).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per BMC.")
@click.pass_obj
def discover(
    obj: Ctx,
    ranges: tuple[str, ...],
    credentials: Path | None,
    rotate: bool | None,
    port: int | None,
    as_json: bool,
) -> int:
    """Sweep RANGEs for BMCs and enroll the machines behind them.

    RANGE is a CIDR (10.0.8.0/22), a range (10.0.8.10-40 or A-B) or an
    address, each optionally :PORT: IPMI BMCs. Prefixed with redfish://
    (HTTPS) or redfish+http://, the same forms (or a host name) name Redfish
    services; every System of each becomes a node.
    """
    config = obj.config(
        **{
            "discovery.credentials_file": credentials,
            "discovery.rotate": rotate,
            "bmc.port": port,
        }
    )
    store = actions.open_store(config)
    driver = actions.power_driver(config)
    with ui.progress("probing", total=1, enabled=not as_json) as bar:
        seen = {"found": 0, "enrolled": 0}

        def on_probe(probed: int, found: int, total: int) -> None:
            seen["found"] = found
            bar.update(probed, total, f"probing ({found} BMCs answered)")

        def on_enrolled(result) -> None:
            seen["enrolled"] += 1
            bar.update(seen["enrolled"], seen["found"], "logging in to BMCs")

        report = actions.run_discovery(
            config, store, driver, ranges, on_probe=on_probe, on_enrolled=on_enrolled
        )
    results = report.results
    if as_json:
        ui.print_json([r.to_json() for r in results])
    else:
        rows = [
            (
                r.node,
                r.bmc.driver,
                r.bmc,
                r.guid,
                r.state,
                r.power,
                r.username or "",
                "yes" if r.rotated else "",
                r.error or "",
            )
            for r in results
        ]
        headers = ["node", "driver", "bmc", "guid", "state", "power", "user", "rotated", "error"]
        ui.print_table(headers, rows)
        ok = sum(1 for r in results if not r.error)
        click.echo(
            f"probed {report.sweep.probed} addresses, {len(report.sweep.found)} BMCs answered, "
            f"{len(results)} machines, {ok} enrolled cleanly, in {report.seconds:.2f} s",
            err=True,
        )
    return 0 if all(not r.error for r in results) else 1


def _exit_code(outcomes) -> int:
    errors = [o.error for o in outcomes if o.error is not None]
    if not errors:
        return 0
    codes = {e.exit_code for e in errors}
    return codes.pop() if len(codes) == 1 else 1


def _print_outcomes(outcomes, as_json: bool, what: str) -> None:
    if as_json:
        ui.print_json([o.to_json() for o in outcomes])
        return
    rows = [
        (
            o.node,
            o.driver or "",
            o.bmc,
            o.power,
            "yes" if o.changed else "",
            f"{o.seconds:.2f}" if o.seconds else "",
            str(o.error or ""),
        )
        for o in outcomes
    ]
    ui.print_table(["node", "driver", "bmc", "power", "changed", "seconds", "error"], rows)
    failed = sum(1 for o in outcomes if o.error)
    if failed:
        click.echo(f"{what}: {failed} of {len(outcomes)} nodes failed", err=True)


@cli.command()
@click.argument("action", type=click.Choice(["on", "off", "cycle", "status"]))
@click.argument("nodes", nargs=-1)
@click.option("--all", "all_nodes", is_flag=True, help="Every node with a BMC.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def power(obj: Ctx, action: str, nodes: tuple[str, ...], all_nodes: bool, as_json: bool) -> int:
    """Power NODEs on, off, cycle them, or read their power state."""
    config = obj.config()
    store = actions.open_store(config)
    targets = actions.resolve_nodes(store, nodes, all_nodes)
    with ui.progress(f"power {action}", total=len(targets), enabled=not as_json) as bar:
        outcomes = actions.power(
            store,
            actions.power_driver(config),
            targets,
            action,
            concurrency=config.bmc.concurrency,
            deadline=config.bmc.job_deadline,
            on_done=lambda _: bar.advance(),
        )
    _print_outcomes(outcomes, as_json, f"power {action}")
    return _exit_code(outcomes)


@cli.command("boot-device")
@click.argument("device", type=click.Choice(["pxe", "disk"]))
@click.argument("nodes", nargs=-1)
@click.option("--persistent", is_flag=True, help="For every boot, not only the next one.")
@click.option("--all", "all_nodes", is_flag=True, help="Every node with a BMC.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def boot_device(
    obj: Ctx, device: str, nodes: tuple[str, ...], persistent: bool, all_nodes: bool, as_json: bool
) -> int:
    """Set the boot device of NODEs (next boot, or every boot with --persistent)."""
    config = obj.config()
    store = actions.open_store(config)
    targets = actions.resolve_nodes(store, nodes, all_nodes)
    with ui.progress(f"boot device {device}", total=len(targets), enabled=not as_json) as bar:
        outcomes = actions.boot_device(
            store,
            actions.power_driver(config),
            targets,
            device,
            persistent,
            concurrency=config.bmc.concurrency,
            deadline=config.bmc.job_deadline,
            on_done=lambda _: bar.advance(),
        )
    _print_outcomes(outcomes, as_json, f"boot device {device}")
    return _exit_code(outcomes)


# The command groups in the other modules register themselves on `cli`.
from . import boot as _boot  # noqa: E402,F401
from . import cluster as _cluster  # noqa: E402,F401
from . import lab as _lab  # noqa: E402,F401
from . import run as _run  # noqa: E402,F401


def main() -> None:
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MetalseedError as exc:
        click.echo(f"metalseed: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""`metalseed cluster status|join`: the Ceph cluster the join stage builds."""

from __future__ import annotations

import json

import click

from .. import actions
from ..errors import MetalseedError
from ..join import status as cluster_status
from ..join.stage import JoinStage, settings_from
from ..states import NodeState
from . import Ctx, cli


@cli.group()
def cluster() -> None:
    """The Ceph cluster: its status, and joining machines into it."""


@cluster.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys: health, mons, ...).")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for the monitors.")  # fmt: skip
@click.pass_obj
def status(obj: Ctx, as_json: bool, timeout: float) -> None:
    """Health, monitors, OSDs, raw and usable capacity, and what each machine gives."""
    config = obj.config()
    store = actions.open_store(config)
    doc = cluster_status.gather(store, timeout=timeout)
    click.echo(json.dumps(doc, indent=2) if as_json else cluster_status.render(doc))


@cluster.command("join")
@click.argument("nodes", nargs=-1)
@click.option("--enlisted", is_flag=True, help="Every enlisted node.")
@click.pass_obj
def join(obj: Ctx, nodes: tuple[str, ...], enlisted: bool) -> None:
    """Join NODES (enlisted, failed or active: a re-run is idempotent) into the cluster."""
    config = obj.config()
    store = actions.open_store(config)
    targets = [store.find_node(ref).id for ref in nodes]
    if enlisted:
        targets += [n.id for n in store.list_nodes([NodeState.ENLISTED]) if n.id not in targets]
    if not targets:
        raise click.UsageError("name the nodes to join, or pass --enlisted")

    def progress(host: str, what: str, task: str) -> None:
        if not host:
            click.echo(f"== {task}", err=True)
        elif what in ("changed", "failed", "unreachable"):
            click.echo(f"   {host}: {what}", err=True)

    stage = JoinStage(store, settings_from(config), progress=progress)
    result = stage.run(targets)
    for host in result.hosts.values():
        node = store.get_node(host.node)
        click.echo(f"{node.id}: {node.state}: {node.reason}")
    if not result.ok:
        raise MetalseedError(f"the join failed for {len(result.failed())} node(s)")


@cluster.command("watch")
@click.option("--interval", type=float, default=0.25, show_default=True,
              help="Seconds between looks at the OSD map.")  # fmt: skip
@click.option("--seconds", type=float, default=0.0, help="Stop after this long (0: never).")
@click.pass_obj
def watch(obj: Ctx, interval: float, seconds: float) -> None:
    """Print a JSON line each time an OSD comes up/in or goes down/out (with its host)."""
    import time

    from ..join.cluster import Admin

    config = obj.config()
    store = actions.open_store(config)
    end = time.monotonic() + seconds if seconds > 0 else float("inf")
    last: dict[str, dict] = {}
    with Admin(store) as admin:
        hosts: dict[int, str] = {}
        while time.monotonic() < end:
            dump = admin.command("osd dump")
            osds = {o["osd"]: o for o in dump.get("osds", [])}
            if set(osds) - set(hosts):
                tree = admin.command("osd tree")
                for item in tree.get("nodes", []):
                    if item.get("type") == "host":
                        hosts.update({c: item["name"] for c in item.get("children", [])})
            now = {
                str(i): {"up": bool(o["up"]), "in": bool(o["in"]), "host": hosts.get(i)}
                for i, o in osds.items()
            }
            if now != last:
                click.echo(json.dumps({"t": time.time(), "epoch": dump.get("epoch"), "osds": now}))
                last = now
            time.sleep(interval)

"""What the CLI commands do, without click: open the store, act on nodes, report.

Each function takes the typed config (or the objects built from it) and
returns plain results; ``cli.py`` only parses, calls in and prints.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from .config import Config
from .discovery import DiscoveryReport, Enroller, discover, load_credentials
from .discovery.ranges import parse_ranges
from .discovery.sweep import Progress
from .errors import IllegalTransition, MetalseedError, NotFoundError, UsageError
from .models import BmcAddress, Node
from .parallel import Outcome, run_all
from .power import Drivers
from .power.base import BmcTarget, PowerDriver
from .secretbox import SecretBox
from .states import TRANSITIONS, NodeState
from .store import StateStore
from .store.sqlite import SqliteStore

log = logging.getLogger(__name__)


def open_store(config: Config) -> SqliteStore:
    return SqliteStore(config.db_path, SecretBox(config.key_path))


def power_driver(config: Config) -> Drivers:
    """The power drivers: each node's own (IPMI or Redfish) is chosen at every call."""
    return Drivers(config.bmc)


def resolve_nodes(store: StateStore, refs: Sequence[str], all_nodes: bool) -> list[Node]:
    if all_nodes and refs:
        raise UsageError("give node names or --all, not both")
    if all_nodes:
        nodes = [n for n in store.list_nodes() if n.state != NodeState.RETIRED and n.bmc]
        if not nodes:
            raise NotFoundError("no nodes with a BMC yet; run `metalseed discover` first")
        return nodes
    if not refs:
        raise UsageError("name at least one node, or give --all")
    return [store.find_node(ref) for ref in dict.fromkeys(refs)]


def bmc_target(store: StateStore, node: Node) -> BmcTarget:
    if node.bmc is None:
        raise NotFoundError("no BMC address known", node=node.id)
    cred = store.get_credential(node.id)
    if cred is None:
        raise NotFoundError("no working BMC login recorded; run `metalseed discover`", node=node.id)
    return BmcTarget(node.bmc, cred, node=node.id)


@dataclasses.dataclass(frozen=True)
class NodeOutcome:
    node: str
    bmc: str | None
    power: str = "unknown"
    changed: bool = False
    seconds: float = 0.0
    error: MetalseedError | None = None
    driver: str | None = None

    @classmethod
    def of(cls, node: Node, **kwargs) -> NodeOutcome:
        bmc = node.bmc
        return cls(node.id, str(bmc) if bmc else None, driver=bmc.driver if bmc else None, **kwargs)

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "bmc": self.bmc,
            "driver": self.driver,
            "power": self.power,
            "changed": self.changed,
            "seconds": round(self.seconds, 3),
            "error": str(self.error) if self.error else None,
        }


def _fail_node(store: StateStore, node: Node, reason: str) -> None:
    current = store.get_node(node.id).state
    if NodeState.FAILED in TRANSITIONS[current]:
        try:
            store.transition(node.id, NodeState.FAILED, reason)
            return
        except IllegalTransition:
            pass
    store.add_event(node.id, "power", reason)


def power(
    store: StateStore,
    driver: Drivers | PowerDriver,
    nodes: Sequence[Node],
    action: str,
    *,
    concurrency: int,
    on_done: Callable[[NodeOutcome], None] | None = None,
    deadline: float | None = None,
) -> list[NodeOutcome]:
    """Power ``action`` (on, off, cycle, status) on every node, concurrently.

    ``deadline``: seconds one node's action may take before it is reported failed.
    """

    def job(node: Node) -> NodeOutcome:
        try:
            target = bmc_target(store, node)
            if action == "status":
                state = driver.power_state(target)
                if node.facts.get("power") != state:  # a read that changes nothing writes nothing
                    store.update_node(node.id, facts={"power": state})
                return NodeOutcome.of(node, power=state)
            result = driver.set_power(target, action)
        except MetalseedError as exc:
            exc.node = None  # the outcome names the node already
            if action == "status":
                store.update_node(node.id, facts={"power": "unknown"})
                store.add_event(node.id, "power", f"power status failed: {exc}")
            else:
                _fail_node(store, node, f"power {action} failed: {exc}")
            return NodeOutcome.of(node, error=exc)
        store.update_node(node.id, facts={"power": result.power})
        message = (
            f"power {action}: now {result.power} after {result.seconds:.2f} s"
            if result.changed
            else f"power {action}: already {result.power}"
        )
        store.add_event(node.id, "power", message, {"action": action, "power": result.power})
        return NodeOutcome.of(
            node, power=result.power, changed=result.changed, seconds=result.seconds
        )

    return _each(job, nodes, concurrency, on_done, deadline)


def boot_device(
    store: StateStore,
    driver: Drivers | PowerDriver,
    nodes: Sequence[Node],
    device: str,
    persistent: bool,
    *,
    concurrency: int,
    on_done: Callable[[NodeOutcome], None] | None = None,
    deadline: float | None = None,
) -> list[NodeOutcome]:
    def job(node: Node) -> NodeOutcome:
        try:
            driver.set_boot_device(bmc_target(store, node), device, persistent)
        except MetalseedError as exc:
            exc.node = None
            store.add_event(node.id, "bootdev", f"boot device {device} failed: {exc}")
            return NodeOutcome.of(node, error=exc)
        scope = "every boot" if persistent else "next boot"
        store.update_node(node.id, facts={"bootdev": device, "bootdev_persistent": persistent})
        store.add_event(
            node.id,
            "bootdev",
            f"boot device {device} for {scope}",
            {"device": device, "persistent": persistent},
        )
        return NodeOutcome.of(
            node, power=str(store.get_node(node.id).facts.get("power", "unknown"))
        )

    return _each(job, nodes, concurrency, on_done, deadline)


def _each(job, nodes, concurrency, on_done, deadline=None) -> list[NodeOutcome]:
    def done(outcome: Outcome) -> None:
        if on_done and outcome.result is not None:
            on_done(outcome.result)

    outcomes = run_all(
        job,
        nodes,
        concurrency=concurrency,
        on_done=done,
        deadline=deadline,
        describe=lambda node: f"{node.id} (BMC {node.bmc})",
    )
    return [
        o.result if o.result is not None else NodeOutcome.of(o.item, error=o.error)
        for o in outcomes
    ]


def _already_enrolled(store: StateStore) -> Callable[[BmcAddress], bool]:
    """True for an endpoint with a node behind it that has a working login.

    A Redfish service counts as known once one of its Systems is: a periodic
    sweep does not log in to it again (a System added to a multi-System
    service is found by ``metalseed discover``).
    """
    settled = {NodeState.DISCOVERED, NodeState.RETIRED}
    services: dict[BmcAddress, list[Node]] = {}
    for node in store.list_nodes():
        if node.bmc is not None and node.bmc.path:
            services.setdefault(node.bmc.service, []).append(node)

    def usable(node: Node | None) -> bool:
        return (
            node is not None
            and node.state not in settled
            and store.get_credential(node.id) is not None
        )

    def known(address: BmcAddress) -> bool:
        if address.driver == "ipmi":
            return usable(store.node_by_bmc(address))
        return any(usable(n) for n in services.get(address.service, ()))

    return known


def run_discovery(
    config: Config,
    store: StateStore,
    driver: Drivers | PowerDriver,
    ranges: Sequence[str],
    *,
    on_probe: Progress | None = None,
    on_enrolled=None,
    only_new: bool = False,
) -> DiscoveryReport:
    """Sweep ``ranges`` and enroll what answers.

    ``only_new``: log in only to BMCs that are not already a node with a working
    login (the daemon's periodic sweeps: racked machines, not the whole rack again).
    """
    ranges = list(ranges) or list(config.discovery.ranges)
    if not ranges:
        raise UsageError("give at least one RANGE (or set discovery.ranges in the config)")
    targets = parse_ranges(ranges, config.bmc.port)
    if config.discovery.credentials_file is None:
        raise UsageError("give --credentials FILE (username:password per line)")
    candidates = load_credentials(config.discovery.credentials_file)
    enroller = Enroller(
        store,
        driver,
        candidates,
        rotate=config.discovery.rotate,
        rotate_username=config.discovery.rotate_username,
    )
    return discover(
        targets,
        enroller,
        probe_timeout=config.discovery.probe_timeout,
        probe_rounds=config.discovery.probe_rounds,
        probe_window=config.discovery.probe_window,
        concurrency=config.bmc.concurrency,
        deadline=config.bmc.job_deadline,
        skip=_already_enrolled(store) if only_new else None,
        on_probe=on_probe,
        on_enrolled=on_enrolled,
    )

"""The join stage: enlisted machines -> Ceph cluster members, through the roles in ``roles/``.

One run (``JoinStage.run``) takes a set of *targets* (enlisted nodes, or failed
or active ones an operator asks to join again):

1. places the cluster's daemons over every member (``placement.place``): the
   monitors already standing stay, new ones are added up to three; every empty
   data disk gets an OSD, and the disks a node's OSDs already sit on stay its;
2. makes the cluster's identity on the very first run (fsid and keys, kept
   encrypted in the store: ``cluster.py``);
3. moves the targets to ``joining`` and runs ``playbooks/site.yml`` with
   ansible-runner's Python API over SSH with the control plane's key, limited
   to the targets; the keys go to the play through a one-run Unix socket
   (``secretsock.py``), never through a file;
4. streams every task result into the node's event log and to ``progress``;
5. moves each target to ``active`` (with the OSDs it runs) or to ``failed``
   with the task, the host and the message in the reason.

Every step of the roles is idempotent, so a re-run after a failure (or of an
active node) only does what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConcurrentUpdate, IllegalTransition, MetalseedError
from ..models import Node
from ..states import NodeState
from ..store import StateStore
from . import cluster as ceph
from .inventory import Member, build, known_hosts
from .placement import MAX_MONS, Placement, place, pool_shape
from .secretsock import ENV as SECRET_ENV
from .secretsock import SecretSocket

log = logging.getLogger(__name__)

S = NodeState
REPO = Path(__file__).resolve().parents[2]
#: the states a node may be joined from
JOINABLE = frozenset({S.ENLISTED, S.FAILED, S.ACTIVE, S.JOINING})
#: cluster members: the nodes the inventory lists besides the targets
MEMBERS = frozenset({S.ACTIVE, S.JOINING})
JOIN_FAILED = "join failed"
BLUESTORE = "ceph_bluestore"  # the agent's signature of a disk with a bluestore label
CEPH_CONF_TEMPLATE = (
    REPO / "roles" / "node_base" / "templates" / "ceph.conf.j2"
)  # the start of a failed join's reason
SSH_ARGS = (
    "-o ControlMaster=auto -o ControlPersist=60s -o LogLevel=ERROR -o ConnectTimeout=10 "
    "-o ServerAliveInterval=5 -o ServerAliveCountMax=3"
)
KEEP_RUNS = 10  # ansible-runner directories kept under STATE/join/ (no keys in them)


class JoinError(MetalseedError):
    pass


@dataclasses.dataclass(frozen=True)
class JoinSettings:
    """What a join needs besides the store (config ``[join]``, the boot network)."""

    state_dir: Path
    public_network: str
    time_servers: tuple[str, ...] = ()
    mon_labels: tuple[str, ...] = ()
    racks: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ceph_options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    playbook_dir: Path = REPO / "playbooks"
    roles_dir: Path = REPO / "roles"
    ansible_cfg: Path = REPO / "ansible.cfg"
    timeout: float = 900.0
    forks: int = 50


@dataclasses.dataclass
class HostOutcome:
    node: str
    failed: str = ""  # "task 'X' on node-1: message"
    osds: list[int] = dataclasses.field(default_factory=list)
    changed: int = 0


@dataclasses.dataclass
class JoinResult:
    targets: list[str]
    status: str  # ansible-runner's: successful, failed, timeout, ...
    hosts: dict[str, HostOutcome]
    seconds: float
    run_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return all(not h.failed for h in self.hosts.values()) and self.status == "successful"

    def failed(self) -> list[HostOutcome]:
        return [h for h in self.hosts.values() if h.failed]


Progress = Callable[[str, str, str], None]  # (host or "", what happened, task)


def _enlist_order(node: Node) -> tuple[float, str]:
    return (float(node.facts.get("enlisted_at") or node.created), node.id)


class JoinStage:
    def __init__(
        self,
        store: StateStore,
        settings: JoinSettings,
        *,
        progress: Progress | None = None,
        ssh_key: Path | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._progress = progress or (lambda host, what, task: None)
        self._ssh_key = ssh_key or settings.state_dir / "ssh" / "id_ed25519"
        self._lock = threading.Lock()  # one join at a time per process

    # -- choosing -------------------------------------------------------------------

    def address_of(self, node_id: str) -> str | None:
        """The node's provisioning address: its DHCP lease, else where it enlisted from."""
        macs = {m["mac"] for m in self._store.macs(node_id)}
        inv = self._store.get_inventory(node_id)
        if inv is not None:
            macs.add(inv.mac)
        leases = [
            lease
            for lease in self._store.leases()
            if (lease.node_id == node_id or lease.mac in macs) and lease.state == "bound"
        ]
        if leases:
            return max(leases, key=lambda lease: lease.expires).ip
        for event in reversed(self._store.events(node_id, limit=200)):
            peer = event.data.get("peer") if event.kind == "state" else None
            if peer and event.data.get("to") == str(S.ENLISTED):
                return str(peer)
        return None

    def _plan(
        self, targets: Sequence[Node]
    ) -> tuple[list[Member], list[ceph.Mon], Placement, ceph.Identity]:
        known = {n.id: n for n in self._store.list_nodes(MEMBERS)}
        known.update({n.id: n for n in targets})
        ident = ceph.identity(self._store)
        standing = [m for m in (ident.mons if ident else ()) if m.name in known]
        order = sorted(known.values(), key=_enlist_order)
        # the monitors already standing come first, so placement keeps them
        order.sort(key=lambda n: 0 if any(m.name == n.id for m in standing) else 1)
        enlisted = []
        for node in order:
            inv = self._store.get_inventory(node.id)
            enlisted.append((node.id, inv.inventory.to_json() if inv else {}))
        placement = place(
            enlisted, mon_labels=self._settings.mon_labels, racks=self._settings.racks
        )
        addresses: dict[str, str] = {}
        for node in order:
            addr = self.address_of(node.id)
            if addr is None:
                raise JoinError(f"{node.id} has no known address on the provisioning network")
            addresses[node.id] = addr
        mons = list(standing)
        for name in placement.mons:
            if len(mons) >= MAX_MONS:
                break
            if all(m.name != name for m in mons):
                mons.append(ceph.Mon(name, addresses[name]))
        members = []
        for node in order:
            inv = self._store.get_inventory(node.id)
            disks = inv.inventory.to_json().get("disks", []) if inv else []
            # disks already carrying an OSD (of this cluster, the role checks) stay OSDs:
            # their names may differ from the last boot's
            labelled = [f"/dev/{d['name']}" for d in disks if d.get("signature") == BLUESTORE]
            new = [f"/dev/{o.disk}" for o in placement.osds_of(node.id)]
            keys = inv.inventory.ssh_host_keys if inv else ()
            devices = tuple(dict.fromkeys(labelled + new))
            members.append(Member(node.id, addresses[node.id], devices, tuple(keys)))
        # pool sizing counts hosts that have (or will have) OSDs
        hosts = [m.node for m in members if m.devices]
        size, min_size, domain = pool_shape(len(hosts), sum(len(m.devices) for m in members))
        placement = dataclasses.replace(
            placement, pool_size=size, pool_min_size=min_size, failure_domain=domain
        )
        ident = ceph.ensure_identity(self._store, self._settings.public_network, mons)
        return members, mons, placement, ident

    # -- running --------------------------------------------------------------------

    def run(self, node_ids: Sequence[str]) -> JoinResult:
        if not self._lock.acquire(blocking=False):
            raise JoinError("a join is already running")
        try:
            return self._run(node_ids)
        finally:
            self._lock.release()

    def _run(self, node_ids: Sequence[str]) -> JoinResult:
        start = time.monotonic()
        targets = [self._store.get_node(n) for n in dict.fromkeys(node_ids)]
        for node in targets:
            if node.state not in JOINABLE:
                raise JoinError(f"{node.id} is {node.state}: only enlisted, failed or active "
                                "nodes can join")  # fmt: skip
        if not targets:
            raise JoinError("nothing to join")
        members, mons, placement, ident = self._plan(targets)
        target_ids = [n.id for n in targets]
        for node in targets:
            roles = _roles_of(node.id, mons, members)
            self._move(node, S.JOINING, f"joining the cluster as {', '.join(roles) or 'client'}")
        run_dir = self._run_dir()
        (run_dir / "known_hosts").write_text(known_hosts(members))
        inventory = build(
            members,
            identity=ident,
            mons=mons,
            placement=placement,
            ssh_key=self._ssh_key,
            known_hosts_file=run_dir / "known_hosts",
            time_servers=self._settings.time_servers,
            ceph_options=self._settings.ceph_options,
        )
        outcome = {n: HostOutcome(n) for n in target_ids}
        try:
            status, stats = self._ansible(run_dir, inventory, target_ids, outcome)
        except Exception as exc:  # the runner itself broke: nobody may stay joining
            for node_id in target_ids:
                outcome[node_id].failed = outcome[node_id].failed or f"the join run broke: {exc}"
            status, stats = "error", {}
        for node_id, host in outcome.items():
            if not host.failed and status != "successful":
                if node_id in stats.get("dark", {}):
                    host.failed = f"{node_id} unreachable over SSH"
                elif node_id in stats.get("failures", {}):
                    host.failed = f"a task failed on {node_id}"
                elif status == "timeout":
                    host.failed = f"the join took longer than {self._settings.timeout:g} s"
                elif node_id not in stats.get("ok", {}):
                    host.failed = f"the play did not reach {node_id} (run {status})"
        result = JoinResult(target_ids, status, outcome, time.monotonic() - start, run_dir)
        self._finish(result, mons, members, inventory)
        return result

    def _move(self, node: Node, target: NodeState, reason: str, **data: Any) -> None:
        try:
            current = self._store.get_node(node.id).state
            self._store.transition(node.id, target, reason, expect=current, data=data)
        except (IllegalTransition, ConcurrentUpdate) as exc:
            log.warning("%s: could not move to %s: %s", node.id, target, exc)

    def _finish(
        self,
        result: JoinResult,
        mons: Sequence[ceph.Mon],
        members: Sequence[Member],
        inventory: Mapping[str, Any],
    ) -> None:
        confs = {host: render_conf(inventory, host) for host in result.hosts}
        devices = {m.node: list(m.devices) for m in members}
        boot_ids = {}
        for node_id in result.hosts:
            inv = self._store.get_inventory(node_id)
            boot_ids[node_id] = inv.boot_id if inv is not None else ""
        joined = {h.node for h in result.hosts.values() if not h.failed}
        mon_names = {m.name for m in mons}
        ident = ceph.identity(self._store)
        if ident is not None and ident.bootstrapped:
            # a monitor counts once its join went through (it reached quorum)
            standing = {m.name for m in ident.mons}
            ceph.record_mons(self._store, [m for m in mons if m.name in standing | joined])
        if joined & mon_names:
            ceph.mark_bootstrapped(self._store)  # a monitor of it reached quorum
        for host in result.hosts.values():
            node = self._store.get_node(host.node)
            if host.failed:
                self._move(node, S.FAILED, f"{JOIN_FAILED}: {host.failed}")
                continue
            self._store.update_node(
                host.node,
                facts={
                    "ceph_osd_devices": devices.get(host.node, []),
                    "ceph_osds": sorted(set(host.osds)),
                    "ceph_mon": host.node in mon_names,
                    "joined_at": time.time(),
                    "joined_boot": boot_ids.get(host.node, ""),
                    # what the agent writes at the node's next boot, to start its OSDs
                    "ceph_conf": confs.get(host.node, ""),
                },
            )
            roles = _roles_of(host.node, mons, members)
            osds = ", ".join(f"osd.{i}" for i in sorted(set(host.osds)))
            what = ", ".join(r for r in roles if r != "osd") or ""
            what = ", ".join(filter(None, [what, osds])) or "no daemons"
            self._move(node, S.ACTIVE, f"joined in {result.seconds:.1f} s: {what}",
                       osds=sorted(set(host.osds)))  # fmt: skip

    def _run_dir(self) -> Path:
        runs = self._settings.state_dir / "join"
        runs.mkdir(parents=True, exist_ok=True)
        os.chmod(runs, 0o700)
        run_dir = runs / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        run_dir.mkdir(mode=0o700)
        _prune(runs)
        return run_dir

    def _ansible(
        self,
        run_dir: Path,
        inventory: Mapping[str, Any],
        targets: Sequence[str],
        outcome: dict[str, HostOutcome],
    ) -> tuple[str, Mapping[str, Any]]:
        import ansible_runner

        settings = self._settings
        secrets = {name: (lambda name=name: ceph.secret(self._store, name)) for name in ceph.KEYS}
        handler = _EventHandler(self._store, outcome, self._progress)
        with SecretSocket(secrets) as socket_path:
            envvars = {
                SECRET_ENV: str(socket_path),
                "ANSIBLE_CONFIG": str(settings.ansible_cfg),
                "ANSIBLE_ROLES_PATH": str(settings.roles_dir),
                "ANSIBLE_FORKS": str(settings.forks),
                "ANSIBLE_NOCOLOR": "1",
                # SSH masters of this run only: a master left from an earlier run may
                # point at a machine (or a lab namespace) that is gone, and hang. In the
                # socket's short private directory: a socket path has at most 107 bytes
                "ANSIBLE_SSH_CONTROL_PATH_DIR": str(socket_path.parent / "cp"),
                # host keys are checked (per host, ansible_ssh_common_args): none of
                # ansible.cfg's hand-run defaults that turn checking off
                "ANSIBLE_HOST_KEY_CHECKING": "True",
                "ANSIBLE_SSH_ARGS": SSH_ARGS,
                # ansible-playbook from the same environment as this Python
                "PATH": os.pathsep.join(
                    [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
                ),
            }
            runner = ansible_runner.run(
                private_data_dir=str(run_dir),
                project_dir=str(settings.playbook_dir),
                playbook="site.yml",
                inventory=dict(inventory),
                envvars=envvars,
                limit=",".join(targets),
                event_handler=handler,
                quiet=True,
                timeout=int(settings.timeout),
                suppress_env_files=True,
            )
        stats = runner.stats or {}
        log.info("join of %s: %s (rc %s)", ", ".join(targets), runner.status, runner.rc)
        if runner.status != "successful" and not stats:  # it never got to the hosts
            tail = _stdout_tail(run_dir)
            for host in outcome.values():
                host.failed = host.failed or f"ansible-playbook failed (rc {runner.rc}): {tail}"
        return str(runner.status), stats


def render_conf(inventory: Mapping[str, Any], host: str) -> str:
    """The ceph.conf the node_base role writes on ``host``, from the same template."""
    import jinja2

    env = jinja2.Environment(  # Ansible's template settings
        undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True
    )
    template = env.from_string(CEPH_CONF_TEMPLATE.read_text())
    top = inventory["all"]
    variables = {
        "ceph_cluster": "ceph",
        "ceph_crush_rack": "",
        "ceph_options": {},
        **{k: v for k, v in top["vars"].items() if not str(v).startswith("{{")},
        **top["hosts"].get(host, {}),
        "node_base_hostname": host,
        "ansible_managed": "written by the metalseed seed (node_base role's template)",
    }
    return template.render(variables)


def _roles_of(node: str, mons: Sequence[ceph.Mon], members: Sequence[Member]) -> list[str]:
    roles = ["mon", "mgr"] if any(m.name == node for m in mons) else []
    if any(m.node == node and m.devices for m in members):
        roles.append("osd")
    return roles


def _stdout_tail(run_dir: Path) -> str:
    lines: list[str] = []
    for path in run_dir.glob("artifacts/*/stdout"):
        lines += [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:300]


def _prune(runs: Path) -> None:
    old = sorted(p for p in runs.iterdir() if p.is_dir())[:-KEEP_RUNS]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


class _EventHandler:
    """ansible-runner events -> node events, failures and progress."""

    def __init__(
        self, store: StateStore, outcome: dict[str, HostOutcome], progress: Progress
    ) -> None:
        self._store = store
        self._outcome = outcome
        self._progress = progress

    def __call__(self, event: Mapping[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host") or ""
        task = str(data.get("task") or "")
        role = data.get("role") or ""
        label = f"{role}: {task}" if role else task
        if kind == "playbook_on_task_start":
            self._progress("", "task", label)
        elif kind in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable",
                      "runner_on_skipped"):  # fmt: skip
            res = data.get("res") or {}
            self._host_result(kind, host, label, res, bool(data.get("ignore_errors")))
        return True  # keep ansible-runner's own artifact of the event

    def _host_result(
        self, kind: str, host: str, label: str, res: Mapping[str, Any], ignored: bool
    ) -> None:
        out = self._outcome.get(host)
        for item in [res, *(res.get("results") or [])]:
            for line in item.get("stdout_lines") or []:
                if isinstance(line, str) and line.startswith("osd ") and line[4:].isdigit():
                    if out is not None:
                        out.osds.append(int(line[4:]))
        what = kind.removeprefix("runner_on_")
        if what == "ok" and res.get("changed"):
            what = "changed"
            if out is not None:
                out.changed += 1
        message = ""
        if what in ("failed", "unreachable") and not ignored:
            message = _message(res)
            if out is not None and not out.failed:
                out.failed = f"task '{label}' on {host}: {message}"
        self._progress(host, what, label)
        if out is not None and what != "skipped":
            text = f"{label}: {what}" + (f": {message}" if message else "")
            try:
                self._store.add_event(host, f"join.{what}", text, {"task": label})
            except MetalseedError as exc:
                log.warning("join: event for %s not recorded: %s", host, exc)


def _message(res: Mapping[str, Any]) -> str:
    """A failed result's message, short; ``no_log`` results say only that they are hidden."""
    if res.get("censored"):
        return "output hidden (no_log: the task handles keys)"
    parts = [str(res.get("msg") or "")]
    stderr = str(res.get("stderr") or "").strip()
    if stderr:
        parts.append(stderr.splitlines()[-1])
    for item in res.get("results") or []:
        if item.get("failed"):
            parts.append(_message(item))
            break
    text = "; ".join(p for p in parts if p)
    return text[:300] or "failed"


def settings_from(config: Any, network: str = "", seed_address: str = "") -> JoinSettings:
    """JoinSettings from the Config, and the provisioning network the seed serves.

    ``network``/``seed_address`` come from the running boot services; a CLI next to
    a running seed finds them in ``STATE/serve.json``.
    """
    if not network or not seed_address:
        info = config.state_dir / "serve.json"
        try:
            served = json.loads(info.read_text())
            network = network or served.get("network", "")
            seed_address = seed_address or served.get("address", "")
        except (OSError, ValueError):
            pass
    join = config.join
    public = join.public_network or network
    if not public:
        raise JoinError(
            "the Ceph public network is unknown: set join.public_network, or run the "
            "join next to a running seed (metalseed run)"
        )
    time_servers = tuple(config.boot.time_servers) or ((seed_address,) if seed_address else ())
    return JoinSettings(
        state_dir=config.state_dir,
        public_network=public,
        time_servers=time_servers,
        mon_labels=tuple(join.mon_labels),
        racks=ceph.settings_for(join.racks),
        ceph_options=ceph.settings_for(join.ceph_options),
        timeout=join.timeout,
        **({"roles_dir": join.roles_dir} if join.roles_dir else {}),
    )

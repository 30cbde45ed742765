"""The orchestrator: the one module that chains the stages for every node.

It runs inside ``metalseed run``, next to the boot services. Each pass
(``Orchestrator.tick``):

1. sweeps the configured BMC ranges when a sweep is due (discovery + enrollment,
   the same code as ``metalseed discover``);
2. asks the pure ``plan`` what each node needs, from its state, how long it has
   been there and its recorded netboot attempts;
3. carries the plan out through the power driver and the store.

A newly enrolled machine is set to PXE and powered on (cycled if it was on)
and moved to ``booting`` in the same step; from there the boot services and
the enlist endpoint carry it to ``enlisted``. A machine that does not get
there within ``run.boot_timeout`` is moved to ``failed`` with the reason, and
after ``run.retry_delay`` netbooted again, up to ``run.boot_attempts`` in all.
Every decision is an event on the node. The state lives in the store, so a
restarted daemon resumes exactly where it stopped: the attempt count and the
time of the last attempt are node facts.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..actions import bmc_target
from ..config import Config
from ..errors import ConcurrentUpdate, IllegalTransition, MetalseedError
from ..models import Node
from ..parallel import run_all
from ..power import Drivers
from ..power.base import PowerDriver
from ..states import NodeState
from ..store import StateStore

log = logging.getLogger(__name__)

S = NodeState
ATTEMPTS = "netboot_attempts"  # node fact: netboots started by the orchestrator
LAST_ATTEMPT = "netboot_at"  # node fact: wall time of the last one
#: a failed reason that says the orchestrator gave up on the boot (so it may retry)
BOOT_TIMEOUT_REASON = "no enlist within"


class Step(enum.StrEnum):
    NETBOOT = "netboot"  # set PXE, power on (or cycle), -> booting
    TIME_OUT = "time-out"  # booting for too long -> failed
    GIVE_UP = "give-up"  # failed and out of attempts: say so once


@dataclasses.dataclass(frozen=True)
class Decision:
    node_id: str
    step: Step
    reason: str


@dataclasses.dataclass(frozen=True)
class Policy:
    auto_boot: bool = True
    boot_attempts: int = 3
    boot_timeout: float = 900.0
    retry_delay: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        run = config.run
        return cls(run.auto_boot, run.boot_attempts, run.boot_timeout, run.retry_delay)


def plan(nodes: Iterable[Node], now: float, policy: Policy) -> list[Decision]:
    """What each node needs now. Pure: a function of the nodes, the time and the policy."""
    out: list[Decision] = []
    for node in nodes:
        attempts = int(node.facts.get(ATTEMPTS, 0) or 0)
        since = float(node.facts.get(LAST_ATTEMPT, node.state_since) or node.state_since)
        if node.state is S.ENROLLED and policy.auto_boot and node.bmc is not None:
            if attempts < policy.boot_attempts:
                out.append(Decision(node.id, Step.NETBOOT, "newly enrolled: netboot it"))
        elif node.state is S.BOOTING and attempts and now - since > policy.boot_timeout:
            out.append(
                Decision(
                    node.id,
                    Step.TIME_OUT,
                    f"{BOOT_TIMEOUT_REASON} {policy.boot_timeout:g} s of netboot attempt "
                    f"{attempts}",
                )
            )
        elif (
            node.state is S.FAILED
            and node.bmc is not None
            and (node.reason or "").startswith(BOOT_TIMEOUT_REASON)
        ):
            if attempts < policy.boot_attempts:
                if now - node.state_since >= policy.retry_delay:
                    out.append(Decision(node.id, Step.NETBOOT, f"retry after: {node.reason}"))
            elif not node.facts.get("netboot_gave_up"):
                out.append(
                    Decision(node.id, Step.GIVE_UP, f"gave up after {attempts} netboot attempts")
                )
    return out


def join_targets(
    nodes: Iterable[Node],
    boots: Mapping[str, tuple[str, float]],
    now: float,
    *,
    auto: bool,
    settle: float,
    resume: bool = False,
) -> list[str]:
    """The nodes a join should take now. Pure.

    * With ``auto``: every enlisted node.
    * Always: an active monitor host that booted again since it joined
      (``boots``: node -> (its latest boot id, when it enlisted with it)). A
      netbooted node is stateless: the roles mount its monitor's disk (or
      rebuild an in-memory store from the quorum) and start its monitor; its
      OSDs come back by themselves (their disks carry them).
    * Both wait until ``settle`` seconds passed since the newest of them
      enlisted, so machines powered on together join in one run (monitors
      coming back after a rack power loss need each other for a quorum).
    * With ``resume`` (the first pass of a daemon that started): nodes left
      ``joining`` by a seed that stopped mid-join; the roles are idempotent.
    """
    nodes = list(nodes)
    targets: list[str] = []
    if resume:
        targets += [n.id for n in nodes if n.state is S.JOINING]
    waiting: list[tuple[float, str]] = []
    if auto:
        waiting += [(n.state_since, n.id) for n in nodes if n.state is S.ENLISTED]
    for node in nodes:
        joined_boot = node.facts.get("joined_boot")
        boot = boots.get(node.id)
        if (
            node.state is S.ACTIVE
            and node.facts.get("ceph_mon")
            and joined_boot
            and boot is not None
            and boot[0] != joined_boot
        ):
            waiting.append((boot[1], node.id))
    if waiting and now - max(t for t, _ in waiting) >= settle:
        targets += [node_id for _, node_id in sorted(waiting)]
    return targets


class Orchestrator:
    """Carries every node along its state machine. Blocking; run it on its own thread."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        driver: Drivers | PowerDriver,
        *,
        sweep: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.driver = driver
        self.policy = Policy.from_config(config)
        self._sweep = sweep
        self._clock = clock
        self._next_sweep = 0.0
        self._swept_once = False
        #: runs a join of the given nodes (``JoinStage.run``); None: no join stage
        self.joiner: Callable[[list[str]], object] | None = None
        self._join_thread: threading.Thread | None = None
        self._join_resumed = False  # joins a stopped seed left half-done are taken up once

    # -- one pass ------------------------------------------------------------------

    def tick(self) -> list[Decision]:
        now = self._clock()
        if self._sweep is not None and self._sweep_due(now):
            try:
                self._sweep()
            except MetalseedError as exc:
                log.error("BMC sweep failed: %s", exc)
            self._swept_once = True
            interval = self.config.run.sweep_interval
            self._next_sweep = now + interval if interval > 0 else float("inf")
        decisions = plan(self.store.list_nodes(), self._clock(), self.policy)
        netboots = [d for d in decisions if d.step is Step.NETBOOT]
        for decision in decisions:
            if decision.step is Step.TIME_OUT:
                self._time_out(decision)
            elif decision.step is Step.GIVE_UP:
                self._give_up(decision)
        if netboots:
            outcomes = run_all(
                self._netboot,
                netboots,
                concurrency=self.config.bmc.concurrency,
                deadline=self.config.bmc.job_deadline,
                describe=lambda d: d.node_id,
            )
            for outcome in outcomes:
                if outcome.error is not None:  # abandoned past its deadline: say so
                    self.store.add_event(
                        outcome.item.node_id, "orchestrator", f"netboot: {outcome.error}"
                    )
                    log.warning("%s", outcome.error)
        self._maybe_join()
        return decisions

    def _maybe_join(self) -> None:
        if self.joiner is None or (self._join_thread and self._join_thread.is_alive()):
            return
        nodes = self.store.list_nodes([S.ENLISTED, S.ACTIVE, S.JOINING])
        boots = {}
        for node in nodes:
            if node.state is S.ACTIVE and node.facts.get("ceph_mon"):
                inv = self.store.get_inventory(node.id)
                if inv is not None:
                    boots[node.id] = (inv.boot_id, inv.received)
        join = self.config.join
        targets = join_targets(
            nodes, boots, self._clock(), auto=join.auto, settle=join.settle,
            resume=not self._join_resumed,
        )  # fmt: skip
        self._join_resumed = True
        if not targets:
            return
        joiner = self.joiner

        def work() -> None:
            try:
                joiner(targets)
            except Exception as exc:  # a join must never take the orchestrator down
                log.error("join of %s failed to run: %s", ", ".join(targets), exc)

        log.info("joining %s", ", ".join(targets))
        self._join_thread = threading.Thread(target=work, name="join", daemon=True)
        self._join_thread.start()

    def join_running(self) -> bool:
        return bool(self._join_thread and self._join_thread.is_alive())

    def _sweep_due(self, now: float) -> bool:
        return not self._swept_once or now >= self._next_sweep

    # -- the steps -----------------------------------------------------------------

    def _netboot(self, decision: Decision) -> None:
        node = self.store.get_node(decision.node_id)
        attempts = int(node.facts.get(ATTEMPTS, 0) or 0) + 1
        try:
            target = bmc_target(self.store, node)
            self.driver.set_boot_device(target, "pxe", False)
            state = self.driver.power_state(target)
            self.driver.set_power(target, "cycle" if state == "on" else "on")
        except MetalseedError as exc:
            exc.node = None
            self.store.add_event(node.id, "orchestrator", f"netboot attempt {attempts}: {exc}")
            log.warning("%s: netboot attempt %d failed: %s", node.id, attempts, exc)
            return  # the node keeps its state; the next pass tries again
        self.store.update_node(
            node.id, facts={ATTEMPTS: attempts, LAST_ATTEMPT: self._clock(), "power": "on"}
        )
        try:
            self.store.transition(
                node.id,
                S.BOOTING,
                f"netboot attempt {attempts}: PXE next boot, powered "
                + ("off and on" if state == "on" else "on"),
                expect=node.state,
                data={"attempt": attempts, "why": decision.reason},
            )
        except (IllegalTransition, ConcurrentUpdate):
            # the machine's first DHCP packet beat us to it: it is booting already
            self.store.add_event(node.id, "orchestrator", f"netboot attempt {attempts} started")

    def _time_out(self, decision: Decision) -> None:
        try:
            self.store.transition(decision.node_id, S.FAILED, decision.reason, expect=S.BOOTING)
        except (IllegalTransition, ConcurrentUpdate):
            pass  # it enlisted meanwhile

    def _give_up(self, decision: Decision) -> None:
        self.store.update_node(decision.node_id, facts={"netboot_gave_up": True})
        self.store.add_event(decision.node_id, "orchestrator", decision.reason)
        log.error("%s: %s", decision.node_id, decision.reason)

    # -- the loop ------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Pass after pass until ``stop`` is set; errors are logged, never fatal."""
        log.info(
            "orchestrator running: sweep every %g s, pass every %g s, auto-boot %s",
            self.config.run.sweep_interval,
            self.config.run.tick,
            "on" if self.policy.auto_boot else "off",
        )
        while not stop.is_set():
            try:
                self.tick()
            except MetalseedError as exc:
                log.error("orchestrator pass failed: %s", exc)
            stop.wait(self.config.run.tick)


def start_thread(orchestrator: Orchestrator) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(
        target=orchestrator.run, args=(stop,), name="orchestrator", daemon=True
    )
    thread.start()
    return thread, stop


def summary(decisions: Sequence[Decision]) -> str:
    return ", ".join(f"{d.node_id}: {d.step}" for d in decisions) or "nothing to do"

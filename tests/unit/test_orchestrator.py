"""The orchestrator: a pure plan from node states, carried out on fake BMCs and a real store."""

from __future__ import annotations

import dataclasses

from bootstrap.config import Config, RunConfig
from bootstrap.controlplane.orchestrator import (
    ATTEMPTS,
    LAST_ATTEMPT,
    Orchestrator,
    Policy,
    Step,
    plan,
)
from bootstrap.discovery.enroll import Enroller
from bootstrap.errors import BmcTimeout
from bootstrap.models import BmcAddress, Credential
from bootstrap.power.fake import FakeMachine, FakePowerDriver
from bootstrap.states import NodeState

A1, A2 = BmcAddress("10.0.0.1"), BmcAddress("10.0.0.2")
FACTORY = Credential("admin", "factory")
POLICY = Policy(auto_boot=True, boot_attempts=2, boot_timeout=100.0, retry_delay=10.0)


def enroll(store, machines):
    driver = FakePowerDriver(machines, attempts=1, sleep=lambda s: None)
    enroller = Enroller(store, driver, [FACTORY])
    return [store.get_node(enroller.enroll(a)[0].node) for a in machines]


def orchestrator(store, machines, clock, **run):
    config = Config(run=dataclasses.replace(RunConfig(), tick=0.01, **run))
    driver = FakePowerDriver(machines, attempts=1, sleep=lambda s: None, power_wait=0.0)
    return Orchestrator(config, store, driver, clock=clock)


# -- the pure plan ---------------------------------------------------------------------


def test_an_enrolled_node_is_netbooted_and_a_booting_one_is_left_alone(store, clock):
    machines = {A1: FakeMachine(password="factory"), A2: FakeMachine(password="factory")}
    n1, n2 = enroll(store, machines)
    store.transition(n2.id, NodeState.BOOTING, "dhcp")
    now = store.get_node(n2.id).state_since
    decisions = plan(store.list_nodes(), now, POLICY)
    assert [(d.node_id, d.step) for d in decisions] == [(n1.id, Step.NETBOOT)]


def test_nothing_is_netbooted_when_auto_boot_is_off(store, clock):
    enroll(store, {A1: FakeMachine(password="factory")})
    off = dataclasses.replace(POLICY, auto_boot=False)
    assert plan(store.list_nodes(), 0.0, off) == []


def test_a_boot_that_takes_too_long_times_out_then_is_retried_then_given_up(store, clock):
    [node] = enroll(store, {A1: FakeMachine(password="factory")})
    t0 = 5000.0
    store.update_node(node.id, facts={ATTEMPTS: 1, LAST_ATTEMPT: t0})
    store.transition(node.id, NodeState.BOOTING, "netboot attempt 1")
    assert plan(store.list_nodes(), t0 + 99, POLICY) == []
    [timeout] = plan(store.list_nodes(), t0 + 101, POLICY)
    assert timeout.step is Step.TIME_OUT and "no enlist within 100 s" in timeout.reason

    store.transition(node.id, NodeState.FAILED, timeout.reason)
    failed_at = store.get_node(node.id).state_since
    assert plan(store.list_nodes(), failed_at + 5, POLICY) == []  # retry_delay not over
    [retry] = plan(store.list_nodes(), failed_at + 11, POLICY)
    assert retry.step is Step.NETBOOT and retry.reason.startswith("retry after")

    store.update_node(node.id, facts={ATTEMPTS: 2})
    [give_up] = plan(store.list_nodes(), failed_at + 11, POLICY)
    assert give_up.step is Step.GIVE_UP and "2 netboot attempts" in give_up.reason
    store.update_node(node.id, facts={"netboot_gave_up": True})
    assert plan(store.list_nodes(), failed_at + 1000, POLICY) == []  # said once


def test_a_node_failed_for_another_reason_is_not_netbooted(store, clock):
    [node] = enroll(store, {A1: FakeMachine(password="factory")})
    store.transition(node.id, NodeState.FAILED, "power on failed: BMC refused the login")
    assert plan(store.list_nodes(), 1e12, POLICY) == []


# -- carried out -------------------------------------------------------------------------


def test_tick_sets_pxe_powers_on_and_moves_to_booting_with_an_event(store, clock):
    machine = FakeMachine(password="factory")
    [node] = enroll(store, {A1: machine})
    decisions = orchestrator(store, {A1: machine}, clock).tick()
    assert [d.step for d in decisions] == [Step.NETBOOT]
    assert machine.bootdev == "pxe" and not machine.persistent and machine.power == "on"
    after = store.get_node(node.id)
    assert after.state is NodeState.BOOTING
    assert after.facts[ATTEMPTS] == 1 and after.facts[LAST_ATTEMPT] == clock.now
    assert "netboot attempt 1: PXE next boot, powered on" in after.reason


def test_a_machine_that_is_already_on_is_power_cycled(store, clock):
    machine = FakeMachine(password="factory", power="on")
    enroll(store, {A1: machine})
    orchestrator(store, {A1: machine}, clock).tick()
    assert "power cycle" in machine.calls


def test_a_bmc_error_keeps_the_node_enrolled_for_the_next_pass(store, clock):
    machine = FakeMachine(password="factory")
    [node] = enroll(store, {A1: machine})
    machine.errors.append(BmcTimeout("BMC 10.0.0.1: no answer"))
    orch = orchestrator(store, {A1: machine}, clock)
    orch.tick()
    assert store.get_node(node.id).state is NodeState.ENROLLED
    assert any("netboot attempt 1" in e.message for e in store.events(node.id))
    orch.tick()  # the BMC answers again
    assert store.get_node(node.id).state is NodeState.BOOTING


def test_a_restarted_orchestrator_resumes_from_the_store(store, clock):
    machine = FakeMachine(password="factory")
    [node] = enroll(store, {A1: machine})
    orchestrator(store, {A1: machine}, clock, boot_timeout=50.0).tick()
    # a new daemon (new Orchestrator) after the boot timed out: it times the boot out
    clock.now += 60
    fresh = orchestrator(store, {A1: machine}, clock, boot_timeout=50.0, retry_delay=5.0)
    assert [d.step for d in fresh.tick()] == [Step.TIME_OUT]
    assert store.get_node(node.id).state is NodeState.FAILED
    clock.now += 6
    assert [d.step for d in fresh.tick()] == [Step.NETBOOT]
    assert store.get_node(node.id).facts[ATTEMPTS] == 2


def test_the_sweep_runs_at_start_and_on_its_interval(store, clock):
    calls = []
    start = clock.now
    config = Config(run=dataclasses.replace(RunConfig(), sweep_interval=30.0))
    orch = Orchestrator(
        config, store, FakePowerDriver({}), sweep=lambda: calls.append(clock.now), clock=clock
    )
    orch.tick()
    clock.now += 10
    orch.tick()
    clock.now += 25
    orch.tick()
    assert calls == [start, start + 35]


def test_a_periodic_sweep_logs_in_only_to_new_bmcs(store, tmp_path, monkeypatch):
    from bootstrap import actions
    from bootstrap.discovery.sweep import SweepResult

    machines = {A1: FakeMachine(password="factory"), A2: FakeMachine(password="factory")}
    enroll(store, {A1: machines[A1]})
    creds = tmp_path / "creds"
    creds.write_text("admin:factory\n")
    creds.chmod(0o600)
    config = Config(discovery=dataclasses.replace(Config().discovery, credentials_file=creds))
    driver = FakePowerDriver(machines, attempts=1, sleep=lambda s: None)
    swept = SweepResult(found={A1: None, A2: None}, probed=2, seconds=0.0, malformed=0)
    # the presence probe is UDP on the wire (tested in tests/functional); here it "found" both
    monkeypatch.setattr("bootstrap.discovery.sweep", lambda *a, **k: swept)
    machines[A1].calls.clear()
    report = actions.run_discovery(config, store, driver, ["10.0.0.1-2"], only_new=True)
    assert [r.bmc for r in report.results] == [A2]
    assert "login" not in machines[A1].calls  # the enrolled one was not logged into again


def test_ipmi_and_redfish_nodes_are_netbooted_alike_each_through_its_own_driver(store, clock):
    from bootstrap.power import Drivers

    redfish = BmcAddress.redfish("http", "10.0.1.1", 8000, "/redfish/v1/Systems/s1")
    ipmi_bmcs = {A1: FakeMachine(password="factory")}
    redfish_bmcs = {redfish: FakeMachine(password="factory", power="on")}
    enroll(store, ipmi_bmcs)
    enroll(store, redfish_bmcs)
    kw = {"attempts": 1, "sleep": lambda s: None, "power_wait": 0.0}
    drivers = Drivers(built={"ipmi": FakePowerDriver(ipmi_bmcs, **kw),
                             "redfish": FakePowerDriver(redfish_bmcs, **kw)})  # fmt: skip
    config = Config(run=dataclasses.replace(RunConfig(), tick=0.01))
    Orchestrator(config, store, drivers, clock=clock).tick()
    for machine in (*ipmi_bmcs.values(), *redfish_bmcs.values()):
        assert machine.bootdev == "pxe" and machine.power == "on"
    assert "power cycle" in redfish_bmcs[redfish].calls  # it was on: cycled
    assert "power on" in ipmi_bmcs[A1].calls
    assert {n.state for n in store.list_nodes()} == {NodeState.BOOTING}

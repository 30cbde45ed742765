"""Enrollment: idempotent identity, login order, crash-safe rotation (fake BMCs, real store)."""

import pytest

from bootstrap.discovery.enroll import Enroller
from bootstrap.errors import BmcTimeout
from bootstrap.models import BmcAddress, Credential, Secret
from bootstrap.power.base import BmcTarget
from bootstrap.power.fake import FakeMachine, FakePowerDriver
from bootstrap.secretbox import SecretBox
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore

A1, A2 = BmcAddress("10.0.0.1"), BmcAddress("10.0.0.2")
FACTORY = Credential("admin", "factory")


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"))
    yield s
    s.close()


def make(store, machines, candidates=(FACTORY,), **kwargs):
    drv = FakePowerDriver(machines, attempts=1, sleep=lambda s: None)
    passwords = iter(f"rotated-{i}" for i in range(100))
    return Enroller(
        store, drv, list(candidates), new_password=lambda: Secret(next(passwords)), **kwargs
    )


def test_first_enroll_creates_an_enrolled_node_with_its_login(store):
    machine = FakeMachine(password="factory")
    [result] = make(store, {A1: machine}).enroll(A1)
    assert result.error is None and result.state == "enrolled"
    node = store.find_node(machine.guid)
    assert node.state == NodeState.ENROLLED and node.bmc == A1
    assert store.get_credential(node.id) == FACTORY


def test_rerun_is_idempotent(store):
    machines = {A1: FakeMachine(password="factory")}
    make(store, machines).enroll(A1)
    events_before = len(store.events())
    make(store, machines).enroll(A1)
    assert len(store.list_nodes()) == 1
    kinds = [e.kind for e in store.events()[events_before:]]
    assert "state" not in kinds and "credentials" not in kinds


def test_changed_address_updates_not_duplicates(store):
    machine = FakeMachine(password="factory")
    make(store, {A1: machine}).enroll(A1)
    [result] = make(store, {A2: machine}).enroll(A2)
    [node] = store.list_nodes()
    assert node.bmc == A2 and result.node == node.id
    assert any("changed" in e.message for e in store.events(node.id))


def test_credentials_are_tried_in_order(store):
    machine = FakeMachine(username="root", password="calvin")
    [result] = make(
        store, {A1: machine}, candidates=[FACTORY, Credential("root", "calvin")]
    ).enroll(A1)
    assert result.username == "root"
    assert machine.calls.count("login") == 2


def test_no_working_login_records_a_discovered_node_with_the_reason(store):
    [result] = make(store, {A1: FakeMachine(password="other")}).enroll(A1)
    assert result.state == "discovered" and "refused every login" in result.error
    [node] = store.list_nodes()
    assert node.guid is None and node.bmc == A1 and "users: admin" in node.reason
    assert "factory" not in node.reason and "factory" not in result.error


def test_later_success_fills_in_the_placeholder(store):
    machine = FakeMachine(password="other")
    make(store, {A1: machine}).enroll(A1)
    make(store, {A1: machine}, candidates=[Credential("admin", "other")]).enroll(A1)
    [node] = store.list_nodes()
    assert node.guid == machine.guid and node.state == NodeState.ENROLLED


def test_unreachable_bmc_is_an_error_result_not_an_exception(store):
    [result] = make(store, {}).enroll(A1)
    assert isinstance(result.error, str) and "no answer" in result.error


def test_rotation_creates_a_dedicated_user_and_records_it(store):
    machine = FakeMachine(password="factory")
    [result] = make(store, {A1: machine}, rotate=True).enroll(A1)
    assert result.rotated and result.username == "metalseed"
    node = store.find_node(machine.guid)
    cred = store.get_credential(node.id)
    assert cred.username == "metalseed" and machine.users["metalseed"] == cred.password.reveal()
    assert store.get_pending_credential(node.id) is None
    assert machine.password == "factory"  # the factory login is never touched


def test_rotation_is_not_repeated(store):
    machines = {A1: FakeMachine(password="factory")}
    make(store, machines, rotate=True).enroll(A1)
    [again] = make(store, machines, rotate=True).enroll(A1)
    assert not again.rotated and again.username == "metalseed"


class Crash(BaseException):
    """Stands for the process dying: not an error anything catches."""


@pytest.mark.parametrize("step", ["ensure_user", "check_login", "set_credential"])
def test_a_crash_at_any_rotation_step_never_locks_us_out(store, step):
    machine = FakeMachine(password="factory")
    enroller = make(store, {A1: machine}, rotate=True)
    original = getattr(enroller.driver if step != "set_credential" else store, step)
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if step == "set_credential" and args[1].username != "metalseed":
            return original(*args, **kwargs)  # the first, factory login record
        if step in ("ensure_user", "check_login"):
            original(*args, **kwargs)  # the BMC did it; we die before recording
        raise Crash()

    holder = enroller.driver if step != "set_credential" else store
    setattr(holder, step, crashing)
    with pytest.raises(Crash):
        enroller.enroll(A1)
    setattr(holder, step, original)

    # After the "crash": whatever is stored must log in, and a re-run completes.
    node = store.find_node(machine.guid)
    logins = [
        c for c in (store.get_credential(node.id), store.get_pending_credential(node.id)) if c
    ]
    drv = FakePowerDriver({A1: machine}, attempts=1)
    assert any(_works(drv, c) for c in logins)
    [result] = make(store, {A1: machine}, rotate=True).enroll(A1)
    assert result.error is None and result.username == "metalseed"
    final = store.get_credential(node.id)
    assert _works(drv, final) and store.get_pending_credential(node.id) is None


def _works(drv, cred) -> bool:
    try:
        drv.check_login(BmcTarget(A1, cred))
        return True
    except Exception:
        return False


def test_failed_rotation_keeps_the_working_login(store):
    machine = FakeMachine(password="factory")
    enroller = make(store, {A1: machine}, rotate=True)
    real = enroller.driver._ensure_user

    def fail(conn, cred):
        raise BmcTimeout("BMC went away")

    enroller.driver._ensure_user = fail
    [result] = enroller.enroll(A1)
    assert "rotation failed" in result.error and result.username == "admin"
    node = store.find_node(machine.guid)
    assert store.get_credential(node.id) == FACTORY
    enroller.driver._ensure_user = real


def test_a_machine_that_enlisted_first_is_the_same_node_when_its_bmc_is_found(store):
    import uuid

    machine = FakeMachine(password="factory")
    # it netbooted before anyone swept its BMC; its firmware sent the UUID in the
    # other byte order, so the enlisted node carries that form
    swapped = str(uuid.UUID(bytes_le=uuid.UUID(machine.guid).bytes))
    assert swapped != machine.guid
    enlisted = store.create_node(guid=swapped, bmc=None, state=NodeState.BOOTING)
    [result] = make(store, {A1: machine}).enroll(A1)
    assert result.error is None and result.node == enlisted.id
    [node] = store.list_nodes()
    assert node.bmc == A1 and node.state == NodeState.BOOTING


# -- BMCs that stay silent for unknown users ------------------------------------------------


def test_a_silent_wrong_username_costs_one_quick_login_then_the_next_is_tried(store):
    machine = FakeMachine(username="root", password="calvin", silent_unknown_user=True)
    wrong, right = Credential("nobody", "x"), Credential("root", "calvin")
    [result] = make(store, {A1: machine}, candidates=[wrong, right]).enroll(A1)
    assert result.error is None and result.state == "enrolled" and result.username == "root"
    assert machine.calls.count("login") == 2  # one quick try of the silent one, then the right


def test_a_bmc_silent_to_every_login_is_retried_once_then_reported(store):
    machine = FakeMachine(username="root", password="calvin", silent_unknown_user=True)
    candidates = [Credential("nobody", "x"), Credential("guest", "y")]
    enroller = make(store, {A1: machine}, candidates=candidates)
    enroller.driver.attempts = 2
    [result] = enroller.enroll(A1)
    assert result.state == "discovered"
    assert "no answer to a login as: nobody, guest" in result.error
    # a quick pass (one login each), then a pass with the driver's retries (two each)
    assert machine.calls.count("login") == 2 + 2 * 2


# -- a Redfish-like service with several machines --------------------------------------------

SERVICE = BmcAddress.redfish("http", "10.0.1.1", 8000)


def system(n: int) -> BmcAddress:
    return BmcAddress.redfish("http", "10.0.1.1", 8000, f"/redfish/v1/Systems/s{n}")


def test_a_service_with_several_systems_makes_one_node_each(store):
    machines = {
        system(n): FakeMachine(password="factory", macs=(f"52:54:00:00:00:0{n}",))
        for n in (1, 2, 3)
    }
    results = make(store, machines).enroll(SERVICE)
    assert [r.state for r in results] == ["enrolled"] * 3
    nodes = {n.bmc: n for n in store.list_nodes()}
    assert set(nodes) == set(machines)
    for address, machine in machines.items():
        assert nodes[address].guid == machine.guid
        assert nodes[address].bmc.driver == "redfish"
        assert nodes[address].facts["macs"] == list(machine.macs)
    again = make(store, machines).enroll(SERVICE)  # idempotent
    assert len(store.list_nodes()) == 3 and [r.node for r in again] == [r.node for r in results]


def test_rotation_on_a_service_is_one_account_for_all_its_systems(store):
    shared_users: dict[str, str] = {}
    machines = {system(n): FakeMachine(password="factory", users=shared_users) for n in (1, 2)}
    results = make(store, machines, rotate=True).enroll(SERVICE)
    assert all(r.rotated and r.username == "metalseed" for r in results)
    assert list(shared_users) == ["metalseed"]
    creds = {store.get_credential(n.id) for n in store.list_nodes()}
    assert len(creds) == 1 and creds.pop().username == "metalseed"


def test_a_machine_driven_over_ipmi_is_not_moved_to_its_redfish_side(store):
    machine = FakeMachine(password="factory")
    make(store, {A1: machine}).enroll(A1)
    [result] = make(store, {system(1): machine}).enroll(SERVICE)
    [node] = store.list_nodes()
    assert node.bmc == A1 and store.get_credential(node.id) == FACTORY
    assert node.facts["other_bmcs"] == {"redfish": str(system(1))}
    assert "already driven over ipmi" in result.error


def test_a_system_that_disappears_fails_a_node_in_provisioning_and_comes_back(store):
    machines = {system(n): FakeMachine(password="factory") for n in (1, 2)}
    make(store, machines).enroll(SERVICE)
    gone = machines.pop(system(2))
    results = make(store, machines).enroll(SERVICE)
    node = store.find_node(gone.guid)
    assert node.state == NodeState.FAILED and "is gone from the service" in node.reason
    assert any(r.node == node.id and "gone" in (r.error or "") for r in results)
    machines[system(2)] = gone
    make(store, machines).enroll(SERVICE)
    node = store.find_node(gone.guid)
    assert node.state == NodeState.ENROLLED and node.facts["bmc_gone"] is False
    assert any("is back" in e.message for e in store.events(node.id))

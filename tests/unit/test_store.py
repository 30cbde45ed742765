"""The SQLite store: atomic transitions with events, idempotent identity, encrypted secrets."""

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from bootstrap.errors import ConcurrentUpdate, IllegalTransition, NotFoundError, SecretError
from bootstrap.models import BmcAddress, Credential, Secret
from bootstrap.secretbox import SecretBox
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore

S = NodeState
GUID = "4c4c4544-0042-3510-8052-b4c04f4d3232"


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"))
    yield s
    s.close()


def test_constructor_does_no_io(tmp_path):
    SqliteStore(tmp_path / "sub" / "state.db", SecretBox(tmp_path / "sub" / "secret.key"))
    assert not (tmp_path / "sub").exists()


def test_database_is_in_wal_mode(store, tmp_path):
    store.list_nodes()
    mode = sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_create_writes_node_and_first_event_together(store):
    node = store.create_node(guid=GUID, bmc=BmcAddress("10.0.0.5"), state=S.DISCOVERED)
    assert node.id == "node-4c4c4544"
    assert store.find_node(GUID).id == node.id
    assert store.find_node("10.0.0.5").id == node.id
    assert store.find_node("10.0.0.5:623").id == node.id
    [event] = store.events(node.id)
    assert event.kind == "state" and event.data["to"] == "discovered"


def test_same_guid_cannot_become_two_nodes(store):
    store.create_node(guid=GUID, bmc=BmcAddress("10.0.0.5"), state=S.DISCOVERED)
    with pytest.raises(ConcurrentUpdate):
        store.create_node(guid=GUID, bmc=BmcAddress("10.0.0.6"), state=S.DISCOVERED)
    assert len(store.list_nodes()) == 1


def test_a_bmc_address_answering_for_a_new_machine_moves_to_it(store):
    old = store.create_node(guid=GUID, bmc=BmcAddress("10.0.0.5"), state=S.DISCOVERED)
    new = store.create_node(
        guid="11111111-2222-4333-8444-555555555555", bmc=BmcAddress("10.0.0.5"), state=S.DISCOVERED
    )
    assert store.get_node(old.id).bmc is None
    assert store.get_node(new.id).bmc == BmcAddress("10.0.0.5")
    assert "another machine" in store.events(old.id)[-1].message


def test_transition_records_event_and_since(store):
    clock = iter([100.0, 200.0, 300.0, 400.0, 500.0])
    store._clock = lambda: next(clock)
    node = store.create_node(guid=GUID, bmc=None, state=S.DISCOVERED)
    node = store.transition(node.id, S.ENROLLED, "logged in")
    assert node.state == S.ENROLLED and node.reason == "logged in"
    assert node.state_since == 200.0 == store.events(node.id)[-1].ts
    event = store.events(node.id)[-1]
    assert event.data == {"from": "discovered", "to": "enrolled"}
    assert event.message == "discovered -> enrolled: logged in"


def test_illegal_transition_changes_nothing(store):
    node = store.create_node(guid=GUID, bmc=None, state=S.DISCOVERED)
    with pytest.raises(IllegalTransition):
        store.transition(node.id, S.ACTIVE)
    assert store.get_node(node.id).state == S.DISCOVERED
    assert len(store.events(node.id)) == 1


def test_compare_and_swap_on_expected_state(store):
    node = store.create_node(guid=GUID, bmc=None, state=S.DISCOVERED)
    with pytest.raises(ConcurrentUpdate):
        store.transition(node.id, S.ENROLLED, expect=S.BOOTING)
    store.transition(node.id, S.ENROLLED, expect=S.DISCOVERED)


def test_unknown_node_is_not_found(store):
    with pytest.raises(NotFoundError):
        store.find_node("node-nothere")
    with pytest.raises(NotFoundError):
        store.transition("node-nothere", S.ENROLLED)


def test_events_limit_returns_newest_in_order(store):
    node = store.create_node(guid=GUID, bmc=None, state=S.DISCOVERED)
    for i in range(5):
        store.add_event(node.id, "note", f"n{i}")
    assert [e.message for e in store.events(node.id, limit=2)] == ["n3", "n4"]


def test_credentials_are_encrypted_at_rest(store, tmp_path):
    node = store.create_node(guid=GUID, bmc=None, state=S.DISCOVERED)
    store.set_credential(node.id, Credential("admin", "Sup3r-secret-pw"))
    store.set_pending_credential(node.id, Credential("metalseed", "N3xt-secret-pw"))
    store.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    assert b"Sup3r-secret-pw" not in blob and b"N3xt-secret-pw" not in blob
    key = tmp_path / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert store.get_credential(node.id) == Credential("admin", "Sup3r-secret-pw")
    assert store.get_pending_credential(node.id).username == "metalseed"
    store.set_credential(node.id, Credential("metalseed", "N3xt-secret-pw"))
    assert store.get_pending_credential(node.id) is None  # promoting clears pending


def test_wrong_key_is_a_clear_error_not_garbage(store, tmp_path):
    node = store.create_node(guid=GUID, bmc=None, state=S.DISCOVERED)
    store.set_credential(node.id, Credential("admin", "pw"))
    store.close()
    (tmp_path / "secret.key").unlink()
    other = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"))
    with pytest.raises(SecretError, match="missing"):
        other.get_credential(node.id)


def test_world_readable_key_is_refused(tmp_path):
    box = SecretBox(tmp_path / "secret.key")
    box.encrypt(Secret("x"))
    (tmp_path / "secret.key").chmod(0o644)
    with pytest.raises(SecretError, match="readable by others"):
        SecretBox(tmp_path / "secret.key").decrypt(b"token")


def test_secret_never_shows_itself():
    secret = Secret("hunter2")
    cred = Credential("admin", "hunter2")
    for text in (repr(secret), str(secret), f"{secret}", repr(cred), str(cred)):
        assert "hunter2" not in text


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from bootstrap.secretbox import SecretBox
    from bootstrap.store.sqlite import SqliteStore
    from bootstrap.states import NodeState
    from pathlib import Path
    d = Path(sys.argv[1])
    store = SqliteStore(d / "state.db", SecretBox(d / "secret.key"))
    real_insert = store._insert_event
    def crash_after_update(*args):
        # the node row is already updated inside the transaction: die before the
        # event is written and before COMMIT, as a killed seed would
        os._exit(9)
    store._insert_event = crash_after_update
    store.transition(sys.argv[2], NodeState.ENROLLED, "about to crash")
""")


def test_crash_mid_transition_leaves_the_node_as_it_was(store, tmp_path):
    node = store.create_node(guid=GUID, bmc=None, state=S.DISCOVERED)
    store.close()
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), node.id],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.returncode == 9
    reopened = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"))
    assert reopened.get_node(node.id).state == S.DISCOVERED
    assert [e.data.get("to") for e in reopened.events(node.id)] == ["discovered"]
    # and the store is fully usable after the crash
    assert reopened.transition(node.id, S.ENROLLED).state == S.ENROLLED


def test_a_redfish_system_address_round_trips_and_finds_its_node(store):
    system = BmcAddress.parse("redfish+http://127.0.0.1:8000/redfish/v1/Systems/abc")
    other = BmcAddress.parse("redfish+http://127.0.0.1:8000/redfish/v1/Systems/def")
    node = store.create_node(guid=GUID, bmc=system, state=S.DISCOVERED)
    second = store.create_node(guid=None, bmc=other, state=S.DISCOVERED)
    assert store.get_node(node.id).bmc == system and system.driver == "redfish"
    assert store.node_by_bmc(system).id == node.id  # two Systems of one service: two nodes
    assert store.node_by_bmc(other).id == second.id
    assert store.find_node(str(system)).id == node.id
    assert node.to_json()["driver"] == "redfish"


def test_a_state_dir_from_before_redfish_is_migrated(tmp_path):
    db = tmp_path / "state.db"
    old = sqlite3.connect(db)
    old.executescript(
        """
        CREATE TABLE nodes (id TEXT PRIMARY KEY, guid TEXT UNIQUE, bmc_host TEXT,
            bmc_port INTEGER, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
            state_since REAL NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
            facts TEXT NOT NULL DEFAULT '{}');
        CREATE UNIQUE INDEX nodes_bmc ON nodes (bmc_host, bmc_port);
        INSERT INTO nodes VALUES ('node-1', NULL, '10.0.0.1', 623, 'discovered', '', 1, 1, 1, '{}');
        """
    )
    old.close()
    store = SqliteStore(db, SecretBox(tmp_path / "secret.key"))
    [node] = store.list_nodes()
    assert node.bmc == BmcAddress("10.0.0.1", 623) and node.bmc.driver == "ipmi"
    # the old (host, port) uniqueness is gone: two Systems behind one service may coexist
    for name in ("a", "b"):
        address = BmcAddress.redfish("https", "10.0.0.2", 443, f"/redfish/v1/Systems/{name}")
        store.create_node(guid=None, bmc=address, state=S.DISCOVERED)
    assert len(store.list_nodes()) == 3
    store.close()

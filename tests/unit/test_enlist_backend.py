"""Enlist through the backend and the SQLite store, with an injected clock.

Token rules end to end (replay, wrong MAC, expired, missing, the same boot
again), discovery of unknown machines, events, the stored inventory, the SSH
key pair, and the store's all-or-nothing ``apply_enlist``.
"""

from __future__ import annotations

import json
import sqlite3
import stat
import uuid

import pytest

from bootstrap.boot.backend import StoreBackend, token_hash
from bootstrap.boot.enlist import EnlistRequest, parse_request
from bootstrap.errors import ConcurrentUpdate
from bootstrap.models import BmcAddress, EnlistWrite, Inventory
from bootstrap.secretbox import SecretBox
from bootstrap.sshkeys import SeedKeyPair, SshKeyError
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore

S = NodeState
GUID = "4c4c4544-0042-3510-8052-b4c04f4d3232"
MAC, OTHER_MAC = "52:54:00:12:34:56", "52:54:00:00:00:99"
BOOT, OTHER_BOOT = str(uuid.uuid4()), str(uuid.uuid4())
PEER = "10.20.0.50"


@pytest.fixture
def backend(store, clock):
    return StoreBackend(store, token_ttl=60, discovery_ttl=30, clock=clock)


def request(
    *, mac=MAC, node=None, boot=BOOT, dmi: str | None = GUID, disks=1, serial="SN1"
) -> EnlistRequest:
    data = {
        "mac": mac,
        "node": node,
        "boot_id": boot,
        "inventory": {
            "system": {"uuid": dmi, "serial": serial},
            "cpus": {"count": 2, "model": "Xeon"},
            "memory": {"bytes": 2**32},
            "disks": [
                {"name": f"vd{chr(97 + i)}", "size_bytes": 2**30, "empty": True}
                for i in range(disks)
            ],
            "nics": [{"name": "eth0", "mac": mac, "link": "up"}],
        },
    }
    return parse_request(json.dumps(data).encode())


def enrolled(store, guid=GUID, host="127.0.0.9"):
    return store.create_node(guid=guid, bmc=BmcAddress(host), state=S.ENROLLED)


def state_events(store, node_id):
    return [e for e in store.events(node_id) if e.kind == "state"]


# -- a known node ---------------------------------------------------------------------------


def test_a_known_node_enlists_with_its_join_token(backend, store, tmp_path):
    node = enrolled(store)
    token = backend.mint_token(node.id, MAC).reveal()
    outcome = backend.enlist(token, request(node=node.id), PEER)
    assert (outcome.status, outcome.node, outcome.state, outcome.repeat) == (
        200,
        node.id,
        S.ENLISTED,
        False,
    )
    pub = (tmp_path / "ssh" / "id_ed25519.pub").read_text().strip()
    assert outcome.ssh_authorized_keys == (pub,) and pub.startswith("ssh-ed25519 ")
    assert store.get_node(node.id).state is S.ENLISTED
    moves = [(e.data["from"], e.data["to"]) for e in state_events(store, node.id)[1:]]
    assert moves == [("enrolled", "booting"), ("booting", "enlisted")]
    last = state_events(store, node.id)[-1]
    assert last.data["boot_id"] == BOOT and last.data["peer"] == PEER
    assert "2 CPUs, 4.0 GiB, 1 disks (1 empty)" in last.message
    stored = store.get_inventory(node.id)
    assert (stored.boot_id, stored.mac) == (BOOT, MAC)
    assert stored.inventory == request().inventory
    used = store.get_token(token_hash(token))
    assert (used.used_by, used.node_id) == (BOOT, node.id)
    assert backend.check_token(token) is None  # used up


def test_the_same_boot_again_gets_the_same_answer_and_changes_nothing(backend, store, clock):
    node = enrolled(store)
    token = backend.mint_token(node.id, MAC).reveal()
    first = backend.enlist(token, request(), PEER)
    events = store.events(node.id)
    clock.now += 3600  # even after the token's deadline: it was used in time
    again = backend.enlist(token, request(), PEER)
    assert again.repeat and (again.status, again.node, again.state) == (200, node.id, S.ENLISTED)
    assert again.ssh_authorized_keys == first.ssh_authorized_keys
    assert store.events(node.id) == events


def test_a_node_already_booting_takes_one_step(backend, store):
    node = enrolled(store)
    store.transition(node.id, S.BOOTING, "dhcp")
    backend.enlist(backend.mint_token(node.id, MAC).reveal(), request(), PEER)
    assert [e.data["to"] for e in state_events(store, node.id)][-2:] == ["booting", "enlisted"]


# -- refusals ----------------------------------------------------------------------------------


def refusals(store, node_id):
    return [e for e in store.events(node_id) if e.kind == "enlist.refused"]


def test_a_replay_by_another_boot_is_refused(backend, store):
    node = enrolled(store)
    token = backend.mint_token(node.id, MAC).reveal()
    backend.enlist(token, request(), PEER)
    before = store.get_node(node.id)
    outcome = backend.enlist(token, request(boot=OTHER_BOOT, disks=3), "10.20.0.66")
    assert (outcome.status, outcome.node) == (401, None) and "replay" in outcome.error
    assert store.get_node(node.id) == before
    assert len(store.get_inventory(node.id).inventory.disks) == 1
    [event] = refusals(store, node.id)
    assert event.data == {"mac": MAC, "peer": "10.20.0.66", "code": "replay", "status": 401}
    assert token not in json.dumps([e.to_json() for e in store.events()])


def test_a_token_for_another_mac_is_refused_on_both_nodes(backend, store):
    node = enrolled(store)
    other = enrolled(store, guid=str(uuid.uuid4()), host="127.0.0.10")
    store.bind_mac(OTHER_MAC, other.id)
    token = backend.mint_token(node.id, MAC).reveal()
    outcome = backend.enlist(token, request(mac=OTHER_MAC), PEER)
    assert outcome.status == 403
    assert [e.data["code"] for e in refusals(store, node.id)] == ["wrong_mac"]
    assert [e.data["code"] for e in refusals(store, other.id)] == ["wrong_mac"]
    assert store.get_node(node.id).state is S.ENROLLED
    assert store.get_token(token_hash(token)).used is None  # still good for its own MAC


def test_a_token_for_another_node_is_refused(backend, store):
    node = enrolled(store)
    token = backend.mint_token(node.id, MAC).reveal()
    assert backend.enlist(token, request(node="node-else"), PEER).status == 403


def test_an_expired_token_is_refused(backend, store, clock):
    node = enrolled(store)
    token = backend.mint_token(node.id, MAC).reveal()
    clock.now += 61
    outcome = backend.enlist(token, request(), PEER)
    assert outcome.status == 401 and "expired" in outcome.error
    assert [e.data["code"] for e in refusals(store, node.id)] == ["expired"]
    assert store.get_inventory(node.id) is None


def test_an_unknown_or_missing_token_is_put_on_the_macs_node(backend, store):
    node = enrolled(store)
    store.bind_mac(MAC, node.id)
    assert backend.enlist("made-up", request(), PEER).status == 401
    backend.refuse_enlist(MAC, "no token", PEER)
    backend.refuse_enlist(None, "no token", PEER)  # nothing to put it on: only logged
    assert [e.data["code"] for e in refusals(store, node.id)] == ["unknown_token", "no_token"]
    assert store.get_node(node.id).state is S.ENROLLED


def test_a_retired_node_may_not_enlist(backend, store):
    node = enrolled(store)
    token = backend.mint_token(node.id, MAC).reveal()
    store.transition(node.id, S.RETIRED, "gone")
    outcome = backend.enlist(token, request(), PEER)
    assert outcome.status == 403 and store.get_node(node.id).state is S.RETIRED
    assert [e.data["code"] for e in refusals(store, node.id)] == ["not_enlistable"]


def test_a_node_in_the_cluster_that_rebooted_reports_and_keeps_its_state(backend, store):
    node = enrolled(store)
    for target in (S.BOOTING, S.ENLISTED, S.JOINING, S.ACTIVE):
        store.transition(node.id, target, "test")
    outcome = backend.enlist(backend.mint_token(node.id, MAC).reveal(), request(), PEER)
    assert (outcome.status, outcome.state) == (200, S.ACTIVE)
    assert store.events(node.id)[-1].kind == "enlist"
    assert store.get_inventory(node.id) is not None


def test_a_member_that_rebooted_gets_its_ceph_conf_and_nobody_else_does(backend, store):
    member, other = enrolled(store), enrolled(store, guid=str(uuid.uuid4()), host="127.0.0.8")
    conf = "[global]\nfsid = 1\n"
    for target in (S.BOOTING, S.ENLISTED, S.JOINING, S.ACTIVE):
        store.transition(member.id, target, "test")
    store.update_node(member.id, facts={"ceph_conf": conf})
    outcome = backend.enlist(backend.mint_token(member.id, MAC).reveal(), request(), PEER)
    assert outcome.ceph_conf == conf
    store.update_node(other.id, facts={"ceph_conf": conf})  # not active: no member yet
    token = backend.mint_token(other.id, OTHER_MAC).reveal()
    outcome = backend.enlist(token, request(mac=OTHER_MAC, dmi=None, boot=OTHER_BOOT), PEER)
    assert outcome.status == 200 and outcome.ceph_conf is None


def test_join_tokens_are_not_discovery_tokens(backend, store):
    token = backend.mint_discovery_token(MAC).reveal()
    assert backend.check_token(token) is None  # the call-back takes join tokens only
    record = store.get_token(token_hash(token))
    assert (record.purpose, record.node_id, record.mac) == ("discovery", "", MAC)


# -- discovery: unknown machines ------------------------------------------------------------


def test_an_unknown_machine_becomes_a_new_enlisted_node(backend, store):
    new_guid = str(uuid.uuid4())
    token = backend.mint_discovery_token(MAC).reveal()
    outcome = backend.enlist(token, request(dmi=new_guid), PEER)
    assert outcome.status == 200 and outcome.state is S.ENLISTED
    node = store.get_node(outcome.node)
    assert node.id == "node-" + new_guid.replace("-", "")[:8]
    assert (node.guid, node.bmc) == (new_guid, None)
    assert store.mac_node(MAC) == node.id
    kinds = [(e.kind, e.data.get("to")) for e in store.events(node.id)]
    assert kinds == [("state", "booting"), ("boot.mac", None), ("state", "enlisted")]
    assert "netbooted" in store.events(node.id)[0].message
    assert store.get_inventory(node.id).inventory.system.uuid == new_guid
    again = backend.enlist(token, request(dmi=new_guid), PEER)  # the same boot's retry
    assert again.repeat and again.node == node.id and len(store.list_nodes()) == 1


@pytest.mark.parametrize("swap", [False, True])
def test_an_unknown_mac_of_a_known_machine_is_that_node(backend, store, swap):
    node = enrolled(store)
    dmi = str(uuid.UUID(bytes_le=uuid.UUID(GUID).bytes)) if swap else GUID
    token = backend.mint_discovery_token(MAC).reveal()
    outcome = backend.enlist(token, request(dmi=dmi), PEER)
    assert (outcome.status, outcome.node) == (200, node.id)
    assert [n.id for n in store.list_nodes()] == [node.id]
    assert store.get_node(node.id).state is S.ENLISTED and store.mac_node(MAC) == node.id


def test_a_machine_without_a_dmi_uuid_is_known_by_its_mac(backend, store):
    first = backend.enlist(backend.mint_discovery_token(MAC).reveal(), request(dmi=None), PEER)
    node = store.get_node(first.node)
    assert node.guid is None and node.id.startswith("node-")
    second = backend.enlist(
        backend.mint_discovery_token(MAC).reveal(), request(dmi=None, boot=OTHER_BOOT), PEER
    )
    assert second.node == node.id and len(store.list_nodes()) == 1
    assert store.get_inventory(node.id).boot_id == OTHER_BOOT


def test_a_discovery_token_expires_and_names_no_node(backend, store, clock):
    token = backend.mint_discovery_token(MAC).reveal()
    assert backend.enlist(token, request(node="node-x"), PEER).status == 403
    clock.now += 31
    assert backend.enlist(token, request(), PEER).status == 401
    assert store.list_nodes() == []


def test_a_uuid_mismatch_is_noted(backend, store):
    node = enrolled(store)
    backend.enlist(backend.mint_token(node.id, MAC).reveal(), request(dmi=str(uuid.uuid4())), PEER)
    assert state_events(store, node.id)[-1].data["uuid_mismatch"] is True


# -- the store's transaction ------------------------------------------------------------------


def write(store, token, **change) -> EnlistWrite:
    base = dict(
        token_hash=token_hash(token),
        boot_id=BOOT,
        mac=MAC,
        node_id=None,
        guid=None,
        expect=None,
        path=(S.ENLISTED,),
        inventory=Inventory(),
        reason="test",
    )
    base.update(change)
    return EnlistWrite(**base)


def test_apply_enlist_is_compare_and_swap(backend, store, clock):
    node = enrolled(store)
    token = backend.mint_token(node.id, MAC).reveal()
    with pytest.raises(ConcurrentUpdate):  # the plan was made when the node was booting
        store.apply_enlist(write(store, token, node_id=node.id, expect=S.BOOTING))
    plan = write(store, token, node_id=node.id, expect=S.ENROLLED, path=(S.BOOTING, S.ENLISTED))
    assert store.apply_enlist(plan)[1] is True
    assert store.apply_enlist(plan)[1] is False  # the same boot: nothing written
    with pytest.raises(ConcurrentUpdate):
        store.apply_enlist(write(store, token, node_id=node.id, boot_id=OTHER_BOOT))
    other = backend.mint_token(node.id, MAC).reveal()
    clock.now += 61
    with pytest.raises(ConcurrentUpdate):
        store.apply_enlist(write(store, other, node_id=node.id, expect=S.ENLISTED))


def test_an_illegal_path_writes_nothing(backend, store):
    node = enrolled(store)
    token = backend.mint_token(node.id, MAC).reveal()
    events = store.events()
    with pytest.raises(Exception, match="illegal transition"):
        store.apply_enlist(write(store, token, node_id=node.id, expect=S.ENROLLED))
    assert store.events() == events and store.get_inventory(node.id) is None
    assert store.get_token(token_hash(token)).used is None


def test_an_old_state_dir_gets_the_new_token_column(tmp_path):
    db = tmp_path / "state.db"
    old = sqlite3.connect(db)
    old.execute(
        "CREATE TABLE tokens (hash TEXT PRIMARY KEY, node_id TEXT NOT NULL, mac TEXT NOT NULL,"
        " purpose TEXT NOT NULL, expires REAL NOT NULL, created REAL NOT NULL, used REAL)"
    )
    old.execute("INSERT INTO tokens VALUES ('h', 'n', 'm', 'join', 1, 0, NULL)")
    old.commit()
    old.close()
    store = SqliteStore(db, SecretBox(tmp_path / "secret.key"))
    assert store.get_token("h").used_by is None
    assert store.use_token("h", by=BOOT) is None  # expired long ago
    store.close()


# -- the SSH key pair ----------------------------------------------------------------------


def test_the_key_pair_is_made_once_private_and_stays(tmp_path):
    pair = SeedKeyPair(tmp_path / "ssh")
    assert not (tmp_path / "ssh").exists()  # nothing until asked
    line = pair.public_line()
    private = tmp_path / "ssh" / "id_ed25519"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ssh").stat().st_mode) == 0o700
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert SeedKeyPair(tmp_path / "ssh").public_line() == line
    (tmp_path / "ssh" / "id_ed25519.pub").unlink()
    assert SeedKeyPair(tmp_path / "ssh").public_line() == line  # made again from the private


def test_a_private_key_others_can_read_is_refused(tmp_path):
    pair = SeedKeyPair(tmp_path / "ssh")
    pair.ensure()
    pair.private_path.chmod(0o644)
    with pytest.raises(SshKeyError, match="0644"):
        pair.public_line()


def test_the_private_key_is_never_in_an_answer_or_event(backend, store, tmp_path):
    node = enrolled(store)
    outcome = backend.enlist(backend.mint_token(node.id, MAC).reveal(), request(), PEER)
    private = (tmp_path / "ssh" / "id_ed25519").read_text()
    body = private.splitlines()[1]
    assert body not in repr(outcome)
    assert body not in json.dumps([e.to_json() for e in store.events()])


def test_no_key_pair_means_no_enlist_and_no_change(store, clock, tmp_path):
    (tmp_path / "ssh").write_text("not a directory")
    backend = StoreBackend(store, clock=clock)
    node = enrolled(store)
    with pytest.raises(SshKeyError):
        backend.enlist(backend.mint_token(node.id, MAC).reveal(), request(), PEER)
    assert store.get_node(node.id).state is S.ENROLLED

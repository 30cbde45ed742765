"""The boot backend: MAC <-> node by UUID, boot steps as events, one-time tokens."""

import uuid

import pytest

from bootstrap.boot.backend import (
    BootProfile,
    StoreBackend,
    normalise_mac,
    token_hash,
)
from bootstrap.errors import ConcurrentUpdate
from bootstrap.guid import uuid_candidates
from bootstrap.models import BmcAddress, Lease
from bootstrap.secretbox import SecretBox
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore

S = NodeState
GUID = "4c4c4544-0042-3510-8052-b4c04f4d3232"
MAC = "52:54:00:12:34:56"


@pytest.fixture
def backend(store, clock):
    return StoreBackend(store, token_ttl=60, clock=clock)


def enrolled(store, guid=GUID):
    return store.create_node(guid=guid, bmc=BmcAddress("127.0.0.9"), state=S.ENROLLED)


@pytest.mark.parametrize(
    "text",
    ["52-54-00-12-34-56", "52:54:00:12:34:56", "5254.0012.3456", "52:54:00:12:34:56".upper()],
)
def test_mac_spellings_normalise(text):
    assert normalise_mac(text) == MAC


@pytest.mark.parametrize("text", ["", "52:54:00:12:34", "zz:54:00:12:34:56:77"])
def test_bad_macs_are_refused(text):
    with pytest.raises(ValueError):
        normalise_mac(text)


def test_uuid_candidates_are_both_byte_orders():
    value = uuid.UUID(GUID)
    assert uuid_candidates(GUID) == (GUID, str(uuid.UUID(bytes_le=value.bytes)))


def test_unknown_mac_gets_the_enlist_profile_and_is_remembered(backend, store):
    machine = backend.identify(MAC, str(uuid.uuid4()))
    assert (machine.node_id, machine.profile) == (None, BootProfile.ENLIST)
    assert [m["mac"] for m in store.macs()] == [MAC]


@pytest.mark.parametrize("swap", [False, True])
def test_uuid_ties_the_mac_to_the_node_in_either_byte_order(backend, store, swap):
    node = enrolled(store)
    sent = str(uuid.UUID(bytes_le=uuid.UUID(GUID).bytes)) if swap else GUID
    machine = backend.identify(MAC.upper(), sent)
    assert (machine.node_id, machine.profile) == (node.id, BootProfile.PROVISION)
    # later requests without a UUID (TFTP, HTTP) still find the node
    assert backend.identify(MAC).node_id == node.id
    assert [e.kind for e in store.events(node.id)][-1] == "boot.mac"


def test_a_mac_seen_before_its_bmc_was_discovered_binds_later(backend, store):
    assert backend.identify(MAC, GUID).node_id is None
    node = enrolled(store)
    assert backend.identify(MAC, GUID).node_id == node.id


def test_first_boot_step_moves_an_enrolled_node_to_booting(backend, store):
    node = enrolled(store)
    backend.identify(MAC, GUID)
    backend.record(MAC, "dhcp.discover", "DHCPDISCOVER from PXE firmware", {"arch": "bios"})
    backend.record(MAC, "dhcp.offer", "offered 10.0.0.100", {"ip": "10.0.0.100"})
    after = store.get_node(node.id)
    assert after.state is S.BOOTING
    assert "dhcp.discover" in after.reason
    kinds = [(e.kind, e.data.get("mac")) for e in store.events(node.id)]
    assert kinds[-2:] == [("state", MAC), ("dhcp.offer", MAC)]


def test_retired_node_gets_the_retired_profile_and_stays_retired(backend, store):
    node = enrolled(store)
    store.transition(node.id, S.RETIRED, "decommissioned")
    assert backend.identify(MAC, GUID).profile is BootProfile.RETIRED
    backend.record(MAC, "dhcp.discover", "DHCPDISCOVER")
    assert store.get_node(node.id).state is S.RETIRED


def test_steps_of_unknown_machines_write_no_events(backend, store):
    backend.record(MAC, "dhcp.discover", "DHCPDISCOVER")
    assert store.events() == []


def test_tokens_are_stored_hashed_and_bound_to_mac_and_time(backend, store, clock):
    node = enrolled(store)
    token = backend.mint_token(node.id, MAC)
    clear = token.reveal()
    assert clear not in repr(token) and len(clear) >= 40
    record = store.get_token(token_hash(clear))
    assert (record.node_id, record.mac, record.used) == (node.id, MAC, None)
    assert backend.check_token(clear) == node.id
    assert backend.check_token(clear, MAC.upper()) == node.id
    assert backend.check_token(clear, "52:54:00:00:00:01") is None
    assert backend.check_token("not-" + clear) is None
    clock.now += 61
    assert backend.check_token(clear) is None


def test_a_token_is_used_once(backend, store):
    node = enrolled(store)
    clear = backend.mint_token(node.id, MAC).reveal()
    assert store.use_token(token_hash(clear)).node_id == node.id
    assert store.use_token(token_hash(clear)) is None
    assert backend.check_token(clear) is None


def test_leases_and_reservations_persist(store, tmp_path, clock):
    store.put_lease(Lease("10.0.0.100", MAC, "bound", clock.now + 3600, "n1", None))
    store.reserve(MAC, "10.0.0.100")
    with pytest.raises(ConcurrentUpdate):
        store.reserve("52:54:00:00:00:01", "10.0.0.100")
    store.close()
    again = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"))
    assert [(lease.ip, lease.state) for lease in again.leases()] == [("10.0.0.100", "bound")]
    assert again.reservations() == {MAC: "10.0.0.100"}
    again.delete_lease("10.0.0.100")
    assert again.leases() == []


def test_an_enlisted_node_goes_back_to_booting_only_when_its_firmware_dhcps_again(store, backend):
    node = store.create_node(guid=GUID, bmc=None, state=S.BOOTING)
    backend.identify(MAC, GUID)
    store.transition(node.id, S.ENLISTED, "enlisted")
    # late steps of the boot that enlisted it, and the OS's own DHCP client: still enlisted
    backend.record(MAC, "tftp.sent", "TFTP undionly.kpxe sent", {})
    backend.record(MAC, "http.file", "download vmlinuz", {})
    backend.record(MAC, "dhcp.discover", "DHCPDISCOVER (other)", {"client": "other"})
    assert store.get_node(node.id).state == S.ENLISTED
    # a new netboot: PXE firmware asks again
    backend.record(MAC, "dhcp.discover", "DHCPDISCOVER (pxe)", {"client": "pxe"})
    assert store.get_node(node.id).state == S.BOOTING

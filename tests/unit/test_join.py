"""The join stage's pure parts: keys, the cluster identity in the store, the inventory,
the secret socket, the seed's ceph.conf, the status arithmetic and when a join is due."""

from __future__ import annotations

import base64
import json
import sqlite3
import struct
import sys
from pathlib import Path

import pytest

from bootstrap.controlplane.orchestrator import join_targets
from bootstrap.join import cluster as ceph
from bootstrap.join.inventory import Member, build
from bootstrap.join.placement import place
from bootstrap.join.secretsock import SecretSocket
from bootstrap.join.stage import REPO, render_conf
from bootstrap.join.status import render, shape
from bootstrap.models import BmcAddress, Node, Secret
from bootstrap.states import NodeState

sys.path.insert(0, str(REPO / "playbooks" / "lookup_plugins"))


def test_a_new_key_is_a_cephx_aes_key():
    raw = base64.b64decode(ceph.new_key(now=1700000000.25).reveal())
    kind, sec, nsec, length = struct.unpack("<HIIH", raw[:12])
    assert (kind, sec, length, len(raw)) == (1, 1700000000, 16, 28)
    assert abs(nsec - 250_000_000) < 1000
    assert ceph.new_key().reveal() != ceph.new_key().reveal()


def test_the_identity_is_made_once_and_its_keys_are_only_stored_encrypted(store, tmp_path):
    mons = [ceph.Mon("node-a", "10.0.0.11")]
    first = ceph.ensure_identity(store, "10.0.0.0/24", mons)
    again = ceph.ensure_identity(store, "10.9.9.0/24", [ceph.Mon("node-z", "10.9.9.9")])
    assert again == first and first.mons == tuple(mons) and not first.bootstrapped
    keys = {name: ceph.secret(store, name).reveal() for name in ceph.KEYS}
    assert len(set(keys.values())) == 3
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        dump = "\n".join(conn.iterdump())
    assert first.fsid in dump
    for key in keys.values():
        assert key not in dump
    ceph.mark_bootstrapped(store)
    assert ceph.identity(store).bootstrapped


def test_an_identity_conf_names_every_monitor():
    ident = ceph.Identity("f" * 8, "10.0.0.0/24", (ceph.Mon("a", "10.0.0.1"),
                          ceph.Mon("b", "10.0.0.2")), True)  # fmt: skip
    assert (
        ident.mon_host()
        == "[v2:10.0.0.1:3300,v1:10.0.0.1:6789],[v2:10.0.0.2:3300,v1:10.0.0.2:6789]"
    )


def inventory_for(disks):
    return {"disks": [{"name": n, "size_bytes": 10 << 30, "empty": True} for n in disks]}


def make_inventory(hosts=("node-a", "node-b", "node-c")):
    placement = place([(h, inventory_for(["sdb"])) for h in hosts])
    ident = ceph.Identity("2f0e8d6a-0000-4000-8000-000000000001", "10.0.0.0/24", (), False)
    members = [Member(h, f"10.0.0.{11 + i}", ("/dev/sdb",)) for i, h in enumerate(hosts)]
    mons = [ceph.Mon(h, f"10.0.0.{11 + i}") for i, h in enumerate(hosts[:3])]
    return build(
        members,
        identity=ident,
        mons=mons,
        placement=placement,
        ssh_key=Path("/var/lib/metalseed/ssh/id_ed25519"),
        time_servers=["10.0.0.1"],
        ceph_options={"osd_memory_target": "896M"},
    )


def test_the_inventory_has_groups_and_only_lookups_where_keys_go():
    inv = make_inventory()
    top = inv["all"]
    assert set(top["children"]["mons"]["hosts"]) == {"node-a", "node-b", "node-c"}
    assert top["children"]["mgrs"] == top["children"]["mons"]
    assert top["hosts"]["node-b"] == {
        "ansible_host": "10.0.0.12",
        "ceph_crush_rack": "default",
        "ceph_osd_devices": ["/dev/sdb"],
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
    }
    assert top["vars"]["ceph_bootstrap"] is True and top["vars"]["ceph_pool_size"] == 3
    for var in ("ceph_mon_key", "ceph_admin_key", "ceph_bootstrap_osd_key"):
        assert top["vars"][var].startswith("{{ lookup('metalseed_secret', ")
    assert "AQ" not in json.dumps(inv)  # no cephx key in any form


def test_the_seed_renders_the_roles_ceph_conf():
    conf = render_conf(make_inventory(), "node-b")
    assert "fsid = 2f0e8d6a-0000-4000-8000-000000000001" in conf
    assert "mon_host = [v2:10.0.0.11:3300,v1:10.0.0.11:6789]," in conf
    assert "crush_location = root=default host=node-b" in conf  # no rack "default"
    assert "osd_memory_target = 896M" in conf
    assert "AQ" not in conf and "lookup" not in conf  # keys are never rendered


def test_the_secret_socket_answers_names_and_closes():
    import metalseed_secret as plugin

    calls = []

    def admin() -> Secret:
        calls.append(1)
        return Secret("AQ-secret")

    sock = SecretSocket({"admin_key": admin})
    with sock as path:
        assert path.stat().st_mode & 0o777 == 0o600
        assert plugin._ask(str(path), "admin_key") == "AQ-secret"
        with pytest.raises(Exception, match="no secret named"):
            plugin._ask(str(path), "mon_key")
    assert not path.exists() and not path.parent.exists()
    assert sock.served == ["admin_key"] and calls == [1]


def node(node_id, state, since, **facts):
    return Node(id=node_id, guid=None, bmc=None, state=state, state_since=since, facts=facts)


def test_enlisted_nodes_join_together_once_they_settle():
    nodes = [node("a", NodeState.ENLISTED, 100.0), node("b", NodeState.ENLISTED, 102.0)]
    assert join_targets(nodes, {}, 104.0, auto=True, settle=3.0) == []
    assert join_targets(nodes, {}, 105.0, auto=True, settle=3.0) == ["a", "b"]
    assert join_targets(nodes, {}, 500.0, auto=False, settle=3.0) == []


def test_a_monitor_host_that_booted_again_joins_again_but_an_osd_host_does_not():
    nodes = [
        node("mon", NodeState.ACTIVE, 1.0, ceph_mon=True, joined_boot="boot-1"),
        node("osd", NodeState.ACTIVE, 1.0, ceph_mon=False, joined_boot="boot-1"),
    ]
    assert join_targets(nodes, {"mon": ("boot-1", 2.0)}, 9.0, auto=True, settle=0) == []
    boots = {"mon": ("boot-2", 8.0), "osd": ("boot-2", 8.0)}
    assert join_targets(nodes, boots, 9.0, auto=False, settle=0) == ["mon"]
    # monitors powered on together are joined together (they need each other's quorum)
    assert join_targets(nodes, boots, 9.0, auto=False, settle=3.0) == []
    assert join_targets(nodes, boots, 11.0, auto=False, settle=3.0) == ["mon"]


CEPH_STATUS = {
    "health": {
        "status": "HEALTH_WARN",
        "checks": {"OSD_HOST_DOWN": {"summary": {"message": "1 host (1 osds) down"}}},
    },  # fmt: skip
    "quorum_names": ["a", "b", "c"],
    "monmap": {"num_mons": 3},
    "osdmap": {"num_osds": 4, "num_up_osds": 3, "num_in_osds": 4},
}
CEPH_DF = {
    "stats": {
        "total_bytes": 40 << 30,
        "total_used_raw_bytes": 1 << 30,
        "total_avail_bytes": 39 << 30,
    },  # fmt: skip
    "pools": [{"name": "rbd", "stats": {"stored": 8 << 20, "max_avail": 12 << 30}}],
}
CEPH_TREE = {
    "nodes": [
        {"id": -1, "name": "default", "type": "root", "children": [-2, -3]},
        {"id": -2, "name": "a", "type": "host", "children": [0]},
        {"id": -3, "name": "d", "type": "host", "children": [3]},
        {
            "id": 0,
            "name": "osd.0",
            "type": "osd",
            "kb": 10 << 20,
            "kb_used": 1024,
            "status": "up",
            "reweight": 1.0,
        },
        {
            "id": 3,
            "name": "osd.3",
            "type": "osd",
            "kb": 10 << 20,
            "kb_used": 0,
            "status": "down",
            "reweight": 1.0,
        },
        {
            "id": 5,
            "name": "osd.5",
            "type": "osd",
            "kb": 10 << 20,
            "kb_used": 0,
            "status": "down",
            "reweight": 0.0,
        },  # out: not capacity
    ]
}


def test_status_counts_what_each_host_gives():
    doc = shape(
        "fsid-1",
        {"status": CEPH_STATUS, "df": CEPH_DF, "tree": CEPH_TREE,
         "pools": [{"pool_name": "rbd", "size": 3, "min_size": 2, "crush_rule": 1}]},
        {"a", "d"},
    )  # fmt: skip
    assert doc["health"] == "HEALTH_WARN" and "OSD_HOST_DOWN" in doc["checks"]
    assert (doc["mons_in_quorum"], doc["osds_up"], doc["osds_in"]) == (3, 3, 4)
    # the OSDs that are in (osd df), not df's totals, which lag behind a new OSD
    assert doc["raw_bytes"] == 20 << 30 and doc["usable_bytes"] == (20 << 30) // 3
    assert doc["raw_used_bytes"] == 1 << 20
    hosts = {h["host"]: h for h in doc["hosts"]}
    assert hosts["d"]["osds"] == [3] and hosts["d"]["osds_up"] == 0
    assert hosts["a"]["raw_bytes"] == 10 << 30
    assert doc["pools"][0]["max_avail_bytes"] == 12 << 30
    assert "osd.3" in render(doc)


def test_a_failed_task_names_the_task_and_host_and_hides_no_log_output(store):
    from bootstrap.join.stage import HostOutcome, _EventHandler

    n = store.create_node(guid=None, bmc=BmcAddress("127.0.0.5"), state=NodeState.BOOTING)
    outcome = {n.id: HostOutcome(n.id)}
    seen = []
    handler = _EventHandler(store, outcome, lambda host, what, task: seen.append((host, what)))

    def event(kind, task, res, role="ceph_osd"):
        data = {"host": n.id, "task": task, "role": role, "res": res}
        return handler({"event": kind, "event_data": data})

    event("runner_on_ok", "Bring up an OSD", {"changed": True, "results": [
        {"stdout_lines": ["prepared", "started", "osd 7"]}]})  # fmt: skip
    event("runner_on_failed", "Install the keyring", {"censored": "hidden", "msg": "AQsecret"})
    event("runner_on_failed", "Later task", {"msg": "second failure"})
    out = outcome[n.id]
    assert out.osds == [7] and out.changed == 1
    assert out.failed.startswith("task 'ceph_osd: Install the keyring' on " + n.id)
    assert "no_log" in out.failed and "AQsecret" not in out.failed
    kinds = [e.kind for e in store.events(n.id) if e.kind.startswith("join.")]
    assert kinds == ["join.changed", "join.failed", "join.failed"]
    assert all("AQsecret" not in e.message for e in store.events(n.id))
    assert (n.id, "failed") in seen


def test_a_restarted_seed_takes_up_the_joins_it_left_half_done():
    nodes = [node("a", NodeState.JOINING, 1.0), node("b", NodeState.ENLISTED, 99.0)]
    assert join_targets(nodes, {}, 100.0, auto=True, settle=3.0, resume=True) == ["a"]
    assert join_targets(nodes, {}, 100.0, auto=True, settle=3.0) == []


def test_ssh_checks_the_host_keys_each_node_enlisted_with():
    from bootstrap.join.inventory import known_hosts

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGvc0ZKh3jzXbaYbjzH9LMF7DNqYkO4WN5vR2f3d0m1Q"
    members = [Member("node-a", "10.0.0.11", (), (key,)), Member("node-b", "10.0.0.12")]
    assert known_hosts(members) == f"10.0.0.11,node-a {key}\n"
    ident = ceph.Identity("2f0e8d6a-0000-4000-8000-000000000001", "10.0.0.0/24", (), False)
    inv = build(
        members,
        identity=ident,
        mons=[ceph.Mon("node-a", "10.0.0.11")],
        placement=place([("node-a", {}), ("node-b", {})]),
        ssh_key=Path("/k"),
        known_hosts_file=Path("/run/kh"),
    )
    hosts = inv["all"]["hosts"]
    assert "StrictHostKeyChecking=yes" in hosts["node-a"]["ansible_ssh_common_args"]
    assert "UserKnownHostsFile=/run/kh" in hosts["node-a"]["ansible_ssh_common_args"]
    # a node whose agent reported no keys (an older image) is trusted on first use
    assert "StrictHostKeyChecking=no" in hosts["node-b"]["ansible_ssh_common_args"]

"""Enlist, the pure part: the body's validation, the token rules, the path to enlisted."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootstrap.agent import disks as agent_disks
from bootstrap.agent import inventory as agent_inventory
from bootstrap.agent import sysfs as agent_sysfs
from bootstrap.agent.inventory import collect
from bootstrap.boot import enlist
from bootstrap.boot.enlist import (
    DISCOVERY,
    JOIN,
    EnlistOutcome,
    EnlistRequest,
    InvalidEnlist,
    answer,
    bearer_token,
    judge,
    mac_hint,
    parse_request,
    path_to_enlisted,
    summary,
)
from bootstrap.models import Inventory, TokenRecord
from bootstrap.states import NodeState, check_transition
from tests.unit.test_agent_inventory import BOOT_ID, GUID, machine_tree

S = NodeState
MAC = "52:54:00:12:34:56"
NOW = 1_000_000.0


def body(**change) -> dict:
    base = {
        "mac": MAC,
        "node": "node-6f1c3e2a",
        "boot_id": BOOT_ID,
        "inventory": {
            "system": {"uuid": GUID, "serial": "SN1", "vendor": "QEMU", "product": "pc"},
            "cpus": {"count": 2, "model": "Xeon"},
            "memory": {"bytes": 4 * 2**30},
            "disks": [{"name": "vda", "size_bytes": 2**30, "empty": True}],
            "nics": [{"name": "eth0", "mac": MAC, "link": "up", "speed_mbps": 1000}],
            "lldp": [],
        },
    }
    base.update(change)
    return base


def raw(data) -> bytes:
    return json.dumps(data).encode()


def with_inventory(**change) -> bytes:
    data = body()
    data["inventory"].update(change)
    return raw(data)


# -- the body ---------------------------------------------------------------------------


def test_a_good_body_parses():
    request = parse_request(raw(body(mac="52-54-00-12-34-56".upper())))
    assert (request.mac, request.node, request.boot_id) == (MAC, "node-6f1c3e2a", BOOT_ID)
    assert request.inventory.system.uuid == GUID
    assert request.inventory.disks[0].size_bytes == 2**30 and request.inventory.disks[0].empty
    assert request.inventory.nics[0].speed_mbps == 1000


def test_what_the_real_agent_sends_is_accepted_and_kept_whole(tmp_path):
    """The contract between bootstrap/agent and the seed, on the fixture machine."""
    inventory = collect(machine_tree(tmp_path), run=lambda argv: (1, ""), which=lambda n: None)
    request = parse_request(raw(body(inventory=inventory)))
    assert request.inventory.to_json() == inventory
    assert Inventory.from_json(request.inventory.to_json()) == request.inventory


def test_the_agents_limits_fit_the_seeds():
    assert agent_sysfs.MAX_STR <= enlist.MAX_STR
    assert agent_disks.MAX_DISKS <= enlist.MAX_DISKS
    assert agent_inventory.MAX_NICS <= enlist.MAX_NICS
    assert agent_inventory.MAX_NEIGHBOURS <= enlist.MAX_LLDP


def test_unknown_keys_are_ignored_and_not_kept():
    data = body(extra={"x": 1})
    data["inventory"]["gpus"] = ["a"]
    data["inventory"]["disks"][0]["smart"] = {"ok": True}
    request = parse_request(raw(data))
    assert "gpus" not in request.inventory.to_json()
    assert "smart" not in request.inventory.to_json()["disks"][0]


def test_enlist_mode_sends_no_node():
    assert parse_request(raw(body(node=None))).node is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        b'"text"',
        b"\xff\xfe",
        b'{"mac": NaN}',
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the parser's recursion
        raw(body(mac="525400123456")),
        raw(body(mac=None)),
        raw(body(node="../etc")),
        raw(body(node=7)),
        raw(body(boot_id="yesterday")),
        raw(body(boot_id=None)),
        raw({k: v for k, v in body().items() if k != "inventory"}),
        raw(body(inventory=[])),
        with_inventory(system="QEMU"),
        with_inventory(system={"uuid": "not-a-uuid"}),
        with_inventory(system={"vendor": "x" * 257}),
        with_inventory(system={"vendor": "bad\x1b[2J"}),
        with_inventory(cpus={"count": True}),
        with_inventory(cpus={"count": -1}),
        with_inventory(cpus={"count": "2"}),
        with_inventory(memory={"bytes": 1.5}),
        with_inventory(memory={"bytes": 2**64}),
        with_inventory(disks="vda"),
        with_inventory(disks=[{"name": "vda"}]),  # no size
        with_inventory(disks=[{"name": "", "size_bytes": 1}]),
        with_inventory(disks=[{"name": "vda", "size_bytes": 1, "empty": "yes"}]),
        with_inventory(disks=[{"name": "vda", "size_bytes": 1, "holders": ["x"] * 33}]),
        with_inventory(disks=[{"name": f"d{i}", "size_bytes": 1} for i in range(257)]),
        with_inventory(nics=[{"name": "eth0", "mac": "zz"}]),
        with_inventory(nics=[{"name": "eth0", "mac": MAC, "link": "sideways"}]),
        with_inventory(lldp=[{"chassis_id": "x"}]),  # no interface
        with_inventory(ssh_host_keys="ssh-ed25519 AAAA"),
        with_inventory(ssh_host_keys=["ssh-ed25519 AAAAC3Nza root@x"]),  # a comment
        with_inventory(ssh_host_keys=["ssh-dss AAAAB3NzaC1kc3MAAACBAP"]),
        with_inventory(ssh_host_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\nfrom=evil"]),
        with_inventory(ssh_host_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA"] * 5),
    ],
)
def test_malformed_bodies_are_refused(data):
    with pytest.raises(InvalidEnlist):
        parse_request(data)


def test_an_oversized_body_is_refused_before_parsing():
    with pytest.raises(InvalidEnlist, match="larger than 1000 bytes"):
        parse_request(b" " * 1001, max_body=1000)


def test_the_message_never_echoes_values():
    with pytest.raises(InvalidEnlist) as info:
        parse_request(with_inventory(system={"vendor": "secret\x00stuff"}))
    assert "secret" not in str(info.value) and "inventory.system.vendor" in str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@settings(max_examples=300)
@given(json_values)
def test_any_json_parses_or_is_a_400(value):
    try:
        result = parse_request(raw(value))
    except InvalidEnlist:
        return
    assert isinstance(result, EnlistRequest)


@settings(max_examples=300)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "system": json_values,
            "cpus": json_values,
            "memory": json_values,
            "disks": st.lists(
                st.dictionaries(st.sampled_from(["name", "size_bytes"]), json_values)
            ),
            "nics": json_values,
        },
    )
)
def test_any_inventory_parses_or_is_a_400(inventory):
    try:
        parse_request(raw(body(inventory=inventory)))
    except InvalidEnlist:
        pass


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_a_400(data):
    try:
        parse_request(data)
    except InvalidEnlist:
        pass
    mac_hint(data)  # never raises


def test_the_mac_hint_is_lenient_but_well_formed():
    assert mac_hint(raw({"mac": "52-54-00-12-34-56"})) == MAC
    assert mac_hint(raw({"mac": "junk"})) is None and mac_hint(b"{") is None


@pytest.mark.parametrize(
    "header, token",
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        (None, None),
        ("", None),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer a b", None),
        ("Bearer " + "a" * 513, None),
    ],
)
def test_bearer_tokens(header, token):
    assert bearer_token(header) == token


# -- the token rules ------------------------------------------------------------------------


def record(**change) -> TokenRecord:
    base = dict(
        hash="h",
        node_id="node-6f1c3e2a",
        mac=MAC,
        purpose=JOIN,
        expires=NOW + 60,
        created=NOW - 60,
        used=None,
        used_by=None,
    )
    base.update(change)
    return TokenRecord(**base)


REQUEST = parse_request(raw(body()))
UNKNOWN = parse_request(raw(body(node=None)))


@pytest.mark.parametrize(
    "token, request_, status, code",
    [
        (record(), REQUEST, 200, "ok"),
        (record(), UNKNOWN, 200, "ok"),  # the node is the token's
        (None, REQUEST, 401, "unknown_token"),
        (record(purpose="reset"), REQUEST, 401, "wrong_purpose"),
        (record(mac="52:54:00:00:00:01"), REQUEST, 403, "wrong_mac"),
        (record(node_id="node-other"), REQUEST, 403, "wrong_node"),
        (record(used=NOW - 1, used_by="another-boot"), REQUEST, 401, "replay"),
        (record(used=NOW - 1, used_by=BOOT_ID), REQUEST, 200, "repeat"),
        (record(used=NOW - 1, used_by=BOOT_ID, expires=NOW - 1), REQUEST, 200, "repeat"),
        (record(expires=NOW - 0.001), REQUEST, 401, "expired"),
        (record(expires=NOW), REQUEST, 200, "ok"),  # up to and including the deadline
        (record(purpose=DISCOVERY, node_id=""), UNKNOWN, 200, "ok"),
        (record(purpose=DISCOVERY, node_id=""), REQUEST, 403, "wrong_node"),
        (record(purpose=DISCOVERY, node_id="", mac="52:54:00:00:00:01"), UNKNOWN, 403, "wrong_mac"),
    ],
)
def test_token_rules(token, request_, status, code):
    verdict = judge(token, request_, NOW)
    assert (verdict.status, verdict.code) == (status, code)
    assert verdict.repeat == (code == "repeat")


# -- the path to enlisted -------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, path",
    [
        (None, (S.ENLISTED,)),
        (S.DISCOVERED, (S.BOOTING, S.ENLISTED)),
        (S.ENROLLED, (S.BOOTING, S.ENLISTED)),
        (S.BOOTING, (S.ENLISTED,)),
        (S.ENLISTED, (S.ENLISTED,)),
        (S.FAILED, (S.BOOTING, S.ENLISTED)),
        (S.JOINING, ()),
        (S.ACTIVE, ()),
        (S.RETIRED, None),
    ],
)
def test_paths_to_enlisted(state, path):
    assert path_to_enlisted(state) == path


@pytest.mark.parametrize("state", [None, *NodeState])
def test_every_path_is_legal(state):
    path = path_to_enlisted(state)
    current = S.BOOTING if state is None else state
    if state is None:
        check_transition(None, S.BOOTING)  # a machine found by netbooting starts there
    for target in path or ():
        check_transition(current, target)
        current = target


def test_the_answer_and_summary():
    outcome = EnlistOutcome(
        200, node="node-1", state=S.ENLISTED, ssh_authorized_keys=("ssh-ed25519 AAAA x",)
    )
    assert answer(outcome, time_servers=["10.0.0.1"], provisioning_cidr="10.0.0.0/24") == {
        "node": "node-1",
        "state": "enlisted",
        "ssh_authorized_keys": ["ssh-ed25519 AAAA x"],
        "time_servers": ["10.0.0.1"],
        "provisioning_cidr": "10.0.0.0/24",
        "hostname": "node-1",
    }
    assert summary(REQUEST.inventory) == "2 CPUs, 4.0 GiB, 1 disks (1 empty), 1 NICs"


def test_the_enlist_script_carries_the_discovery_token():
    from pathlib import Path

    from bootstrap.boot.backend import BootProfile, Machine
    from bootstrap.boot.scripts import ScriptRenderer
    from bootstrap.config import BootConfig
    from bootstrap.image.catalogue import Image, ImageFile
    from bootstrap.models import Secret

    image = Image(
        "img", Path("/nonexistent"), {n: ImageFile(n, "a" * 64, 1) for n in ("vmlinuz", "initrd")}
    )
    token = Secret("tok3n_Example-0123456789abcdefghijklmnopqrstu")
    script = ScriptRenderer().render(
        Machine(MAC, None, None, BootProfile.ENLIST),
        image,
        seed_url="http://10.20.0.1",
        config=BootConfig(),
        token=token,
    )
    kernel = next(line for line in script.text.splitlines() if line.startswith("kernel "))
    assert f"metalseed.token={token.reveal()}" in kernel.split()
    assert "metalseed.mode=enlist" in kernel and "metalseed.node=" not in kernel
    assert token.reveal() not in repr(script)


def test_enlist_settings_in_the_boot_config(tmp_path):
    from bootstrap.config import load
    from bootstrap.errors import ConfigError

    none = tmp_path / "absent.toml"
    none.write_text("")
    config = load(none, env={"METALSEED_BOOT_TIME_SERVERS": "10.0.0.1, ntp.example"})
    assert config.boot.time_servers == ("10.0.0.1", "ntp.example")
    assert (config.boot.discovery_token_ttl, config.boot.enlist_max_body) == (900, 256 * 1024)
    for key, value in (("boot.enlist_max_body", 100), ("boot.discovery_token_ttl", 0)):
        with pytest.raises(ConfigError, match=key):
            load(none, env={}, flags={key: value})

"""Enlist, the pure part: the request body, the token rules, the path to ``enlisted``.

The node agent (``bootstrap/agent``) POSTs to ``/api/v1/enlist``::

    Authorization: Bearer TOKEN
    {"mac": "52:54:00:12:34:56", "node": "node-6f1c3e2a" | null,
     "boot_id": "<uuid>", "inventory": {...}}

``parse_request`` turns the body into an ``EnlistRequest`` or raises
``InvalidEnlist`` (a 400): not JSON, not an object, a wrong type, a string
over ``MAX_STR`` characters or with control characters, a list over its
bound. Unknown keys are ignored and not stored. ``judge`` applies the token
rules to the stored ``TokenRecord``; ``path_to_enlisted`` says which
transitions take a node in a given state to ``enlisted``. No I/O here: the
backend (``backend.py``) reads and writes, the HTTP handler (``enlist_http.py``)
speaks HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..models import (
    CpuInfo,
    DiskInfo,
    Inventory,
    LldpNeighbour,
    NicInfo,
    SystemInfo,
    TokenRecord,
)
from ..states import NodeState

#: the largest enlist body accepted (``boot.enlist_max_body`` overrides)
MAX_BODY = 256 * 1024
MAX_STR = 256
MAX_DISKS = MAX_NICS = MAX_LLDP = 256
MAX_HOLDERS = 32
MAX_INT = 2**63 - 1

JOIN, DISCOVERY = "join", "discovery"

_MAC = re.compile(r"^[0-9a-fA-F]{2}([-:])[0-9a-fA-F]{2}(?:\1[0-9a-fA-F]{2}){4}$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class InvalidEnlist(ValueError):
    """The enlist body is malformed (400). The message says where, never echoes values."""


@dataclasses.dataclass(frozen=True)
class EnlistRequest:
    mac: str  # lower-case, colon-separated
    node: str | None
    boot_id: str  # canonical UUID text
    inventory: Inventory


# -- the body ---------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise InvalidEnlist(f"{name} is not JSON")


def load_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded nesting (a RecursionError is a 400)."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, InvalidEnlist):
            raise
        raise InvalidEnlist("the body is not JSON") from None


def _mac(text: Any, where: str) -> str:
    if not isinstance(text, str) or not _MAC.match(text):
        raise InvalidEnlist(f"{where} is not a MAC address")
    return text.lower().replace("-", ":")


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidEnlist(f"{where} must be an object")
    return value


def _str(data: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise InvalidEnlist(f"{where}.{key} is required")
        return None
    if not isinstance(value, str):
        raise InvalidEnlist(f"{where}.{key} must be a string")
    if len(value) > MAX_STR:
        raise InvalidEnlist(f"{where}.{key} is longer than {MAX_STR} characters")
    if _CONTROL.search(value):
        raise InvalidEnlist(f"{where}.{key} has control characters")
    if required and not value:
        raise InvalidEnlist(f"{where}.{key} is empty")
    return value


def _int(
    data: Mapping[str, Any],
    key: str,
    where: str,
    *,
    hi: int = MAX_INT,
    null: bool = False,
    default: int | None = None,
) -> int | None:
    value = data.get(key, default)
    if value is None and null:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise InvalidEnlist(f"{where}.{key} must be an integer from 0 to {hi}")
    return value


def _bool(data: Mapping[str, Any], key: str, where: str, *, null: bool = False) -> bool | None:
    value = data.get(key, None if null else False)
    if value is None and null:
        return None
    if not isinstance(value, bool):
        raise InvalidEnlist(f"{where}.{key} must be true or false")
    return value


def _list(
    data: Mapping[str, Any], key: str, where: str, limit: int, item: Callable[[Any, str], Any]
) -> tuple:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise InvalidEnlist(f"{where}.{key} must be a list")
    if len(value) > limit:
        raise InvalidEnlist(f"{where}.{key} has more than {limit} items")
    return tuple(item(v, f"{where}.{key}[{i}]") for i, v in enumerate(value))


def _system(value: Any, where: str) -> SystemInfo:
    data = _obj(value, where)
    uuid = _str(data, "uuid", where)
    if uuid is not None:
        try:
            uuid = str(uuidlib.UUID(uuid))
        except ValueError:
            raise InvalidEnlist(f"{where}.uuid is not a UUID") from None
    return SystemInfo(
        uuid=uuid,
        serial=_str(data, "serial", where),
        vendor=_str(data, "vendor", where),
        product=_str(data, "product", where),
    )


def _holder(value: Any, where: str) -> str:
    return _str({"name": value}, "name", where, required=True) or ""


def _disk(value: Any, where: str) -> DiskInfo:
    data = _obj(value, where)
    return DiskInfo(
        name=_str(data, "name", where, required=True) or "",
        size_bytes=_int(data, "size_bytes", where) or 0,
        rotational=bool(_bool(data, "rotational", where)),
        removable=bool(_bool(data, "removable", where)),
        serial=_str(data, "serial", where),
        wwn=_str(data, "wwn", where),
        model=_str(data, "model", where),
        partitions=_int(data, "partitions", where, hi=4096, default=0) or 0,
        holders=_list(data, "holders", where, MAX_HOLDERS, _holder),
        signature=_str(data, "signature", where),
        empty=_bool(data, "empty", where, null=True),
    )


def _nic(value: Any, where: str) -> NicInfo:
    data = _obj(value, where)
    link = data.get("link", "down")
    if link not in ("up", "down"):
        raise InvalidEnlist(f"{where}.link must be up or down")
    return NicInfo(
        name=_str(data, "name", where, required=True) or "",
        mac=_mac(data.get("mac"), f"{where}.mac"),
        driver=_str(data, "driver", where),
        link=link,
        speed_mbps=_int(data, "speed_mbps", where, hi=10**7, null=True),
        mtu=_int(data, "mtu", where, hi=2**20, null=True),
    )


def _neighbour(value: Any, where: str) -> LldpNeighbour:
    data = _obj(value, where)
    return LldpNeighbour(
        interface=_str(data, "interface", where, required=True) or "",
        chassis_id=_str(data, "chassis_id", where),
        chassis_name=_str(data, "chassis_name", where),
        port_id=_str(data, "port_id", where),
        port_description=_str(data, "port_description", where),
        management_ip=_str(data, "management_ip", where),
    )


_HOST_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]{16,4096}={0,2}$"
)
MAX_HOST_KEYS = 4


def _host_key(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HOST_KEY.match(value):
        raise InvalidEnlist(f"{where} is not an SSH public key (TYPE BASE64)")
    return value


def parse_inventory(value: Any) -> Inventory:
    data = _obj(value, "inventory")
    cpus = _obj(data.get("cpus", {}), "inventory.cpus")
    memory = _obj(data.get("memory", {}), "inventory.memory")
    return Inventory(
        system=_system(data.get("system", {}), "inventory.system"),
        cpus=CpuInfo(
            count=_int(cpus, "count", "inventory.cpus", hi=65536, default=0) or 0,
            model=_str(cpus, "model", "inventory.cpus"),
        ),
        memory_bytes=_int(memory, "bytes", "inventory.memory", default=0) or 0,
        disks=_list(data, "disks", "inventory", MAX_DISKS, _disk),
        nics=_list(data, "nics", "inventory", MAX_NICS, _nic),
        lldp=_list(data, "lldp", "inventory", MAX_LLDP, _neighbour),
        ssh_host_keys=_list(data, "ssh_host_keys", "inventory", MAX_HOST_KEYS, _host_key),
    )


def parse_request(raw: bytes, max_body: int = MAX_BODY) -> EnlistRequest:
    """The enlist body, validated; ``InvalidEnlist`` says what is wrong."""
    if len(raw) > max_body:
        raise InvalidEnlist(f"the body is larger than {max_body} bytes")
    body = _obj(load_json(raw), "the body")
    node = body.get("node")
    if node is not None and (not isinstance(node, str) or not _NODE.match(node)):
        raise InvalidEnlist("node must be a node id or null")
    boot_id = body.get("boot_id")
    try:
        boot_id = str(uuidlib.UUID(boot_id)) if isinstance(boot_id, str) else None
    except ValueError:
        boot_id = None
    if boot_id is None:
        raise InvalidEnlist("boot_id must be the boot's UUID")
    if "inventory" not in body:
        raise InvalidEnlist("inventory is required")
    return EnlistRequest(
        mac=_mac(body.get("mac"), "mac"),
        node=node,
        boot_id=boot_id,
        inventory=parse_inventory(body["inventory"]),
    )


def mac_hint(raw: bytes) -> str | None:
    """The body's MAC if it has a well-formed one: to put a refusal on the right node."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    mac = body.get("mac") if isinstance(body, dict) else None
    return mac.lower().replace("-", ":") if isinstance(mac, str) and _MAC.match(mac) else None


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > 512 or " " in value:
        return None
    return value


# -- the token rules ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
    """``judge``'s answer: ``proceed``, ``repeat`` (this boot enlisted already) or refused."""

    status: int  # 200, or 401/403 for a refusal
    reason: str = ""  # what went wrong, for the event and the answer; never the token
    code: str = "ok"  # short machine-readable reason
    repeat: bool = False

    @property
    def refused(self) -> bool:
        return self.status != 200


PROCEED = Verdict(200)
REPEAT = Verdict(200, "the same boot enlisted already", "repeat", repeat=True)


def judge(record: TokenRecord | None, request: EnlistRequest, now: float) -> Verdict:
    """The token rules, in order: known; for this MAC; for this node; unused (or used by
    this very boot: a retry); unexpired. Pure."""
    if record is None:
        return Verdict(401, "unknown token", "unknown_token")
    if record.purpose not in (JOIN, DISCOVERY):
        return Verdict(401, f"a {record.purpose} token cannot enlist", "wrong_purpose")
    if record.mac != request.mac:
        return Verdict(403, "the token was issued to another MAC", "wrong_mac")
    if record.purpose == JOIN and request.node not in (None, record.node_id):
        return Verdict(403, "the token was issued to another node", "wrong_node")
    if record.purpose == DISCOVERY and request.node is not None:
        return Verdict(403, "a discovery token is for a machine without a node id", "wrong_node")
    if record.used is not None:
        if record.used_by == request.boot_id:
            return REPEAT
        return Verdict(401, "the token was used already (replay)", "replay")
    if record.expires < now:
        return Verdict(401, "the token has expired", "expired")
    return PROCEED


# -- the state machine's part -------------------------------------------------------------

S = NodeState

#: how a node in each state gets to ``enlisted``; () = stays as it is (a node in the
#: cluster that rebooted reports its inventory, the orchestrator decides); None = refused
_PATHS: Mapping[NodeState, tuple[NodeState, ...] | None] = {
    S.DISCOVERED: (S.BOOTING, S.ENLISTED),  # powered on by hand before its BMC login worked
    S.ENROLLED: (S.BOOTING, S.ENLISTED),
    S.BOOTING: (S.ENLISTED,),
    S.ENLISTED: (S.ENLISTED,),  # a new boot enlists again: the state records the new reason
    S.FAILED: (S.BOOTING, S.ENLISTED),
    S.JOINING: (),
    S.ACTIVE: (),
    S.RETIRED: None,
}


def path_to_enlisted(state: NodeState | None) -> tuple[NodeState, ...] | None:
    """The transitions that take a node in ``state`` to ``enlisted``. A new node (None)
    is created in ``booting`` and takes one step. None: the node may not enlist."""
    if state is None:
        return (S.ENLISTED,)
    return _PATHS[state]


# -- the answer ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EnlistOutcome:
    """What the backend did with an enlist: the HTTP status and, on 200, the node."""

    status: int
    error: str = ""
    node: str | None = None
    state: NodeState | None = None
    repeat: bool = False
    ssh_authorized_keys: tuple[str, ...] = ()
    ceph_conf: str | None = None  # a cluster member's ceph.conf: its agent restarts its OSDs


def answer(
    outcome: EnlistOutcome, *, time_servers: Sequence[str], provisioning_cidr: str | None
) -> dict[str, Any]:
    """The 200 body: what the node needs next."""
    return {
        "node": outcome.node,
        "state": str(outcome.state),
        "ssh_authorized_keys": list(outcome.ssh_authorized_keys),
        "time_servers": list(time_servers),
        "provisioning_cidr": provisioning_cidr,
        "hostname": outcome.node,
        **({"ceph_conf": outcome.ceph_conf} if outcome.ceph_conf else {}),
    }


def summary(inventory: Inventory) -> str:
    """One line for the event log: ``2 CPUs, 4.0 GiB, 3 disks (2 empty), 2 NICs``."""
    empty = sum(1 for d in inventory.disks if d.empty)
    gib = inventory.memory_bytes / 2**30
    return (
        f"{inventory.cpus.count} CPUs, {gib:.1f} GiB, {len(inventory.disks)} disks "
        f"({empty} empty), {len(inventory.nics)} NICs"
        + (f", {len(inventory.lldp)} LLDP neighbours" if inventory.lldp else "")
    )

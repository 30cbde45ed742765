"""Plain data: what metalseed knows about nodes, BMCs, events and inventories.

No I/O, no behaviour beyond formatting. Secrets are ``Secret`` values, which
never print their contents (``repr``, ``str`` and f-strings all mask them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .states import NodeState


class Secret:
    """A string that refuses to show itself. ``reveal()`` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):  # never pickled in clear by accident
        raise TypeError("Secret values cannot be pickled")


@dataclasses.dataclass(frozen=True)
class Credential:
    username: str
    password: Secret

    def __post_init__(self) -> None:
        if not isinstance(self.password, Secret):
            object.__setattr__(self, "password", Secret(self.password))


#: BMC kinds (``BmcAddress.driver``) and, for Redfish, the URL schemes a RANGE may name
IPMI, REDFISH = "ipmi", "redfish"
REDFISH_SCHEMES = {"redfish": "https", "redfish+https": "https", "redfish+http": "http"}
DEFAULT_PORTS = {("ipmi", ""): 623, ("redfish", "https"): 443, ("redfish", "http"): 80}


@dataclasses.dataclass(frozen=True)
class BmcAddress:
    """Where a node's BMC answers and which driver speaks to it.

    IPMI: ``host:port`` (UDP). Redfish: ``scheme`` (https or http), host, port
    and ``path``, the ComputerSystem's ``@odata.id`` on that service ("" for
    the service itself, before its Systems are enumerated). ``str()`` gives
    the form ``parse`` reads back: ``10.0.8.3:623``,
    ``redfish://10.0.9.3:443/redfish/v1/Systems/1``,
    ``redfish+http://127.0.0.1:8000/redfish/v1/Systems/abc``.
    """

    host: str
    port: int = 623
    driver: str = IPMI
    scheme: str = ""
    path: str = ""

    def __str__(self) -> str:
        if self.driver == REDFISH:
            prefix = "redfish" if self.scheme == "https" else f"redfish+{self.scheme}"
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{prefix}://{host}:{self.port}{self.path}"
        return f"{self.host}:{self.port}"

    @property
    def service(self) -> BmcAddress:
        """The endpoint without a System path: the Redfish service (an IPMI BMC itself)."""
        return dataclasses.replace(self, path="")

    @property
    def base_url(self) -> str:
        """``https://host:port`` of a Redfish service."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def redfish(cls, scheme: str, host: str, port: int | None = None, path: str = "") -> BmcAddress:
        if scheme not in ("https", "http"):
            raise ValueError(f"Redfish scheme must be https or http, not {scheme!r}")
        return cls(host, port or DEFAULT_PORTS[(REDFISH, scheme)], REDFISH, scheme, path)

    @classmethod
    def parse(cls, text: str, default_port: int = 623) -> BmcAddress:
        """``host[:port]`` (IPMI) or ``redfish[+http]://host[:port][/path]``."""
        scheme_word, sep, rest = text.partition("://")
        if sep:
            scheme = REDFISH_SCHEMES.get(scheme_word.lower())
            if scheme is None:
                raise ValueError(f"unknown BMC scheme {scheme_word!r} in {text!r}")
            where, slash, path = rest.partition("/")
            path = f"/{path}".rstrip("/") if slash else ""
            host, port = _host_port(where, None)
            return cls.redfish(scheme, host, port, path)
        host, port = _host_port(text, default_port)
        return cls(host, port)


def _host_port(text: str, default: int | None) -> tuple[str, int | None]:
    if text.startswith("["):  # [v6]:port
        host, _, tail = text[1:].partition("]")
        return host, int(tail[1:]) if tail.startswith(":") else default
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default
    return host, int(port)


@dataclasses.dataclass(frozen=True)
class BmcIdentity:
    """What a BMC tells us about itself once we are logged in."""

    guid: str  # SMBIOS system UUID, lower-case canonical text
    manufacturer_id: int = 0
    product_id: int = 0
    firmware: str = ""
    mac: str | None = None  # the BMC's own MAC (IPMI LAN configuration)
    power: str = "unknown"
    #: manufacturer, product, serial, ... (IPMI FRU; a Redfish System's own fields)
    fru: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: the machine's NIC MACs, where the BMC reports them (Redfish EthernetInterfaces)
    macs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Node:
    id: str
    state: NodeState
    guid: str | None
    bmc: BmcAddress | None
    reason: str = ""
    state_since: float = 0.0
    created: float = 0.0
    updated: float = 0.0
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.id,
            "state": str(self.state),
            "guid": self.guid,
            "bmc": str(self.bmc) if self.bmc else None,
            "driver": self.bmc.driver if self.bmc else None,
            "reason": self.reason,
            "state_since": self.state_since,
            "created": self.created,
            "updated": self.updated,
            "facts": dict(self.facts),
        }


@dataclasses.dataclass(frozen=True)
class Event:
    id: int
    node_id: str
    ts: float
    kind: str
    message: str
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node": self.node_id,
            "ts": self.ts,
            "kind": self.kind,
            "message": self.message,
            "data": dict(self.data),
        }


@dataclasses.dataclass(frozen=True)
class Lease:
    """A DHCP lease (full mode). ``state``: offered, bound, released or declined."""

    ip: str
    mac: str
    state: str
    expires: float
    hostname: str = ""
    node_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    """What the store keeps of a minted token: its hash, never the token."""

    hash: str
    node_id: str
    mac: str
    purpose: str  # "join" (a known node) or "discovery" (an unknown machine)
    expires: float
    created: float
    used: float | None = None
    used_by: str | None = None  # the boot id that used it


# -- inventory: what a node's agent reported at enlist ---------------------------------------


@dataclasses.dataclass(frozen=True)
class SystemInfo:
    """DMI: the SMBIOS system UUID (the BMC's system GUID), serial, vendor, product."""

    uuid: str | None = None
    serial: str | None = None
    vendor: str | None = None
    product: str | None = None


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    count: int = 0
    model: str | None = None


@dataclasses.dataclass(frozen=True)
class DiskInfo:
    """A block device. ``empty``: no partitions, holders or signature; None: unreadable."""

    name: str
    size_bytes: int
    rotational: bool = False
    removable: bool = False
    serial: str | None = None
    wwn: str | None = None
    model: str | None = None
    partitions: int = 0
    holders: tuple[str, ...] = ()
    signature: str | None = None
    empty: bool | None = None


@dataclasses.dataclass(frozen=True)
class NicInfo:
    name: str
    mac: str
    driver: str | None = None
    link: str = "down"  # "up" or "down"
    speed_mbps: int | None = None
    mtu: int | None = None


@dataclasses.dataclass(frozen=True)
class LldpNeighbour:
    interface: str
    chassis_id: str | None = None
    chassis_name: str | None = None
    port_id: str | None = None
    port_description: str | None = None
    management_ip: str | None = None


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclasses.dataclass(frozen=True)
class Inventory:
    """A machine's hardware as its agent saw it. JSON shape: ``bootstrap/agent/inventory.py``."""

    system: SystemInfo = SystemInfo()
    cpus: CpuInfo = CpuInfo()
    memory_bytes: int = 0
    disks: tuple[DiskInfo, ...] = ()
    nics: tuple[NicInfo, ...] = ()
    lldp: tuple[LldpNeighbour, ...] = ()
    ssh_host_keys: tuple[str, ...] = ()  # "TYPE BASE64": the join's SSH pins these

    def to_json(self) -> dict[str, Any]:
        return {
            "system": dataclasses.asdict(self.system),
            "cpus": dataclasses.asdict(self.cpus),
            "memory": {"bytes": self.memory_bytes},
            "disks": [{**dataclasses.asdict(d), "holders": list(d.holders)} for d in self.disks],
            "nics": [dataclasses.asdict(n) for n in self.nics],
            "lldp": [dataclasses.asdict(n) for n in self.lldp],
            "ssh_host_keys": list(self.ssh_host_keys),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Inventory:
        """From ``to_json`` output (the store's copy, validated when it came in)."""
        return cls(
            system=SystemInfo(**_known(SystemInfo, data.get("system", {}))),
            cpus=CpuInfo(**_known(CpuInfo, data.get("cpus", {}))),
            memory_bytes=int(data.get("memory", {}).get("bytes", 0)),
            disks=tuple(
                DiskInfo(**{**_known(DiskInfo, d), "holders": tuple(d.get("holders", ()))})
                for d in data.get("disks", [])
            ),
            nics=tuple(NicInfo(**_known(NicInfo, n)) for n in data.get("nics", [])),
            lldp=tuple(LldpNeighbour(**_known(LldpNeighbour, n)) for n in data.get("lldp", [])),
            ssh_host_keys=tuple(str(k) for k in data.get("ssh_host_keys", [])),
        )


@dataclasses.dataclass(frozen=True)
class NodeInventory:
    """The latest inventory of a node, and which boot of which MAC reported it when."""

    node_id: str
    boot_id: str
    mac: str
    received: float
    inventory: Inventory

    def to_json(self) -> dict[str, Any]:
        return {
            **self.inventory.to_json(),
            "boot_id": self.boot_id,
            "mac": self.mac,
            "received": self.received,
        }


@dataclasses.dataclass(frozen=True)
class EnlistWrite:
    """One enlist, for the store to apply in one transaction (``StateStore.apply_enlist``).

    Consume the token for ``boot_id``, create the node if ``node_id`` is None
    (in ``booting``, with ``guid``), bind ``mac`` to it, store the inventory,
    and move it along ``path``. ``expect`` is the state the plan was made
    from: if the node (or the token) changed meanwhile, nothing is written.
    """

    token_hash: str
    boot_id: str
    mac: str
    node_id: str | None
    guid: str | None
    expect: NodeState | None
    path: tuple[NodeState, ...]
    inventory: Inventory
    reason: str
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

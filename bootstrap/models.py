"""Plain data: what metalseed knows about nodes, BMCs and events.

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


@dataclasses.dataclass(frozen=True)
class BmcAddress:
    host: str
    port: int = 623

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int = 623) -> BmcAddress:
        host, sep, port = text.rpartition(":")
        if not sep:
            return cls(text, default_port)
        return cls(host, int(port))


@dataclasses.dataclass(frozen=True)
class BmcIdentity:
    """What a BMC tells us about itself once we are logged in."""

    guid: str  # SMBIOS system UUID, lower-case canonical text
    manufacturer_id: int = 0
    product_id: int = 0
    firmware: str = ""
    mac: str | None = None
    power: str = "unknown"
    fru: Mapping[str, str] = dataclasses.field(default_factory=dict)


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
    purpose: str
    expires: float
    created: float
    used: float | None = None

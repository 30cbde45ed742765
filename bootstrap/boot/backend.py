"""The one narrow interface between the boot protocols and node data.

DHCP, TFTP and HTTP handlers ask the backend two things -- *who is this MAC*
and *what should it boot* -- and tell it one: *this step happened*. They
never touch the store or the state machine themselves. (The shape follows
tinkerbell/smee's handler backend.)

``StoreBackend`` answers from the state store: a MAC is tied to its node by
the machine UUID the firmware sends (DHCP option 97, iPXE ``${uuid}``), which
is the BMC's system GUID. The first boot step of a known node moves it to
``booting``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import secrets
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..errors import IllegalTransition
from ..models import Secret
from ..states import NodeState
from ..store import StateStore

log = logging.getLogger(__name__)


class BootProfile(enum.StrEnum):
    """What a machine is told to boot."""

    ENLIST = "enlist"  # unknown machine: the image in enlist-only mode
    PROVISION = "provision"  # a known node: the node image with its join token
    RETIRED = "retired"  # taken out of service: stop cleanly, boot nothing


@dataclasses.dataclass(frozen=True)
class Machine:
    """The backend's answer to "who is this MAC"."""

    mac: str  # lower-case, colon-separated
    node_id: str | None  # None: an unknown machine
    state: NodeState | None
    profile: BootProfile
    hostname: str | None = None


class BootBackend(Protocol):
    def identify(self, mac: str, uuid: str | None = None) -> Machine:
        """Who is this MAC and what should it boot.

        ``uuid`` is the machine UUID the client sent (canonical text), if any.
        An unbound MAC whose UUID matches a node's system GUID (in either byte
        order) is bound to that node, and the binding is remembered.
        """

    def record(
        self, mac: str, kind: str, message: str, data: Mapping[str, Any] | None = None
    ) -> None:
        """A boot step (``dhcp.offer``, ``tftp.sent``, ``http.script``, ...).

        An event on the MAC's node; the first step of a node that is
        ``enrolled`` (or ``failed``/``enlisted``) moves it to ``booting``.
        Steps of unknown machines are logged.
        """

    def mint_token(self, node_id: str, mac: str) -> Secret:
        """A one-time join token for this node and MAC; the store keeps only its hash."""

    def check_token(self, token: str, mac: str | None = None) -> str | None:
        """The node id a live (unexpired, unused) token was minted for, or None."""


def normalise_mac(mac: str) -> str:
    """``AA-BB-CC-DD-EE-FF`` / ``aabb.ccdd.eeff`` / ``aa:bb:..`` -> ``aa:bb:cc:dd:ee:ff``."""
    digits = mac.lower().replace(":", "").replace("-", "").replace(".", "")
    if len(digits) != 12 or any(ch not in "0123456789abcdef" for ch in digits):
        raise ValueError(f"not a MAC address: {mac!r}")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def uuid_candidates(text: str) -> tuple[str, ...]:
    """A UUID as sent, and with the first three fields byte-swapped.

    IPMI and SMBIOS encode the first three fields of the same UUID in opposite
    byte orders, and firmware is not consistent about which it sends; matching
    either ties the same machine together.
    """
    value = uuidlib.UUID(text)
    swapped = uuidlib.UUID(bytes_le=value.bytes)
    return (str(value), str(swapped)) if swapped != value else (str(value),)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


#: states from which the first boot step moves a node to ``booting``
_STARTS_BOOTING = frozenset({NodeState.ENROLLED, NodeState.FAILED, NodeState.ENLISTED})


class StoreBackend:
    """``BootBackend`` over the state store."""

    def __init__(
        self,
        store: StateStore,
        *,
        token_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._token_ttl = token_ttl
        self._clock = clock

    def identify(self, mac: str, uuid: str | None = None) -> Machine:
        mac = normalise_mac(mac)
        node_id = self._store.mac_node(mac)
        if node_id is None and uuid:
            for candidate in uuid_candidates(uuid):
                node = self._store.node_by_guid(candidate)
                if node is not None:
                    node_id = node.id
                    self._store.bind_mac(mac, node.id, uuid=candidate)
                    break
            else:
                self._store.bind_mac(mac, None, uuid=uuid)
        if node_id is None:
            return Machine(mac, None, None, BootProfile.ENLIST)
        node = self._store.get_node(node_id)
        profile = BootProfile.RETIRED if node.state is NodeState.RETIRED else BootProfile.PROVISION
        return Machine(mac, node.id, node.state, profile, hostname=node.id)

    def record(
        self, mac: str, kind: str, message: str, data: Mapping[str, Any] | None = None
    ) -> None:
        mac = normalise_mac(mac)
        node_id = self._store.mac_node(mac)
        if node_id is None:
            log.info("unknown machine %s: %s", mac, message)
            return
        data = {"mac": mac, **(data or {})}
        node = self._store.get_node(node_id)
        if node.state in _STARTS_BOOTING:
            try:
                self._store.transition(
                    node_id, NodeState.BOOTING, f"{kind}: {message}", expect=node.state, data=data
                )
                return
            except IllegalTransition:
                pass  # someone moved it meanwhile; the step is still an event
        self._store.add_event(node_id, kind, message, data)

    def mint_token(self, node_id: str, mac: str) -> Secret:
        token = secrets.token_urlsafe(32)
        now = self._clock()
        self._store.add_token(
            token_hash(token),
            node_id=node_id,
            mac=normalise_mac(mac),
            purpose="join",
            expires=now + self._token_ttl,
        )
        return Secret(token)

    def check_token(self, token: str, mac: str | None = None) -> str | None:
        record = self._store.get_token(token_hash(token))
        if record is None or record.used is not None or record.expires < self._clock():
            return None
        if mac is not None and record.mac != normalise_mac(mac):
            return None
        return record.node_id

"""Where node state lives: the ``StateStore`` protocol and its implementations.

Before the cluster exists the seed uses ``SqliteStore`` (``store/sqlite.py``);
after hand-off the control plane uses a RADOS store with the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ..models import (
    BmcAddress,
    Credential,
    EnlistWrite,
    Event,
    Lease,
    Node,
    NodeInventory,
    Secret,
    TokenRecord,
)
from ..states import NodeState


class StateStore(Protocol):
    def create_node(
        self,
        *,
        guid: str | None,
        bmc: BmcAddress | None,
        state: NodeState,
        reason: str = "",
        facts: Mapping[str, Any] | None = None,
        message: str = "",
    ) -> Node:
        """Create a node and its first event atomically. A duplicate GUID is an error."""

    def get_node(self, node_id: str) -> Node: ...

    def find_node(self, ref: str) -> Node:
        """A node by id, GUID, or BMC ``address[:port]``; ``NotFoundError`` otherwise."""

    def node_by_guid(self, guid: str) -> Node | None: ...

    def node_by_bmc(self, bmc: BmcAddress) -> Node | None: ...

    def list_nodes(self, states: Iterable[NodeState] | None = None) -> list[Node]: ...

    def update_node(
        self,
        node_id: str,
        *,
        guid: str | None = None,
        bmc: BmcAddress | None = None,
        facts: Mapping[str, Any] | None = None,
        event: tuple[str, str] | None = None,
    ) -> Node:
        """Merge facts / set GUID or BMC address, with an optional (kind, message) event."""

    def transition(
        self,
        node_id: str,
        target: NodeState,
        reason: str = "",
        *,
        expect: NodeState | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Node:
        """Move a node along a legal edge, writing its event in the same transaction."""

    def add_event(
        self, node_id: str, kind: str, message: str, data: Mapping[str, Any] | None = None
    ) -> Event: ...

    def events(
        self, node_id: str | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[Event]: ...

    def get_credential(self, node_id: str) -> Credential | None: ...

    def get_pending_credential(self, node_id: str) -> Credential | None: ...

    def set_credential(self, node_id: str, credential: Credential, *, message: str = "") -> None:
        """Make ``credential`` the node's working login and clear any pending one."""

    def set_pending_credential(self, node_id: str, credential: Credential | None) -> None:
        """Record (or clear) a credential about to be written to the BMC."""

    def close(self) -> None: ...

    # -- boot: MACs, leases, reservations, tokens -------------------------------

    def mac_node(self, mac: str) -> str | None:
        """The node a MAC is bound to, or None (unknown, or seen but unmatched)."""

    def bind_mac(self, mac: str, node_id: str | None, *, uuid: str | None = None) -> None:
        """Remember a MAC (and the UUID it booted with), bound to a node or not."""

    def macs(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Known MACs: ``{"mac", "node_id", "uuid", "first_seen", "last_seen"}``."""

    def leases(self) -> list[Lease]: ...

    def put_lease(self, lease: Lease) -> None:
        """Insert or replace the lease on ``lease.ip``."""

    def delete_lease(self, ip: str) -> None: ...

    def reservations(self) -> dict[str, str]:
        """MAC -> reserved IP address."""

    def reserve(self, mac: str, ip: str, node_id: str | None = None) -> None:
        """Pin ``ip`` to ``mac``; an address reserved for another MAC is an error."""

    def add_token(self, hash: str, *, node_id: str, mac: str, purpose: str, expires: float) -> None:
        """Remember a token by its hash. ``purpose`` "join" (for ``node_id``) or
        "discovery" (``node_id`` "": an unknown machine; set to the node it enlisted)."""

    def get_token(self, hash: str) -> TokenRecord | None: ...

    def use_token(self, hash: str, *, by: str | None = None) -> TokenRecord | None:
        """Mark a live token used (by boot id ``by``), atomically; None if unknown, expired
        or already used."""

    # -- the Ceph cluster: identity and keys ---------------------------------------

    def cluster_settings(self) -> dict[str, str]:
        """The cluster's public settings (fsid, public_network, bootstrapped, ...)."""

    def cluster_secret(self, name: str) -> Secret | None:
        """A cluster key (decrypted), or None if there is no such key."""

    def init_cluster(self, settings: Mapping[str, str], secrets: Mapping[str, Secret]) -> bool:
        """Create the cluster's identity unless one exists; True if this call made it."""

    def set_cluster_setting(self, key: str, value: str) -> None: ...

    # -- enlist: inventories ----------------------------------------------------

    def get_inventory(self, node_id: str) -> NodeInventory | None:
        """The node's latest inventory, or None before it first enlisted."""

    def apply_enlist(self, write: EnlistWrite) -> tuple[Node, bool]:
        """Apply one enlist atomically (see ``EnlistWrite``): (node, True); (node, False)
        when the token was already used by this same boot (nothing written);
        ``ConcurrentUpdate`` when the token or the node changed since the plan."""

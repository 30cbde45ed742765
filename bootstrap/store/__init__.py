"""Where node state lives: the ``StateStore`` protocol and its implementations.

Before the cluster exists the seed uses ``SqliteStore`` (``store/sqlite.py``);
after hand-off the control plane uses a RADOS store with the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ..models import BmcAddress, Credential, Event, Node
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

"""The enlist half of the SQLite store: inventories, and an enlist applied in one transaction.

A mixin of ``SqliteStore`` (it uses its transaction, node and event helpers).
``apply_enlist`` is the only writer: the token is consumed, the node created
or checked, the MAC bound, the inventory stored and the transitions made with
their events -- all or nothing, so a seed killed mid-enlist leaves the token
unused and the agent's retry starts afresh.
"""

from __future__ import annotations

import json
import sqlite3

from ..errors import ConcurrentUpdate, NotFoundError
from ..models import EnlistWrite, Inventory, Node, NodeInventory
from ..states import NodeState

ENLIST_SCHEMA = """
CREATE TABLE IF NOT EXISTS inventories (
    node_id  TEXT PRIMARY KEY REFERENCES nodes (id),
    boot_id  TEXT NOT NULL,
    mac      TEXT NOT NULL,
    received REAL NOT NULL,
    data     TEXT NOT NULL
);
"""


class EnlistTablesMixin:
    """Inventories and ``apply_enlist``; see ``StateStore`` for the contract."""

    def get_inventory(self, node_id: str) -> NodeInventory | None:
        rows = self._read("SELECT * FROM inventories WHERE node_id=?", (node_id,))
        if not rows:
            return None
        row = rows[0]
        return NodeInventory(
            node_id=row["node_id"],
            boot_id=row["boot_id"],
            mac=row["mac"],
            received=row["received"],
            inventory=Inventory.from_json(json.loads(row["data"])),
        )

    def apply_enlist(self, write: EnlistWrite) -> tuple[Node, bool]:
        """(the node, True) once applied; (the node, False) if this boot had done it already.

        ``ConcurrentUpdate`` when the token was used by another boot or expired, or
        the node left ``write.expect``, since the plan was made: judge again.
        """
        now = self._clock()
        with self._tx() as conn:
            token = conn.execute(
                "SELECT * FROM tokens WHERE hash=?", (write.token_hash,)
            ).fetchone()
            if token is None:
                raise ConcurrentUpdate("the token is gone")
            if token["used"] is not None:
                if token["used_by"] == write.boot_id and token["node_id"]:
                    return self._node_row(conn, token["node_id"]), False
                raise ConcurrentUpdate("the token was used meanwhile")
            if token["expires"] < now:
                raise ConcurrentUpdate("the token expired meanwhile")

            data = {"mac": write.mac, "boot_id": write.boot_id, **write.data}
            if write.node_id is None:
                node_id = self._insert_node(
                    conn,
                    guid=write.guid,
                    bmc=None,
                    state=NodeState.BOOTING,
                    reason=write.reason,
                    facts={},
                    message=f"new machine {write.guid or write.mac} netbooted: {write.reason}",
                    mac=write.mac,
                    now=now,
                )
                current = NodeState.BOOTING
            else:
                node_id = write.node_id
                current = self._node_row(conn, node_id).state
                if current != write.expect:
                    raise ConcurrentUpdate(f"{node_id} is {current}, expected {write.expect}")

            bound = conn.execute("SELECT node_id FROM macs WHERE mac=?", (write.mac,)).fetchone()
            if bound is None or bound["node_id"] != node_id:
                conn.execute(
                    "INSERT INTO macs (mac, node_id, uuid, first_seen, last_seen)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (mac) DO UPDATE SET"
                    " node_id=excluded.node_id, last_seen=excluded.last_seen",
                    (write.mac, node_id, write.guid, now, now),
                )
                self._insert_event(
                    conn, node_id, "boot.mac", f"MAC {write.mac} belongs to this machine", data
                )
            conn.execute(
                "INSERT OR REPLACE INTO inventories (node_id, boot_id, mac, received, data)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    node_id,
                    write.boot_id,
                    write.mac,
                    now,
                    json.dumps(write.inventory.to_json(), sort_keys=True),
                ),
            )
            for i, target in enumerate(write.path):
                last = i == len(write.path) - 1
                reason = write.reason if last else "it netbooted: its agent called home"
                self._move(conn, node_id, current, target, reason, data, now)
                current = target
            if not write.path:  # a node in the cluster rebooted: reported, state kept
                self._insert_event(
                    conn,
                    node_id,
                    "enlist",
                    f"enlisted again, still {current}: {write.reason}",
                    data,
                )
            conn.execute(
                "UPDATE tokens SET used=?, used_by=?, node_id=? WHERE hash=?",
                (now, write.boot_id, node_id, write.token_hash),
            )
            return self._node_row(conn, node_id), True

    def _node_row(self, conn: sqlite3.Connection, node_id: str) -> Node:
        row = conn.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no node {node_id}")
        return self._node(row)

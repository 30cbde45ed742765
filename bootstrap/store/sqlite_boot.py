"""The boot half of the SQLite store: MAC bindings, leases, reservations, tokens.

A mixin of ``SqliteStore`` (it uses its transaction and read helpers), kept
apart so each file stays about one thing. Tokens are stored by hash only.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..errors import ConcurrentUpdate, StoreError
from ..models import Lease, TokenRecord

BOOT_SCHEMA = """
CREATE TABLE IF NOT EXISTS macs (
    mac        TEXT PRIMARY KEY,
    node_id    TEXT REFERENCES nodes (id),
    uuid       TEXT,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS macs_node ON macs (node_id);
CREATE TABLE IF NOT EXISTS leases (
    ip       TEXT PRIMARY KEY,
    mac      TEXT NOT NULL,
    state    TEXT NOT NULL,
    expires  REAL NOT NULL,
    hostname TEXT NOT NULL DEFAULT '',
    node_id  TEXT
);
CREATE INDEX IF NOT EXISTS leases_mac ON leases (mac);
CREATE TABLE IF NOT EXISTS reservations (
    mac     TEXT PRIMARY KEY,
    ip      TEXT NOT NULL UNIQUE,
    node_id TEXT
);
CREATE TABLE IF NOT EXISTS tokens (
    hash    TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    mac     TEXT NOT NULL,
    purpose TEXT NOT NULL,
    expires REAL NOT NULL,
    created REAL NOT NULL,
    used    REAL,
    used_by TEXT
);
CREATE INDEX IF NOT EXISTS tokens_node ON tokens (node_id);
"""


class BootTablesMixin:
    """MACs, leases, reservations and tokens; see ``StateStore`` for the contract."""

    # -- MACs ------------------------------------------------------------------

    def mac_node(self, mac: str) -> str | None:
        rows = self._read("SELECT node_id FROM macs WHERE mac=?", (mac,))
        return rows[0]["node_id"] if rows else None

    def bind_mac(self, mac: str, node_id: str | None, *, uuid: str | None = None) -> None:
        now = self._clock()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO macs (mac, node_id, uuid, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (mac) DO UPDATE SET"
                " node_id=COALESCE(excluded.node_id, macs.node_id),"
                " uuid=COALESCE(excluded.uuid, macs.uuid), last_seen=excluded.last_seen",
                (mac, node_id, uuid, now, now),
            )
            if node_id is not None:
                self._insert_event(
                    conn, node_id, "boot.mac", f"MAC {mac} booted as this machine", {"mac": mac}
                )

    def macs(self, node_id: str | None = None) -> list[dict[str, Any]]:
        if node_id is None:
            rows = self._read("SELECT * FROM macs ORDER BY mac")
        else:
            rows = self._read("SELECT * FROM macs WHERE node_id=? ORDER BY mac", (node_id,))
        return [dict(row) for row in rows]

    # -- leases and reservations -----------------------------------------------

    def leases(self) -> list[Lease]:
        return [
            Lease(
                ip=row["ip"],
                mac=row["mac"],
                state=row["state"],
                expires=row["expires"],
                hostname=row["hostname"],
                node_id=row["node_id"],
            )
            for row in self._read("SELECT * FROM leases ORDER BY ip")
        ]

    def put_lease(self, lease: Lease) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO leases (ip, mac, state, expires, hostname, node_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (lease.ip, lease.mac, lease.state, lease.expires, lease.hostname, lease.node_id),
            )

    def delete_lease(self, ip: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM leases WHERE ip=?", (ip,))

    def reservations(self) -> dict[str, str]:
        return {row["mac"]: row["ip"] for row in self._read("SELECT mac, ip FROM reservations")}

    def reserve(self, mac: str, ip: str, node_id: str | None = None) -> None:
        with self._tx() as conn:
            row = conn.execute("SELECT mac FROM reservations WHERE ip=?", (ip,)).fetchone()
            if row is not None and row["mac"] != mac:
                raise ConcurrentUpdate(f"address {ip} is reserved for {row['mac']}")
            conn.execute(
                "INSERT OR REPLACE INTO reservations (mac, ip, node_id) VALUES (?, ?, ?)",
                (mac, ip, node_id),
            )

    # -- tokens ----------------------------------------------------------------

    def add_token(self, hash: str, *, node_id: str, mac: str, purpose: str, expires: float) -> None:
        with self._tx() as conn:
            try:
                conn.execute(
                    "INSERT INTO tokens (hash, node_id, mac, purpose, expires, created)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (hash, node_id, mac, purpose, expires, self._clock()),
                )
            except sqlite3.IntegrityError:
                raise StoreError("token hash collision") from None

    def get_token(self, hash: str) -> TokenRecord | None:
        rows = self._read("SELECT * FROM tokens WHERE hash=?", (hash,))
        return _token(rows[0]) if rows else None

    def use_token(self, hash: str, *, by: str | None = None) -> TokenRecord | None:
        now = self._clock()
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE tokens SET used=?, used_by=? WHERE hash=? AND used IS NULL AND expires>=?",
                (now, by, hash, now),
            )
            if cur.rowcount != 1:
                return None
            return _token(conn.execute("SELECT * FROM tokens WHERE hash=?", (hash,)).fetchone())


#: columns added after a table was first created: (table, column, declaration)
BOOT_COLUMNS = (("tokens", "used_by", "TEXT"),)


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        hash=row["hash"],
        node_id=row["node_id"],
        mac=row["mac"],
        purpose=row["purpose"],
        expires=row["expires"],
        created=row["created"],
        used=row["used"],
        used_by=row["used_by"],
    )

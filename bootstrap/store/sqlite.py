"""The seed's state store: SQLite in WAL mode under the state directory.

Every state change and its event are written in one transaction, so a seed
killed at any point either has both or neither. Connections are opened lazily
(no I/O in the constructor) and shared between threads behind a lock; other
processes (a CLI next to a running daemon) wait on SQLite's busy timeout.
Secrets are stored only as ``SecretBox`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConcurrentUpdate, NotFoundError, StoreError
from ..models import BmcAddress, Credential, Event, Node
from ..secretbox import SecretBox
from ..states import NodeState, check_transition
from .sqlite_boot import BOOT_COLUMNS, BOOT_SCHEMA, BootTablesMixin
from .sqlite_cluster import CLUSTER_SCHEMA, ClusterTablesMixin
from .sqlite_enlist import ENLIST_SCHEMA, EnlistTablesMixin

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id          TEXT PRIMARY KEY,
    guid        TEXT UNIQUE,
    bmc_host    TEXT,
    bmc_port    INTEGER,
    bmc_driver  TEXT NOT NULL DEFAULT 'ipmi',
    bmc_scheme  TEXT NOT NULL DEFAULT '',
    bmc_path    TEXT NOT NULL DEFAULT '',
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    state_since REAL NOT NULL,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    facts       TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL REFERENCES nodes (id),
    ts      REAL NOT NULL,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL,
    data    TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_node ON events (node_id, id);
CREATE TABLE IF NOT EXISTS credentials (
    node_id          TEXT PRIMARY KEY REFERENCES nodes (id),
    username         TEXT,
    secret           BLOB,
    pending_username TEXT,
    pending_secret   BLOB
);
"""


#: columns added since the first schema: (table, column, declaration)
NODE_COLUMNS = (
    ("nodes", "bmc_driver", "TEXT NOT NULL DEFAULT 'ipmi'"),
    ("nodes", "bmc_scheme", "TEXT NOT NULL DEFAULT ''"),
    ("nodes", "bmc_path", "TEXT NOT NULL DEFAULT ''"),
)
#: one node per BMC endpoint: an IPMI BMC, or one System of a Redfish service
NODE_INDEXES = """
DROP INDEX IF EXISTS nodes_bmc;
CREATE UNIQUE INDEX IF NOT EXISTS nodes_bmc_endpoint ON nodes (bmc_host, bmc_port, bmc_path);
"""
#: the WHERE clause naming one BMC endpoint; its arguments come from ``_bmc_key``
BMC_IS = "bmc_host=? AND bmc_port=? AND bmc_path=?"
BMC_CLEARED = "bmc_host=NULL, bmc_port=NULL, bmc_driver='ipmi', bmc_scheme='', bmc_path=''"


def _bmc_key(bmc: BmcAddress) -> tuple[str, int, str]:
    return (bmc.host, bmc.port, bmc.path)


def node_id_for(guid: str | None, bmc: BmcAddress | None, mac: str | None = None) -> str:
    """A short, stable id: from the GUID when known, else from the BMC address (or, for a
    machine that turned up by netbooting, its MAC)."""
    if guid:
        return "node-" + guid.replace("-", "")[:8]
    key = f"mac {mac}".encode() if bmc is None and mac else str(bmc or "").encode()
    return "node-" + hashlib.sha256(key).hexdigest()[:8]


class SqliteStore(BootTablesMixin, EnlistTablesMixin, ClusterTablesMixin):
    def __init__(self, path: Path, secrets: SecretBox, clock: Callable[[], float] = time.time):
        self._path = path
        self._secrets = secrets
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()

    # -- plumbing ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    self._path, timeout=10.0, isolation_level=None, check_same_thread=False
                )
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.executescript(SCHEMA + BOOT_SCHEMA + ENLIST_SCHEMA + CLUSTER_SCHEMA)
                for table, column, declaration in NODE_COLUMNS + BOOT_COLUMNS:  # older dirs
                    have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                conn.executescript(NODE_INDEXES)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                    (str(SCHEMA_VERSION),),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open state store {self._path}: {exc}") from None
            self._conn = conn
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
        with self._lock:
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(f"state store busy: {exc}") from None
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._connect().execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"state store read failed: {exc}") from None

    @property
    def state_dir(self) -> Path:
        """The directory the store lives in: the seed's state directory."""
        return self._path.parent

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @staticmethod
    def _node(row: sqlite3.Row) -> Node:
        bmc = None
        if row["bmc_host"]:
            bmc = BmcAddress(
                row["bmc_host"],
                row["bmc_port"],
                row["bmc_driver"],
                row["bmc_scheme"],
                row["bmc_path"],
            )
        return Node(
            id=row["id"],
            state=NodeState(row["state"]),
            guid=row["guid"],
            bmc=bmc,
            reason=row["reason"],
            state_since=row["state_since"],
            created=row["created"],
            updated=row["updated"],
            facts=json.loads(row["facts"]),
        )

    def _insert_event(
        self,
        conn: sqlite3.Connection,
        node_id: str,
        kind: str,
        message: str,
        data: Mapping,
        ts: float | None = None,
    ) -> Event:
        ts = self._clock() if ts is None else ts
        cur = conn.execute(
            "INSERT INTO events (node_id, ts, kind, message, data) VALUES (?, ?, ?, ?, ?)",
            (node_id, ts, kind, message, json.dumps(dict(data), sort_keys=True)),
        )
        return Event(cur.lastrowid, node_id, ts, kind, message, dict(data))

    # -- nodes ----------------------------------------------------------------

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
        with self._tx() as conn:
            node_id = self._insert_node(
                conn, guid=guid, bmc=bmc, state=state, reason=reason, facts=facts, message=message
            )
            row = conn.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
        return self._node(row)

    def _insert_node(
        self,
        conn: sqlite3.Connection,
        *,
        guid: str | None,
        bmc: BmcAddress | None,
        state: NodeState,
        reason: str = "",
        facts: Mapping[str, Any] | None = None,
        message: str = "",
        mac: str | None = None,
        now: float | None = None,
    ) -> str:
        """Insert a node and its first event inside ``conn``'s transaction; its id."""
        check_transition(None, state)
        now = self._clock() if now is None else now
        node_id = node_id_for(guid, bmc, mac)
        if guid and conn.execute("SELECT 1 FROM nodes WHERE guid=?", (guid,)).fetchone():
            raise ConcurrentUpdate(f"a node with GUID {guid} exists already")
        taken = conn.execute("SELECT 1 FROM nodes WHERE id=?", (node_id,)).fetchone()
        suffix = 1
        base = node_id
        while taken:  # a GUID-prefix collision: extend the id, stay stable
            suffix += 1
            node_id = f"{base}-{suffix}"
            taken = conn.execute("SELECT 1 FROM nodes WHERE id=?", (node_id,)).fetchone()
        if bmc is not None:
            for row in conn.execute(
                f"SELECT id FROM nodes WHERE {BMC_IS}", _bmc_key(bmc)
            ).fetchall():
                # The address now answers for another machine: the old node lets go.
                conn.execute(f"UPDATE nodes SET {BMC_CLEARED} WHERE id=?", (row["id"],))
                self._insert_event(
                    conn,
                    row["id"],
                    "discovery",
                    f"BMC {bmc} now answers for another machine",
                    {},
                )
        try:
            conn.execute(
                "INSERT INTO nodes (id, guid, bmc_host, bmc_port, bmc_driver, bmc_scheme,"
                " bmc_path, state, reason, state_since, created, updated, facts)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    node_id,
                    guid,
                    bmc.host if bmc else None,
                    bmc.port if bmc else None,
                    bmc.driver if bmc else "ipmi",
                    bmc.scheme if bmc else "",
                    bmc.path if bmc else "",
                    str(state),
                    reason,
                    now,
                    now,
                    now,
                    json.dumps(dict(facts or {}), sort_keys=True),
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise ConcurrentUpdate(f"node for {guid or bmc} exists already: {exc}") from None
        self._insert_event(
            conn, node_id, "state", message or f"new node, {state}", {"to": str(state)}, now
        )
        return node_id

    def get_node(self, node_id: str) -> Node:
        rows = self._read("SELECT * FROM nodes WHERE id=?", (node_id,))
        if not rows:
            raise NotFoundError(f"no node {node_id}")
        return self._node(rows[0])

    def find_node(self, ref: str) -> Node:
        rows = self._read("SELECT * FROM nodes WHERE id=? OR guid=?", (ref, ref.lower()))
        if rows:
            return self._node(rows[0])
        try:
            bmc = BmcAddress.parse(ref)
        except ValueError:
            bmc = None
        if bmc is not None:
            rows = self._read(f"SELECT * FROM nodes WHERE {BMC_IS}", _bmc_key(bmc))
            if not rows and ":" not in ref:
                rows = self._read("SELECT * FROM nodes WHERE bmc_host=?", (ref,))
            if len(rows) == 1:
                return self._node(rows[0])
            if len(rows) > 1:
                raise NotFoundError(f"{ref} matches {len(rows)} nodes; give address:port")
        raise NotFoundError(f"no node {ref} (try `metalseed nodes list`)")

    def node_by_guid(self, guid: str) -> Node | None:
        rows = self._read("SELECT * FROM nodes WHERE guid=?", (guid,))
        return self._node(rows[0]) if rows else None

    def node_by_bmc(self, bmc: BmcAddress) -> Node | None:
        rows = self._read(f"SELECT * FROM nodes WHERE {BMC_IS}", _bmc_key(bmc))
        return self._node(rows[0]) if rows else None

    def list_nodes(self, states: Iterable[NodeState] | None = None) -> list[Node]:
        rows = self._read("SELECT * FROM nodes ORDER BY bmc_host, bmc_port, bmc_path, id")
        nodes = [self._node(r) for r in rows]
        if states is not None:
            wanted = set(states)
            nodes = [n for n in nodes if n.state in wanted]
        return nodes

    def update_node(
        self,
        node_id: str,
        *,
        guid: str | None = None,
        bmc: BmcAddress | None = None,
        facts: Mapping[str, Any] | None = None,
        event: tuple[str, str] | None = None,
    ) -> Node:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no node {node_id}")
            merged = json.loads(row["facts"])
            merged.update(facts or {})
            sets = ["facts=?", "updated=?"]
            args: list[Any] = [json.dumps(merged, sort_keys=True), self._clock()]
            if guid is not None:
                sets.append("guid=?")
                args.append(guid)
            if bmc is not None:
                # Another (stale) node may still claim this address: the BMC moved.
                conn.execute(
                    f"UPDATE nodes SET {BMC_CLEARED} WHERE {BMC_IS} AND id<>?",
                    (*_bmc_key(bmc), node_id),
                )
                sets += ["bmc_host=?", "bmc_port=?", "bmc_driver=?", "bmc_scheme=?", "bmc_path=?"]
                args += [bmc.host, bmc.port, bmc.driver, bmc.scheme, bmc.path]
            try:
                conn.execute(f"UPDATE nodes SET {', '.join(sets)} WHERE id=?", (*args, node_id))
            except sqlite3.IntegrityError as exc:
                raise ConcurrentUpdate(f"{node_id}: {exc}") from None
            if event:
                self._insert_event(conn, node_id, event[0], event[1], {})
            row = conn.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
        return self._node(row)

    def transition(
        self,
        node_id: str,
        target: NodeState,
        reason: str = "",
        *,
        expect: NodeState | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Node:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no node {node_id}")
            current = NodeState(row["state"])
            if expect is not None and current != expect:
                raise ConcurrentUpdate(f"{node_id} is {current}, expected {expect}", node=node_id)
            self._move(conn, node_id, current, target, reason, data or {}, self._clock())
            row = conn.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
        return self._node(row)

    def _move(
        self,
        conn: sqlite3.Connection,
        node_id: str,
        current: NodeState,
        target: NodeState,
        reason: str,
        data: Mapping[str, Any],
        now: float,
    ) -> None:
        """One checked transition and its event, inside ``conn``'s transaction."""
        check_transition(current, target)
        since = None if current == target else now  # the same state keeps its start
        conn.execute(
            "UPDATE nodes SET state=?, reason=?, state_since=COALESCE(?, state_since), updated=?"
            " WHERE id=?",
            (str(target), reason, since, now, node_id),
        )
        message = f"{current} -> {target}" + (f": {reason}" if reason else "")
        payload = {"from": str(current), "to": str(target), **data}
        self._insert_event(conn, node_id, "state", message, payload, now)

    # -- events ---------------------------------------------------------------

    def add_event(
        self, node_id: str, kind: str, message: str, data: Mapping[str, Any] | None = None
    ) -> Event:
        with self._tx() as conn:
            return self._insert_event(conn, node_id, kind, message, data or {})

    def events(
        self, node_id: str | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[Event]:
        sql = "SELECT * FROM events WHERE id > ?"
        args: list[Any] = [after]
        if node_id is not None:
            sql += " AND node_id = ?"
            args.append(node_id)
        sql += " ORDER BY id"
        if limit is not None:
            sql = f"SELECT * FROM ({sql.replace(' ORDER BY id', ' ORDER BY id DESC')} LIMIT ?)"
            sql += " ORDER BY id"
            args.append(limit)
        return [
            Event(r["id"], r["node_id"], r["ts"], r["kind"], r["message"], json.loads(r["data"]))
            for r in self._read(sql, tuple(args))
        ]

    # -- credentials ----------------------------------------------------------

    def _credential(self, node_id: str, pending: bool) -> Credential | None:
        prefix = "pending_" if pending else ""
        rows = self._read(
            f"SELECT {prefix}username AS u, {prefix}secret AS s FROM credentials WHERE node_id=?",
            (node_id,),
        )
        if not rows or rows[0]["u"] is None:
            return None
        return Credential(rows[0]["u"], self._secrets.decrypt(rows[0]["s"]))

    def get_credential(self, node_id: str) -> Credential | None:
        return self._credential(node_id, pending=False)

    def get_pending_credential(self, node_id: str) -> Credential | None:
        return self._credential(node_id, pending=True)

    def set_credential(self, node_id: str, credential: Credential, *, message: str = "") -> None:
        token = self._secrets.encrypt(credential.password)
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO credentials (node_id, username, secret) VALUES (?, ?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET username=excluded.username,"
                " secret=excluded.secret, pending_username=NULL, pending_secret=NULL",
                (node_id, credential.username, token),
            )
            self._insert_event(
                conn,
                node_id,
                "credentials",
                message or f"BMC login recorded for user {credential.username}",
                {"username": credential.username},
            )

    def set_pending_credential(self, node_id: str, credential: Credential | None) -> None:
        username = credential.username if credential else None
        token = self._secrets.encrypt(credential.password) if credential else None
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO credentials (node_id, pending_username, pending_secret)"
                " VALUES (?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                " pending_username=excluded.pending_username,"
                " pending_secret=excluded.pending_secret",
                (node_id, username, token),
            )

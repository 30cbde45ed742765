"""The cluster half of the SQLite store: the Ceph cluster's identity and keys.

A mixin of ``SqliteStore``. One row per setting; a key's value is kept only as a
``SecretBox`` token (``secret``), never in clear. ``init_cluster`` writes the
whole identity in one transaction and never overwrites: two seeds (or a seed and
a CLI) racing to create the cluster end up with the first one's.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..models import Secret

CLUSTER_SCHEMA = """
CREATE TABLE IF NOT EXISTS cluster (
    key    TEXT PRIMARY KEY,
    value  TEXT,
    secret BLOB
);
"""


class ClusterTablesMixin:
    """The cluster settings and keys; see ``StateStore`` for the contract."""

    def cluster_settings(self) -> dict[str, str]:
        rows = self._read("SELECT key, value FROM cluster WHERE secret IS NULL")
        return {r["key"]: r["value"] for r in rows}

    def cluster_secret(self, name: str) -> Secret | None:
        rows = self._read("SELECT secret FROM cluster WHERE key=? AND secret IS NOT NULL", (name,))
        return self._secrets.decrypt(rows[0]["secret"]) if rows else None

    def init_cluster(self, settings: Mapping[str, str], secrets: Mapping[str, Secret]) -> bool:
        """Create the cluster's identity unless one exists; True if this call made it."""
        sealed = {name: self._secrets.encrypt(value) for name, value in secrets.items()}
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM cluster WHERE key='fsid'").fetchone():
                return False
            for key, value in settings.items():
                conn.execute("INSERT INTO cluster (key, value) VALUES (?, ?)", (key, value))
            for key, token in sealed.items():
                conn.execute("INSERT INTO cluster (key, secret) VALUES (?, ?)", (key, token))
        return True

    def set_cluster_setting(self, key: str, value: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO cluster (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

"""The Ceph cluster's identity, made by the seed, and how the seed talks to the cluster.

The seed generates the fsid and the cephx keys (``mon.``, ``client.admin``,
``client.bootstrap-osd``) once, when the first join runs, and keeps the keys
only encrypted in the store (``init_cluster``). The first monitors are
recorded with the identity: they are the initial monmap (the ``ceph_mon`` role
builds its bytes with ``monmaptool`` from exactly these names and addresses).

Public settings (fsid, network, monitors) make the cluster's ``ceph.conf``,
which goes to every node; keys reach a node only through the join stage's
secret socket (``secretsock.py``) and never leave this process otherwise.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import MetalseedError
from ..models import Secret
from ..store import StateStore

#: the keys the seed makes, by their name in the store
KEYS = ("mon_key", "admin_key", "bootstrap_osd_key")
CRYPTO_AES = 1  # ceph's CEPH_CRYPTO_AES, the only key type cephx uses


class ClusterError(MetalseedError):
    """The cluster is not there, or not reachable, or said no."""


def new_key(now: float | None = None) -> Secret:
    """A new cephx secret, as ``ceph-authtool --gen-print-key`` prints it.

    The encoding is ceph's ``CryptoKey``: type (u16), created (u32 s, u32 ns),
    length (u16), then 16 random bytes; all little-endian, base64 as a whole.
    """
    now = time.time() if now is None else now
    secret = os.urandom(16)
    head = struct.pack("<HIIH", CRYPTO_AES, int(now), int(now % 1 * 1e9), len(secret))
    return Secret(base64.b64encode(head + secret).decode())


@dataclasses.dataclass(frozen=True)
class Mon:
    name: str
    addr: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "addr": self.addr}


@dataclasses.dataclass(frozen=True)
class Identity:
    fsid: str
    public_network: str
    mons: tuple[Mon, ...]
    bootstrapped: bool  # a quorum has formed once: new monitors take the running map

    def mon_host(self) -> str:
        return ",".join(f"[v2:{m.addr}:3300,v1:{m.addr}:6789]" for m in self.mons)

    def conf(self) -> str:
        """The minimal client ``ceph.conf``: enough to find the monitors."""
        return f"[global]\nfsid = {self.fsid}\nmon_host = {self.mon_host()}\n"


def identity(store: StateStore) -> Identity | None:
    settings = store.cluster_settings()
    if "fsid" not in settings:
        return None
    mons = tuple(Mon(**m) for m in json.loads(settings.get("mons", "[]")))
    return Identity(
        fsid=settings["fsid"],
        public_network=settings.get("public_network", ""),
        mons=mons,
        bootstrapped=settings.get("bootstrapped") == "1",
    )


def ensure_identity(store: StateStore, public_network: str, mons: Sequence[Mon]) -> Identity:
    """The cluster's identity, made now (fsid, keys, initial monitors) if there is none."""
    made = identity(store)
    if made is not None:
        return made
    settings = {
        "fsid": str(uuid.uuid4()),
        "public_network": public_network,
        "mons": json.dumps([m.to_json() for m in mons]),
        "created": f"{time.time():.3f}",
    }
    store.init_cluster(settings, {name: new_key() for name in KEYS})
    made = identity(store)
    assert made is not None
    return made


def record_mons(store: StateStore, mons: Sequence[Mon]) -> None:
    store.set_cluster_setting("mons", json.dumps([m.to_json() for m in mons]))


def mark_bootstrapped(store: StateStore) -> None:
    store.set_cluster_setting("bootstrapped", "1")


def secret(store: StateStore, name: str) -> Secret:
    value = store.cluster_secret(name)
    if value is None:
        raise ClusterError(f"the cluster has no {name} in the store")
    return value


# -- talking to the cluster -----------------------------------------------------------


class Admin:
    """A RADOS client as ``client.admin``: the key goes to librados in memory only."""

    def __init__(self, store: StateStore, timeout: float = 10.0) -> None:
        ident = identity(store)
        if ident is None:
            raise ClusterError("there is no cluster yet: no node has joined")
        try:
            import rados
        except ImportError:  # pragma: no cover - setup installs python3-rados
            raise ClusterError(
                "the rados module is missing: apt-get install python3-rados"
            ) from None
        self._rados_error = rados.Error
        conf: dict[str, str] = {
            "mon_host": ident.mon_host(),
            "fsid": ident.fsid,
            "key": secret(store, "admin_key").reveal(),
            "client_mount_timeout": str(int(timeout)),  # whole seconds: "10.0" is refused
            "rados_mon_op_timeout": str(int(timeout)),
            "rados_osd_op_timeout": str(int(timeout)),
            "admin_socket": "",
            "log_file": "",
            "log_to_stderr": "false",
            "err_to_stderr": "false",
        }
        self.identity = ident
        try:
            self._cluster = rados.Rados(rados_id="admin", conf=conf)
            self._cluster.connect(timeout=int(timeout))
        except rados.Error as exc:
            raise ClusterError(
                f"cannot reach the cluster's monitors ({ident.mon_host()}): {type(exc).__name__}"
            ) from None

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._cluster.shutdown()

    @property
    def rados(self) -> Any:
        return self._cluster

    def command(self, prefix: str, target: str = "mon", **args: Any) -> Any:
        """``ceph <prefix>`` as JSON, e.g. ``command("osd df")``."""
        cmd = json.dumps({"prefix": prefix, "format": "json", **args})
        try:
            if target == "mgr":
                ret, out, err = self._cluster.mgr_command(cmd, b"", timeout=10)
            else:
                ret, out, err = self._cluster.mon_command(cmd, b"", timeout=10)
        except self._rados_error as exc:
            raise ClusterError(f"ceph {prefix}: {type(exc).__name__}") from None
        if ret != 0:
            raise ClusterError(f"ceph {prefix}: {err or os.strerror(-ret)}")
        return json.loads(out) if out else None


def settings_for(options: Sequence[str]) -> Mapping[str, str]:
    """``["key=value", ...]`` (config ``join.ceph_options``) as a mapping."""
    out: dict[str, str] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ClusterError(f"join.ceph_options: {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out

"""`metalseed cluster status`: the cluster as Ceph reports it, and what each machine gives.

Read over RADOS as ``client.admin`` (``cluster.Admin``) with ``status``,
``df`` (pool usage), ``osd df tree`` (capacity: the OSDs that are in, per host)
and ``osd pool ls detail``; ``shape`` is pure so the
arithmetic is tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..store import StateStore
from .cluster import Admin


def gather(store: StateStore, timeout: float = 10.0) -> dict[str, Any]:
    with Admin(store, timeout=timeout) as admin:
        raw = {
            "status": admin.command("status"),
            "df": admin.command("df"),
            "tree": admin.command("osd df", output_method="tree"),
            "pools": admin.command("osd pool ls", detail="detail"),
        }
        fsid = admin.identity.fsid
    nodes = {n.id for n in store.list_nodes()}
    return shape(fsid, raw, nodes)


def shape(fsid: str, raw: Mapping[str, Any], nodes: Sequence[str] | set[str]) -> dict[str, Any]:
    """The status document from Ceph's JSON answers (pure)."""
    status, df, tree = raw["status"], raw["df"], raw["tree"]
    osdmap = status.get("osdmap", {})
    osdmap = osdmap.get("osdmap", osdmap)  # older releases nest it once more
    health = status.get("health", {})
    stats = df.get("stats", {})
    pools = [
        {
            "name": p.get("pool_name"),
            "size": p.get("size"),
            "min_size": p.get("min_size"),
            "crush_rule": p.get("crush_rule"),
        }
        for p in raw.get("pools") or []
    ]
    usage = {p.get("name"): p.get("stats", {}) for p in df.get("pools", [])}
    for pool in pools:
        s = usage.get(pool["name"], {})
        pool["stored_bytes"] = int(s.get("stored", 0))
        pool["max_avail_bytes"] = int(s.get("max_avail", 0))
    by_id = {n["id"]: n for n in tree.get("nodes", [])}
    hosts = []
    for item in tree.get("nodes", []):
        if item.get("type") != "host":
            continue
        osds = [by_id[c] for c in item.get("children", []) if c in by_id]
        hosts.append(
            {
                "host": item["name"],
                "node": item["name"] if item["name"] in nodes else None,
                "osds": sorted(o["id"] for o in osds),
                "osds_up": sum(1 for o in osds if o.get("status") == "up"),
                "raw_bytes": sum(int(o.get("kb", 0)) * 1024 for o in osds),
                "used_bytes": sum(int(o.get("kb_used", 0)) * 1024 for o in osds),
            }
        )
    size = max([p["size"] or 1 for p in pools] or [1])
    # capacity from the OSDs that are in (``osd df``): it counts a new OSD as soon as it
    # reports, where ``df``'s totals wait for the next PG stats round
    members = [n for n in tree.get("nodes", []) if n.get("type") == "osd"]
    members = [n for n in members if float(n.get("reweight", 1)) > 0]
    if members:
        stats = {
            "total_bytes": sum(int(n.get("kb", 0)) for n in members) * 1024,
            "total_used_raw_bytes": sum(int(n.get("kb_used", 0)) for n in members) * 1024,
            "total_avail_bytes": sum(int(n.get("kb_avail", 0)) for n in members) * 1024,
        }
    raw_bytes = int(stats.get("total_bytes", 0))
    quorum = status.get("quorum_names", [])
    return {
        "fsid": fsid,
        "health": health.get("status", "UNKNOWN"),
        "checks": {
            k: v.get("summary", {}).get("message", "") for k, v in health.get("checks", {}).items()
        },  # fmt: skip
        "mons": status.get("monmap", {}).get("num_mons", len(quorum)),
        "mons_in_quorum": len(quorum),
        "quorum": quorum,
        "osds": int(osdmap.get("num_osds", 0)),
        "osds_up": int(osdmap.get("num_up_osds", 0)),
        "osds_in": int(osdmap.get("num_in_osds", 0)),
        "raw_bytes": raw_bytes,
        "raw_used_bytes": int(stats.get("total_used_raw_bytes", 0)),
        "raw_avail_bytes": int(stats.get("total_avail_bytes", 0)),
        "usable_bytes": raw_bytes // size,
        "pools": pools,
        "hosts": sorted(hosts, key=lambda h: h["host"]),
    }


def render(doc: Mapping[str, Any]) -> str:
    gib = 1024**3
    lines = [
        f"cluster {doc['fsid']}: {doc['health']}",
        *[f"  {name}: {message}" for name, message in doc["checks"].items()],
        f"mons: {doc['mons_in_quorum']}/{doc['mons']} in quorum ({', '.join(doc['quorum'])})",
        f"osds: {doc['osds']} ({doc['osds_up']} up, {doc['osds_in']} in)",
        f"raw: {doc['raw_bytes'] / gib:.1f} GiB ({doc['raw_used_bytes'] / gib:.1f} GiB used), "
        f"usable: {doc['usable_bytes'] / gib:.1f} GiB",
        "pools: "
        + (
            ", ".join(f"{p['name']} (size {p['size']}/{p['min_size']})" for p in doc["pools"])
            or "none"
        ),  # fmt: skip
        "",
        f"{'HOST':<20} {'OSDS':<12} {'UP':>3} {'RAW':>10} {'USED':>10}",
    ]
    for host in doc["hosts"]:
        osds = ",".join(f"osd.{i}" for i in host["osds"]) or "-"
        lines.append(
            f"{host['host']:<20} {osds:<12} {host['osds_up']:>3} "
            f"{host['raw_bytes'] / gib:>8.1f}Gi {host['used_bytes'] / gib:>8.2f}Gi"
        )
    return "\n".join(lines)

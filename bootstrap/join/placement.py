"""Where Ceph's daemons go, as a pure function of the enlisted machines' inventories.

* Monitors and managers: the machines labelled ``mon`` in config, else the
  first three to enlist (in enlist order); a cluster keeps at most three.
* OSDs: one per *empty* data disk (``inventory.disks[].empty``) of every
  machine; a disk holding anything (partitions, a filesystem, LVM, Ceph) is
  never touched.
* Monitor stores: a monitor host with two or more empty disks gives its
  smallest one to its monitor's store (a filesystem that outlives a reboot of
  the stateless node, so a whole-rack power loss keeps the cluster); with one
  disk the store lives in memory and is rebuilt from the quorum.
* CRUSH: each machine is a host, under the rack named in config, else the
  switch its NIC's LLDP neighbour reports, else ``default``.
* Pools: replicated size 3 / min_size 2 across hosts once three hosts have
  OSDs; with fewer hosts a documented degraded mode -- size = the number of
  hosts (OSDs on one host: across OSDs), min_size 1 -- upgraded as machines
  join.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

MAX_MONS = 3
FULL_SIZE, FULL_MIN_SIZE = 3, 2


@dataclasses.dataclass(frozen=True)
class Osd:
    node: str
    disk: str  # kernel name, e.g. sdb
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class Placement:
    mons: tuple[str, ...]
    mgrs: tuple[str, ...]
    osds: tuple[Osd, ...]
    racks: Mapping[str, str]  # node -> CRUSH rack
    pool_size: int
    pool_min_size: int
    failure_domain: str  # "host" or "osd"
    mon_disks: Mapping[str, str] = dataclasses.field(default_factory=dict)  # node -> disk

    @property
    def degraded(self) -> bool:
        return self.pool_size < FULL_SIZE or self.failure_domain != "host"

    def osds_of(self, node: str) -> list[Osd]:
        return [o for o in self.osds if o.node == node]


def pool_shape(hosts: int, osds: int) -> tuple[int, int, str]:
    """(size, min_size, failure domain) for ``osds`` OSDs on ``hosts`` hosts."""
    if hosts >= FULL_SIZE:
        return FULL_SIZE, FULL_MIN_SIZE, "host"
    if hosts >= 2:
        return hosts, 1, "host"
    return max(1, min(FULL_SIZE, osds)), 1, "osd"


def empty_disks(inventory: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The disks an OSD may take: reported empty (unknown is not empty)."""
    return [d for d in inventory.get("disks", []) if d.get("empty") is True]


def rack_of(node: str, inventory: Mapping[str, Any], racks: Mapping[str, str]) -> str:
    if node in racks:
        return racks[node]
    for neighbour in inventory.get("lldp", []) or []:
        name = neighbour.get("chassis_name") or neighbour.get("system_name")
        if name:
            return f"rack-{name}"
    return "default"


def place(
    enlisted: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    mon_labels: Sequence[str] = (),
    racks: Mapping[str, str] | None = None,
) -> Placement:
    """The placement for machines ``[(node id, inventory), ...]`` in the order they enlisted."""
    racks = racks or {}
    order = [node for node, _ in enlisted]
    labelled = [n for n in mon_labels if n in order]
    mons = tuple((labelled or order)[:MAX_MONS])
    mon_disks: dict[str, str] = {}
    for node, inventory in enlisted:
        empties = empty_disks(inventory)
        if node in mons and len(empties) >= 2:
            smallest = min(empties, key=lambda d: (int(d.get("size_bytes") or 0), d["name"]))
            mon_disks[node] = str(smallest["name"])
    osds = tuple(
        Osd(node, str(d["name"]), int(d.get("size_bytes") or 0))
        for node, inventory in enlisted
        for d in empty_disks(inventory)
        if mon_disks.get(node) != d["name"]
    )
    hosts = {o.node for o in osds}
    size, min_size, domain = pool_shape(len(hosts), len(osds))
    return Placement(
        mons=mons,
        mgrs=mons,
        osds=osds,
        racks={node: rack_of(node, inv, racks) for node, inv in enlisted},
        pool_size=size,
        pool_min_size=min_size,
        failure_domain=domain,
        mon_disks=mon_disks,
    )

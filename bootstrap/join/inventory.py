"""The Ansible inventory of one join, generated from the store's view of the cluster.

Pure: nodes, placement and identity in, an inventory mapping out (ansible-runner
writes it as ``inventory/hosts.json``). Keys appear only as
``lookup('metalseed_secret', ...)`` expressions, resolved while the play runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .cluster import Identity, Mon
from .placement import Placement

SECRET_VARS = {
    "ceph_mon_key": "mon_key",
    "ceph_admin_key": "admin_key",
    "ceph_bootstrap_osd_key": "bootstrap_osd_key",
}


@dataclasses.dataclass(frozen=True)
class Member:
    """A node the inventory lists: its id (the host name) and its provisioning address."""

    node: str
    address: str
    devices: tuple[str, ...] = ()  # OSD data disks, /dev paths


def build(
    members: Sequence[Member],
    *,
    identity: Identity,
    mons: Sequence[Mon],
    placement: Placement,
    ssh_key: Path,
    time_servers: Sequence[str] = (),
    ceph_options: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    mon_names = [m.name for m in mons]
    hosts: dict[str, dict[str, Any]] = {}
    for member in members:
        host: dict[str, Any] = {
            "ansible_host": member.address,
            "ceph_crush_rack": placement.racks.get(member.node, "default"),
        }
        if member.devices:
            host["ceph_osd_devices"] = list(member.devices)
        hosts[member.node] = host
    all_vars: dict[str, Any] = {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(ssh_key),
        "ceph_fsid": identity.fsid,
        "ceph_public_network": identity.public_network,
        "ceph_mons": [m.to_json() for m in mons],
        "ceph_bootstrap": not identity.bootstrapped,
        "ceph_pool_size": placement.pool_size,
        "ceph_pool_min_size": placement.pool_min_size,
        "ceph_pool_failure_domain": placement.failure_domain,
        "ceph_options": dict(ceph_options or {}),
        "node_base_time_servers": list(time_servers),
    }
    for var, name in SECRET_VARS.items():
        all_vars[var] = "{{ lookup('metalseed_secret', '" + name + "') }}"
    return {
        "all": {
            "hosts": hosts,
            "vars": all_vars,
            "children": {
                "mons": {"hosts": {n: {} for n in mon_names if n in hosts}},
                "mgrs": {"hosts": {n: {} for n in mon_names if n in hosts}},
                "osds": {"hosts": {m.node: {} for m in members if m.devices}},
            },
        }
    }

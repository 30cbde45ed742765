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
    host_keys: tuple[str, ...] = ()  # "TYPE BASE64" from the node's enlist of this boot


def known_hosts(members: Sequence[Member]) -> str:
    """``known_hosts`` lines pinning each member's SSH host keys (address and name)."""
    return "".join(f"{m.address},{m.node} {key}\n" for m in members for key in m.host_keys)


def build(
    members: Sequence[Member],
    *,
    identity: Identity,
    mons: Sequence[Mon],
    placement: Placement,
    ssh_key: Path,
    known_hosts_file: Path | None = None,
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
        if member.node in placement.mon_disks and member.node in mon_names:
            host["ceph_mon_device"] = f"/dev/{placement.mon_disks[member.node]}"
        if member.host_keys and known_hosts_file is not None:
            # the node's host keys came with its token-checked enlist: SSH checks them
            host["ansible_ssh_common_args"] = (
                f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={known_hosts_file}"
            )
        else:  # an agent that did not report them (older image): trust on first use
            host["ansible_ssh_common_args"] = (
                "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
            )
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

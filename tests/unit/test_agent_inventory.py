"""The agent's inventory from fixture /sys, /proc and /dev trees built in tmp_path.

``machine_tree`` builds one machine: DMI, CPUs, memory, a boot id, block
devices of every kind the skip rules and the emptiness check care about, and
NICs. Other tests (the seed's validation, the functional enlist) reuse it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from bootstrap.agent.disks import detect_signature, read_disks
from bootstrap.agent.inventory import (
    Roots,
    collect,
    parse_lldp,
    read_boot_id,
    read_cpus,
    read_lldp,
    read_memory,
    read_nics,
    read_ssh_host_keys,
    read_system,
)

GUID = "6f1c3e2a-58d4-4b7e-9a15-2c7d0e8b4f93"
BOOT_ID = "0b7c8f1e-2d3a-4c5b-9e6f-7a8b9c0d1e2f"
MIB = 1024 * 1024
CPUINFO = "".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6130\n\n"
    for i in range(4)
)


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def add_disk(
    roots: Roots,
    name: str,
    size: int = 64 * MIB,
    *,
    head: bytes = b"",
    tail: bytes = b"",
    dev: bool = True,
    **attrs: str | bytes,
) -> Path:
    """A block device: sysfs attributes (``attrs`` paths with ``/`` as ``__``) and a /dev file."""
    block = roots.sys / "block" / name
    _write(block / "size", f"{size // 512}\n")
    _write(block / "queue" / "rotational", "0\n")
    _write(block / "removable", "0\n")
    _write(block / "ro", "0\n")
    (block / "holders").mkdir(exist_ok=True)
    for key, value in attrs.items():
        _write(block / key.replace("__", "/"), value)
    if dev:
        path = roots.dev / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            fh.truncate(size)
            fh.write(head)
            if tail:
                fh.seek(size - len(tail))
                fh.write(tail)
    return block


def add_nic(roots: Roots, name: str, mac: str, *, driver: str | None, **attrs: str) -> Path:
    path = roots.sys / "class" / "net" / name
    defaults = {"type": "1", "address": mac, "operstate": "up", "mtu": "1500", "carrier": "1"}
    for key, value in {**defaults, **attrs}.items():
        _write(path / key, value + "\n")
    if driver:
        (path / "device").mkdir()
        os.symlink(f"../../../../bus/pci/drivers/{driver}", path / "device" / "driver")
    return path


def machine_tree(root: Path, *, uuid: str = GUID, boot_id: str = BOOT_ID) -> Roots:
    """One machine with the devices every rule needs. Returns its roots."""
    roots = Roots(sys=root / "sys", proc=root / "proc", dev=root / "dev", ssh=root / "etc/ssh")
    dmi = roots.sys / "class" / "dmi" / "id"
    _write(dmi / "product_uuid", uuid.upper() + "\n")
    _write(dmi / "product_serial", "SN-0042\n")
    _write(dmi / "sys_vendor", "QEMU\n")
    _write(dmi / "product_name", "Standard PC (Q35 + ICH9, 2009)\x07\n")
    _write(roots.proc / "cpuinfo", CPUINFO)
    _write(roots.proc / "meminfo", "MemTotal:        4028440 kB\nMemFree:  1 kB\n")
    _write(roots.proc / "sys" / "kernel" / "random" / "boot_id", boot_id + "\n")

    add_disk(roots, "vda", serial="VD-1\n")  # virtio, all zeros: empty
    mbr = bytearray(512)
    mbr[446 + 4] = 0x83  # one Linux partition entry
    mbr[510:512] = b"\x55\xaa"
    sda = add_disk(
        roots,
        "sda",
        head=bytes(mbr),
        queue__rotational="1\n",
        device__model="QEMU HARDDISK   \n",
        device__vpd_pg80=b"\x00\x80\x00\x08SER-SDA1",
        device__wwid="naa.5000c500a1b2c3d4\n",
    )
    _write(sda / "sda1" / "partition", "1\n")
    ext4 = bytearray(2048)
    ext4[1080:1082] = b"\x53\xef"
    add_disk(roots, "sdb", head=bytes(ext4))
    add_disk(roots, "sdc", tail=b"EFI PART" + bytes(504))  # only GPT's backup header
    add_disk(roots, "sdd", head=(bytes(range(1, 256)) * 2)[:510])  # unknown data
    add_disk(roots, "sde", head=b"bluestore block device\nuuid\n")
    lvm = bytearray(1024)
    lvm[512:520], lvm[536:544] = b"LABELONE", b"LVM2 001"
    add_disk(roots, "sdf", head=bytes(lvm))
    add_disk(roots, "sdg", dev=False)  # listed but unreadable
    nvme = add_disk(
        roots,
        "nvme0n1",
        wwid="eui.0025388b71b2d1c4\n",
        device__serial="S4EWNX0N\n",
        device__model="Samsung SSD 970\n",
    )
    (nvme / "holders" / "dm-0").mkdir()
    add_disk(roots, "loop0", loop__backing_file="/var/lib/lab/m1-disk0.img\n")  # a lab disk
    add_disk(roots, "loop1")  # unbacked
    add_disk(roots, "loop2", loop__backing_file="/img/rootfs.squashfs\n", ro="1\n")
    for skipped in ("sr0", "ram0", "zram0", "dm-0", "md0"):
        add_disk(roots, skipped)
    add_disk(roots, "nbd0", size=0)

    add_nic(roots, "lo", "00:00:00:00:00:00", driver=None, type="772")
    add_nic(roots, "eth0", "52:54:00:12:34:56", driver="virtio_net", speed="1000")
    add_nic(roots, "eth1", "52:54:00:12:34:57", driver="e1000", operstate="down", speed="-1")
    add_nic(roots, "veth0", "0A:58:0A:00:00:01", driver=None, operstate="unknown")
    add_nic(roots, "tun0", "00:00:00:00:00:00", driver=None, type="65534")
    return roots


@pytest.fixture
def roots(tmp_path: Path) -> Roots:
    return machine_tree(tmp_path)


def by_name(items: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in items}


# -- system, CPUs, memory, boot id ---------------------------------------------------------


def test_system_comes_from_dmi_cleaned(roots):
    assert read_system(roots) == {
        "uuid": GUID,  # the kernel's upper-case text made canonical
        "serial": "SN-0042",
        "vendor": "QEMU",
        "product": "Standard PC (Q35 + ICH9, 2009)",  # the control character is gone
    }


def test_a_machine_without_dmi_sends_nones(tmp_path):
    assert read_system(Roots(sys=tmp_path)) == dict.fromkeys(
        ("uuid", "serial", "vendor", "product")
    )


def test_a_dmi_uuid_that_is_not_a_uuid_is_left_out(roots):
    (roots.sys / "class/dmi/id/product_uuid").write_text("Not Settable\n")
    assert read_system(roots)["uuid"] is None


def test_cpus_and_memory(roots):
    assert read_cpus(roots) == {"count": 4, "model": "Intel(R) Xeon(R) Gold 6130"}
    assert read_memory(roots) == {"bytes": 4028440 * 1024}


def test_boot_id(roots):
    assert read_boot_id(roots) == BOOT_ID
    (roots.proc / "sys/kernel/random/boot_id").unlink()
    with pytest.raises(OSError):
        read_boot_id(roots)


# -- disks -------------------------------------------------------------------------------------


def test_disks_are_listed_with_their_facts(roots):
    disks = by_name(read_disks(roots.sys, roots.dev))
    assert sorted(disks) == sorted(
        ["vda", "sda", "sdb", "sdc", "sdd", "sde", "sdf", "sdg", "nvme0n1", "loop0"]
    )
    assert disks["sda"] == {
        "name": "sda",
        "size_bytes": 64 * MIB,
        "rotational": True,
        "removable": False,
        "serial": "SER-SDA1",  # from the SCSI unit serial number VPD page
        "wwn": "naa.5000c500a1b2c3d4",
        "model": "QEMU HARDDISK",
        "partitions": 1,
        "holders": [],
        "signature": "dos",
        "empty": False,
    }
    assert disks["vda"]["serial"] == "VD-1" and disks["vda"]["rotational"] is False
    assert disks["nvme0n1"]["wwn"] == "eui.0025388b71b2d1c4"
    assert disks["nvme0n1"]["serial"] == "S4EWNX0N"


def test_emptiness(roots):
    disks = by_name(read_disks(roots.sys, roots.dev))
    empty = {name: (d["empty"], d["signature"]) for name, d in disks.items()}
    assert empty == {
        "vda": (True, None),  # all zeros
        "loop0": (True, None),
        "sdd": (True, None),  # data nothing recognises, as for blkid and ceph-volume
        "sda": (False, "dos"),  # partitioned
        "sdb": (False, "ext4"),
        "sdc": (False, "gpt"),  # found by the backup header in the last MiB
        "sde": (False, "ceph_bluestore"),
        "sdf": (False, "LVM2_member"),
        "nvme0n1": (False, None),  # device-mapper sits on it
        "sdg": (None, None),  # cannot be read: unknown
    }


def test_only_named_disks_when_asked(roots):
    assert [d["name"] for d in read_disks(roots.sys, roots.dev, only={"loop1", "vda"})] == [
        "loop1",
        "vda",
    ]


def test_no_block_directory_is_no_disks(tmp_path):
    assert read_disks(tmp_path / "sys", tmp_path / "dev") == []


@pytest.mark.parametrize(
    "head, tail, expected",
    [
        (b"", b"", None),
        (bytes(MIB), bytes(MIB), None),
        (b"XFSB" + bytes(100), b"", "xfs"),
        (bytes(65600) + b"_BHRfS_M", b"", "btrfs"),
        (bytes(4086) + b"SWAPSPACE2", b"", "swap"),
        (b"LUKS\xba\xbe\x00\x02", b"", "crypto_LUKS"),
        (bytes(4096) + struct.pack("<I", 0xA92B4EFC), b"", "linux_raid_member"),
        (b"", bytes(8192) + struct.pack("<I", 0xA92B4EFC) + bytes(100), "linux_raid_member"),
        (bytes(512) + b"EFI PART", b"", "gpt"),
        (bytes(3) + b"NTFS    " + bytes(600), b"", "ntfs"),
        (bytes(82) + b"FAT32   " + bytes(600), b"", "vfat"),
        (bytes(32769) + b"CD001", b"", "iso9660"),
        (b"hsqs" + bytes(100), b"", "squashfs"),
        (b"\x01" * 600, b"", None),  # data, no signature
    ],
)
def test_signatures(head, tail, expected):
    assert detect_signature(head, tail) == expected


# -- NICs and LLDP ----------------------------------------------------------------------------


def test_nics(roots):
    assert read_nics(roots) == [
        {
            "name": "eth0",
            "mac": "52:54:00:12:34:56",
            "driver": "virtio_net",
            "link": "up",
            "speed_mbps": 1000,
            "mtu": 1500,
        },
        {
            "name": "eth1",
            "mac": "52:54:00:12:34:57",
            "driver": "e1000",
            "link": "down",
            "speed_mbps": None,  # -1 while the link is down
            "mtu": 1500,
        },
        {
            "name": "veth0",
            "mac": "0a:58:0a:00:00:01",
            "driver": None,  # virtual: no device
            "link": "up",  # operstate unknown, carrier 1
            "speed_mbps": None,
            "mtu": 1500,
        },
    ]


ONE = {
    "lldp": {
        "interface": {
            "eth0": {
                "via": "LLDP",
                "chassis": {
                    "tor-a1": {
                        "id": {"type": "mac", "value": "00:11:22:33:44:55"},
                        "mgmt-ip": ["10.0.0.2", "fe80::1"],
                    }
                },
                "port": {"id": {"type": "ifname", "value": "Ethernet12"}, "descr": "rack 3 u7"},
            }
        }
    }
}
TWO = {
    "lldp": {
        "interface": [
            {"eth0": ONE["lldp"]["interface"]["eth0"]},
            {
                "eth1": {
                    "chassis": {"id": {"type": "mac", "value": "00:11:22:33:44:66"}},
                    "port": {"id": {"type": "mac", "value": "00:11:22:33:44:67"}},
                }
            },
        ]
    }
}
TOR = {
    "interface": "eth0",
    "chassis_id": "00:11:22:33:44:55",
    "chassis_name": "tor-a1",
    "port_id": "Ethernet12",
    "port_description": "rack 3 u7",
    "management_ip": "10.0.0.2",
}


def test_lldp_one_interface_is_an_object():
    assert parse_lldp(json.dumps(ONE)) == [TOR]


def test_lldp_several_interfaces_are_a_list_and_a_chassis_may_be_nameless():
    second = {
        "interface": "eth1",
        "chassis_id": "00:11:22:33:44:66",
        "chassis_name": None,
        "port_id": "00:11:22:33:44:67",
        "port_description": None,
        "management_ip": None,
    }
    assert parse_lldp(json.dumps(TWO)) == [TOR, second]


@pytest.mark.parametrize(
    "text", ["", "not json", "[]", '{"lldp": {}}', '{"lldp": {"interface": 3}}', '{"lldp": []}']
)
def test_lldp_nothing_usable_is_no_neighbours(text):
    assert parse_lldp(text) == []


def test_lldp_runs_lldpcli_only_when_installed():
    calls = []

    def run(argv):
        calls.append(list(argv))
        return 0, json.dumps(ONE)

    assert read_lldp(run, which=lambda name: None) == []
    assert calls == []
    assert read_lldp(run, which=lambda name: f"/usr/sbin/{name}") == [TOR]
    assert calls == [["/usr/sbin/lldpcli", "-f", "json", "show", "neighbors"]]
    assert read_lldp(lambda argv: (1, ""), which=lambda name: "/x") == []


def test_collect_puts_it_together(roots):
    inventory = collect(roots, run=lambda argv: (0, json.dumps(ONE)), which=lambda n: "/x")
    assert set(inventory) == {"system", "cpus", "memory", "disks", "nics", "lldp", "ssh_host_keys"}
    assert inventory["system"]["uuid"] == GUID and inventory["lldp"] == [TOR]
    json.dumps(inventory)  # plain JSON all the way down


def test_dmi_can_come_from_elsewhere(roots, tmp_path):
    (tmp_path / "dmi").mkdir()
    (tmp_path / "dmi" / "product_uuid").write_text(BOOT_ID + "\n")
    moved = Roots(sys=roots.sys, proc=roots.proc, dev=roots.dev, dmi=tmp_path / "dmi")
    assert read_system(moved) == {"uuid": BOOT_ID, "serial": None, "vendor": None, "product": None}


ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGvc0ZKh3jzXbaYbjzH9LMF7DNqYkO4WN5vR2f3d0m1Q"


def test_the_host_keys_of_this_boot_are_reported_without_comments(tmp_path):
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    (ssh / "ssh_host_rsa_key.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB root@x\n")
    (ssh / "ssh_host_ed25519_key.pub").write_text(ED25519 + " root@node\n")
    (ssh / "ssh_host_ed25519_key").write_text("PRIVATE KEY, never read\n")
    (ssh / "ssh_host_bogus_key.pub").write_text("not-a-key AAAA\n")
    keys = read_ssh_host_keys(Roots(sys=tmp_path, ssh=ssh))
    assert keys == [ED25519, "ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB"]
    assert read_ssh_host_keys(Roots(sys=tmp_path, ssh=tmp_path / "none")) == []

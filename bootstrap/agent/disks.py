"""Block devices from ``/sys/block``, and whether each is empty.

A disk is *empty* when it has no partitions, nothing stacked on it (``holders``:
device-mapper, LVM, md) and no signature we recognise in its first or last
MiB: partition tables, filesystems, LVM, Ceph BlueStore, md RAID, LUKS, swap,
ZFS. Like ``blkid``/``ceph-volume``, data we do not recognise does not make a
disk non-empty; a disk that is all zeros at both ends is empty. A disk that
cannot be read reports ``empty: null``.

Which devices count: everything under ``/sys/block`` except RAM disks, zram,
optical drives, device-mapper and md devices, floppies and zero-sized devices
(``SKIP_PREFIXES``). Loop devices count when they have a backing file and are
writable -- the lab's netns machines get loop devices as data disks, while
the image's own squashfs loop is read-only. ``only`` restricts the list to
named devices (``--disks`` / ``METALSEED_AGENT_DISKS``), for a machine that
sees devices that are not its own (a netns machine sees the host's ``/sys``).

``detect_signature`` is pure; ``read_disks`` does the reading.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .sysfs import clean, read_int, read_text

log = logging.getLogger(__name__)

MIB = 1024 * 1024
SECTOR = 512  # /sys/block/*/size is in 512-byte sectors, whatever the device's own
SKIP_PREFIXES = ("ram", "zram", "sr", "dm-", "md", "fd")
MAX_DISKS = 256

_MD_MAGIC = struct.pack("<I", 0xA92B4EFC)
_ZFS_UBERBLOCK = struct.pack("<Q", 0x00BAB10C)


def _at(buf: bytes, offset: int, magic: bytes) -> bool:
    return buf[offset : offset + len(magic)] == magic


def _head_signature(head: bytes) -> str | None:
    """What the first MiB of a device holds (most specific first)."""
    if head.startswith(b"bluestore block device"):
        return "ceph_bluestore"
    for sector in range(4):  # LVM's label is in one of the first four sectors
        if _at(head, sector * 512, b"LABELONE") and _at(head, sector * 512 + 24, b"LVM2 001"):
            return "LVM2_member"
    if head.startswith(b"LUKS\xba\xbe") or head.startswith(b"SKUL\xba\xbe"):
        return "crypto_LUKS"
    if _at(head, 0, _MD_MAGIC) or _at(head, 4096, _MD_MAGIC):  # md 1.1 / 1.2
        return "linux_raid_member"
    if _at(head, 1024 + 56, b"\x53\xef"):
        return "ext4"
    if head.startswith(b"XFSB"):
        return "xfs"
    if _at(head, 65536 + 64, b"_BHRfS_M"):
        return "btrfs"
    if _at(head, 1024, b"\x10\x20\xf5\xf2"):
        return "f2fs"
    if head.startswith(b"hsqs"):
        return "squashfs"
    if _at(head, 32769, b"CD001"):
        return "iso9660"
    for page in (4096, 8192, 16384, 65536):
        if _at(head, page - 10, b"SWAPSPACE2") or _at(head, page - 10, b"SWAP-SPACE"):
            return "swap"
    if _at(head, 3, b"NTFS    "):
        return "ntfs"
    if _at(head, 3, b"EXFAT   "):
        return "exfat"
    if _at(head, 54, b"FAT1") or _at(head, 82, b"FAT32"):
        return "vfat"
    if _at(head, 512, b"EFI PART") or _at(head, 4096, b"EFI PART"):
        return "gpt"
    for offset in range(128 * 1024, min(len(head), 256 * 1024), 1024):  # ZFS label 0 uberblocks
        if _at(head, offset, _ZFS_UBERBLOCK):
            return "zfs_member"
    if _at(head, 510, b"\x55\xaa"):
        entries = head[446:510]
        if any(entries[i + 4] for i in range(0, 64, 16)):  # a partition entry with a type
            return "dos"
    return None


def _tail_signature(tail: bytes) -> str | None:
    """What the last MiB holds: GPT's backup header, md 0.90/1.0 superblocks, ZFS labels."""
    if len(tail) >= 512 and tail[-512:].startswith(b"EFI PART"):
        return "gpt"
    for offset in range(0, len(tail) - 3, 4096):
        if _at(tail, offset, _MD_MAGIC):
            return "linux_raid_member"
    for offset in range(max(0, len(tail) - 256 * 1024 + 128 * 1024), len(tail), 1024):
        if _at(tail, offset, _ZFS_UBERBLOCK):  # ZFS label 2/3 at the end
            return "zfs_member"
    return None


def detect_signature(head: bytes, tail: bytes) -> str | None:
    """The name of what sits at either end of a device (blkid's names), or None."""
    if not head.strip(b"\0") and not tail.strip(b"\0"):
        return None  # all zeros: nothing there
    return _head_signature(head) or _tail_signature(tail)


def _read_ends(path: Path, size: int) -> tuple[bytes, bytes]:
    """The first and last MiB of a device (fewer bytes for a small one)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, min(MIB, size), 0)
        tail_start = max(0, size - MIB)
        tail = os.pread(fd, size - tail_start, tail_start) if size else b""
    finally:
        os.close(fd)
    return head, tail


def _serial(block: Path) -> str | None:
    """virtio-blk: ``serial``; NVMe and some SCSI: ``device/serial``; SCSI: VPD page 0x80."""
    for candidate in (block / "serial", block / "device" / "serial"):
        value = read_text(candidate)
        if value:
            return value
    try:
        page = (block / "device" / "vpd_pg80").read_bytes()
    except OSError:
        return None
    if len(page) > 4 and page[1] == 0x80:
        value = page[4 : 4 + page[3]].decode("ascii", "replace").strip()
        return value or None
    return None


def _wwn(block: Path) -> str | None:
    for candidate in (block / "wwid", block / "device" / "wwid"):
        value = read_text(candidate)
        if value:
            return value
    return None


def counted(name: str, block: Path, only: Collection[str] | None) -> bool:
    """Is ``/sys/block/NAME`` one of this machine's disks?"""
    if only is not None:
        return name in only
    if name.startswith(SKIP_PREFIXES):
        return False
    if name.startswith("loop"):  # a lab data disk, not the image's own read-only loop
        backed = read_text(block / "loop" / "backing_file") is not None
        return backed and read_int(block / "ro") == 0
    return True


def partitions(block: Path, name: str) -> list[str]:
    try:
        entries = sorted(p.name for p in block.iterdir() if p.name.startswith(name))
    except OSError:
        return []
    return [p for p in entries if (block / p / "partition").exists()]


def read_disk(name: str, block: Path, dev_root: Path) -> dict[str, Any] | None:
    """One disk's inventory entry; None for a zero-sized device (an empty slot)."""
    sectors = read_int(block / "size") or 0
    if sectors <= 0:
        return None
    size = sectors * SECTOR
    parts = partitions(block, name)
    try:
        holders = sorted(p.name for p in (block / "holders").iterdir())
    except OSError:
        holders = []
    signature: str | None = None
    empty: bool | None
    try:
        head, tail = _read_ends(dev_root / name, size)
    except OSError as exc:
        log.warning("disk %s: cannot read it (%s); its emptiness is unknown", name, exc.strerror)
        empty = None
    else:
        signature = detect_signature(head, tail)
        empty = not parts and not holders and signature is None
    return {
        "name": name,
        "size_bytes": size,
        "rotational": read_int(block / "queue" / "rotational") == 1,
        "removable": read_int(block / "removable") == 1,
        "serial": clean(_serial(block)),
        "wwn": clean(_wwn(block)),
        "model": clean(read_text(block / "device" / "model")),
        "partitions": len(parts),
        "holders": [clean(h) for h in holders[:32]],
        "signature": signature,
        "empty": empty,
    }


def read_disks(
    sys_root: Path, dev_root: Path, only: Collection[str] | None = None
) -> list[dict[str, Any]]:
    """The machine's disks, by name."""
    base = sys_root / "block"
    try:
        names = sorted(p.name for p in base.iterdir())
    except OSError as exc:
        log.warning("cannot list %s: %s", base, exc.strerror)
        return []
    disks = []
    for name in names:
        block = base / name
        if not counted(name, block, only):
            continue
        entry = read_disk(name, block, dev_root)
        if entry is not None:
            disks.append(entry)
        if len(disks) >= MAX_DISKS:
            log.warning("more than %d disks: the rest are left out", MAX_DISKS)
            break
    return disks

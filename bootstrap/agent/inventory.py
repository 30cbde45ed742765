"""What this machine is: DMI, CPUs, memory, disks, NICs, LLDP neighbours, from /sys and /proc.

Every reader takes its root (``Roots``), so tests build fixture trees in a
temporary directory; ``collect`` puts the whole inventory together. Strings
from firmware and drivers are cleaned (``clean``) before they go anywhere:
printable, stripped, at most ``MAX_STR`` characters. The shape is the one the
seed validates (``bootstrap/boot/enlist.py``)::

    {"system": {"uuid", "serial", "vendor", "product"},
     "cpus": {"count", "model"},
     "memory": {"bytes"},
     "disks": [{"name", "size_bytes", "rotational", "removable", "serial", "wwn", "model",
                "partitions", "holders", "signature", "empty"}],
     "nics": [{"name", "mac", "driver", "link", "speed_mbps", "mtu"}],
     "lldp": [{"interface", "chassis_id", "chassis_name", "port_id", "port_description",
               "management_ip"}]}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import uuid as uuidlib
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from .disks import read_disks
from .sysfs import clean, read_int, read_text

log = logging.getLogger(__name__)

MAX_NICS = 256
MAX_NEIGHBOURS = 256
ARPHRD_ETHER = 1
LLDP_TIMEOUT = 10.0

#: runs a command, returns (exit status, stdout); injectable for tests
Runner = Callable[[Sequence[str]], tuple[int, str]]
_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


@dataclasses.dataclass(frozen=True)
class Roots:
    """Where /sys, /proc and /dev are (fixture trees in tests). ``dmi``: where the DMI
    files are when not under ``sys`` (a lab machine in a container has the host's)."""

    sys: Path = Path("/sys")
    proc: Path = Path("/proc")
    dev: Path = Path("/dev")
    dmi: Path | None = None
    ssh: Path = Path("/etc/ssh")  # this boot's SSH host keys (the seed pins them for the join)

    @property
    def dmi_dir(self) -> Path:
        return self.dmi or self.sys / "class" / "dmi" / "id"


def run_command(argv: Sequence[str], timeout: float = LLDP_TIMEOUT) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, proc.stdout


# -- system, CPUs, memory, boot id -----------------------------------------------------


def read_system(roots: Roots) -> dict[str, Any]:
    dmi = roots.dmi_dir
    uuid = None
    raw = read_text(dmi / "product_uuid")
    if raw:
        try:
            uuid = str(uuidlib.UUID(raw))
        except ValueError:
            log.warning("DMI product_uuid %r is not a UUID; sent as none", raw[:40])
    return {
        "uuid": uuid,
        "serial": clean(read_text(dmi / "product_serial")),
        "vendor": clean(read_text(dmi / "sys_vendor")),
        "product": clean(read_text(dmi / "product_name")),
    }


def read_cpus(roots: Roots) -> dict[str, Any]:
    try:
        text = (roots.proc / "cpuinfo").read_text(errors="replace")
    except OSError:
        return {"count": 0, "model": None}
    count, model = 0, None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep:
            continue
        if key == "processor":
            count += 1
        elif model is None and key in ("model name", "cpu model", "cpu"):
            model = clean(value)
    return {"count": count, "model": model}


def read_memory(roots: Roots) -> dict[str, Any]:
    try:
        text = (roots.proc / "meminfo").read_text()
    except OSError:
        return {"bytes": 0}
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                unit = 1024 if len(parts) < 3 or parts[2].lower() == "kb" else 1
                return {"bytes": int(parts[1]) * unit}
    return {"bytes": 0}


def read_boot_id(roots: Roots) -> str:
    """This boot's random id; the seed tells a retry of this boot from a replay by it."""
    raw = read_text(roots.proc / "sys" / "kernel" / "random" / "boot_id")
    if raw is None:
        raise OSError(f"cannot read {roots.proc}/sys/kernel/random/boot_id")
    return str(uuidlib.UUID(raw))


# -- NICs ------------------------------------------------------------------------------------


def read_nic(name: str, path: Path) -> dict[str, Any] | None:
    """One interface's entry; None for loopback and non-Ethernet interfaces."""
    if name == "lo" or read_int(path / "type") != ARPHRD_ETHER:
        return None
    mac = (read_text(path / "address") or "").lower()
    if not _MAC.match(mac):
        return None
    try:
        driver = clean(os.path.basename(os.readlink(path / "device" / "driver")))
    except OSError:
        driver = None  # a virtual interface (veth, bridge, bond) has no device
    operstate = read_text(path / "operstate")
    up = operstate == "up" or (operstate == "unknown" and read_int(path / "carrier") == 1)
    speed = read_int(path / "speed")  # reading it fails (EINVAL) while the link is down
    return {
        "name": clean(name),
        "mac": mac,
        "driver": driver,
        "link": "up" if up else "down",
        "speed_mbps": speed if speed is not None and speed > 0 else None,
        "mtu": read_int(path / "mtu"),
    }


def read_nics(roots: Roots) -> list[dict[str, Any]]:
    base = roots.sys / "class" / "net"
    try:
        names = sorted(p.name for p in base.iterdir())
    except OSError as exc:
        log.warning("cannot list %s: %s", base, exc.strerror)
        return []
    nics = [nic for name in names if (nic := read_nic(name, base / name)) is not None]
    return nics[:MAX_NICS]


# -- LLDP ------------------------------------------------------------------------------------


def _named(raw: Any) -> tuple[str | None, dict]:
    """lldpcli's ``{"NAME": {...}}`` -> (NAME, inner); a flat object -> (None, it)."""
    if isinstance(raw, list):
        raw = raw[0] if raw else {}
    if not isinstance(raw, dict):
        return None, {}
    if len(raw) == 1:
        ((key, inner),) = raw.items()
        if isinstance(inner, dict) and key not in ("id", "descr", "mgmt-ip"):
            return key, inner
    return None, raw


def _value(item: Any) -> str | None:
    """lldpcli's ``{"type": "mac", "value": "..."}`` or a plain string -> the string."""
    if isinstance(item, list):
        item = item[0] if item else None
    if isinstance(item, dict):
        item = item.get("value")
    return clean(item) if isinstance(item, str | int) else None


def parse_lldp(text: str) -> list[dict[str, Any]]:
    """``lldpcli -f json show neighbors`` output -> neighbour entries. Pure; bad JSON -> [].

    lldpcli gives ``"interface"`` as an object for one interface and a list of
    one-key objects for several; a chassis with a system name is nested under
    that name, one without is flat.
    """
    try:
        data = json.loads(text)
    except ValueError:
        return []
    lldp = data.get("lldp") if isinstance(data, dict) else None
    interfaces = lldp.get("interface") if isinstance(lldp, dict) else None
    if isinstance(interfaces, dict):
        interfaces = [{name: value} for name, value in interfaces.items()]
    if not isinstance(interfaces, list):
        return []
    found = []
    for item in interfaces:
        ifname, info = _named(item)
        if ifname is None:
            continue
        chassis_name, chassis = _named(info.get("chassis"))
        port = info.get("port") if isinstance(info.get("port"), dict) else {}
        found.append(
            {
                "interface": clean(ifname),
                "chassis_id": _value(chassis.get("id")),
                "chassis_name": clean(chassis_name),
                "port_id": _value(port.get("id")),
                "port_description": _value(port.get("descr")),
                "management_ip": _value(chassis.get("mgmt-ip")),
            }
        )
    return found[:MAX_NEIGHBOURS]


def read_lldp(run: Runner = run_command, which: Callable[[str], str | None] = shutil.which):
    """LLDP neighbours lldpd has seen so far ([] without lldpcli, or when it fails)."""
    lldpcli = which("lldpcli")
    if lldpcli is None:
        return []
    status, out = run([lldpcli, "-f", "json", "show", "neighbors"])
    if status != 0:
        log.warning("lldpcli failed (exit %d); no LLDP neighbours reported", status)
        return []
    return parse_lldp(out)


# -- all of it -------------------------------------------------------------------------------


HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                  "ecdsa-sha2-nistp521", "ssh-rsa")  # fmt: skip
MAX_HOST_KEYS = 4


def read_ssh_host_keys(roots: Roots) -> list[str]:
    """``TYPE BASE64`` of each SSH host public key (comments dropped), ed25519 first."""
    keys: list[str] = []
    try:
        paths = sorted(roots.ssh.glob("ssh_host_*_key.pub"))
    except OSError:
        return keys
    for path in paths:
        try:
            fields = path.read_text().split()
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc.strerror)
            continue
        if len(fields) >= 2 and fields[0] in HOST_KEY_TYPES:
            keys.append(f"{fields[0]} {fields[1]}")
    keys.sort(key=lambda k: HOST_KEY_TYPES.index(k.split()[0]))
    return keys[:MAX_HOST_KEYS]


def collect(
    roots: Roots,
    *,
    disks_only: Collection[str] | None = None,
    run: Runner = run_command,
    which: Callable[[str], str | None] = shutil.which,
) -> dict[str, Any]:
    """The machine's inventory, as the seed expects it."""
    return {
        "system": read_system(roots),
        "cpus": read_cpus(roots),
        "memory": read_memory(roots),
        "disks": read_disks(roots.sys, roots.dev, disks_only),
        "nics": read_nics(roots),
        "lldp": read_lldp(run, which),
        "ssh_host_keys": read_ssh_host_keys(roots),
    }

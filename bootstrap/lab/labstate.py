"""The lab's record of everything it made: ``STATE_DIR/lab/lab.json``.

Every namespace, process, loop device and mount is written here *before* it
is created (an intent log), and the file is replaced atomically on every
change. So ``metalseed lab down`` can remove all of it from the record alone
-- also after the process that made the lab was killed halfway through --
and never touches anything the lab did not make: processes are stopped by
their recorded PID only after checking that PID still runs the recorded
command, namespaces by their recorded names.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LAB_FILE = "lab.json"
LOCK_FILE = "lab.lock"


@dataclasses.dataclass
class Machine:
    name: str
    kind: str  # qemu | netns | fake
    uuid: str  # SMBIOS UUID == its BMC's system GUID
    mac: str
    bmc: str  # address:port of its simulated BMC
    netns: str = ""  # the namespace its NIC lives in (qemu: the switch; netns: its own)
    disks: list[int] = dataclasses.field(default_factory=list)  # MiB each
    memory: int = 0  # MiB (qemu)


@dataclasses.dataclass
class Process:
    name: str
    pid: int
    tag: str  # a string its /proc/PID/cmdline must contain for it to be ours
    log: str = ""


@dataclasses.dataclass
class LabState:
    id: str
    created: float
    prov_net: str
    bmc_net: str
    namespaces: list[str] = dataclasses.field(default_factory=list)
    processes: list[Process] = dataclasses.field(default_factory=list)
    machines: list[Machine] = dataclasses.field(default_factory=list)
    loops: list[str] = dataclasses.field(default_factory=list)  # /dev/loopN
    mounts: list[str] = dataclasses.field(default_factory=list)
    bmc_batches: int = 0
    #: the seed's store was made by this lab (none existed): ``lab down`` removes it, so
    #: the next lab's machines do not meet a cluster whose disks are gone
    owns_store: bool = False
    #: the lab's seed joins enlisted machines into Ceph (``lab up --no-join``: off)
    auto_join: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LabState:
        doc = dict(doc)
        doc["processes"] = [Process(**p) for p in doc.get("processes", [])]
        doc["machines"] = [Machine(**m) for m in doc.get("machines", [])]
        return cls(**doc)

    def ns(self, role: str) -> str:
        return f"msl{self.id}-{role}"

    def machine(self, ref: str) -> Machine | None:
        return next((m for m in self.machines if ref in (m.name, m.uuid, m.mac)), None)


class LabStore:
    """``lab.json`` under a directory, read and replaced under a lock."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def path(self) -> Path:
        return self.dir / LAB_FILE

    def load(self) -> LabState | None:
        try:
            return LabState.from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{self.path}: not a lab record ({exc})") from None

    def save(self, state: LabState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / LOCK_FILE).open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield


# -- processes, by PID only ---------------------------------------------------------


def runs(process: Process) -> bool:
    """True if the recorded PID is alive and still runs the recorded command."""
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        stat = Path(f"/proc/{process.pid}/stat").read_text()
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return False
    return process.tag.encode() in cmdline


def stop(process: Process, grace: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL, the recorded process if it is still ours. True if it ran."""
    if not runs(process):
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.waitpid(process.pid, os.WNOHANG)  # reap it if it is our child
            except ChildProcessError:
                pass
            if not runs(process):
                return True
            time.sleep(0.05)
    return True

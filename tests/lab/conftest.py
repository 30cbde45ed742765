"""Lab test fixtures and helpers: the QEMU fixtures, and what a torn-down lab must not leave."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.vm.conftest import kernel_cache, qemu_available  # noqa: F401


def lab_namespaces(lab_id: str) -> list[str]:
    """The network namespaces of lab ``lab_id`` that still exist."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"msl{lab_id}-")]


def processes_mentioning(text: str) -> list[int]:
    """Live processes (not zombies, not this one) whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids

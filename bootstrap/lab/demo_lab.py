"""The lab part of ``make demo``: a rack of 3 netns machines and 1 QEMU VM, zero touch.

``metalseed lab up`` builds the provisioning and BMC segments in namespaces
made for the demo, racks the machines (powered off, each behind a simulated
BMC) and starts the seed daemon; from there nothing is typed: the seed
sweeps the BMC segment, enrolls and rotates each BMC, sets PXE, powers the
machine on and serves its netboot; each machine boots the hardened node
image (the netns machines with their own systemd under systemd-nspawn, the
VM with real iPXE firmware under QEMU) and its agent enlists with the
machine's inventory. The demo prints the node table, one inventory and the
timings, then ``lab down`` removes everything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

Run = Callable[..., float]
ENLIST_TIMEOUT = 900.0
MACHINES = ("netns=3", "qemu=1")


def why_not() -> str:
    """Why the lab demo cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "it needs root (network namespaces, systemd-nspawn, QEMU taps)"
    for tool in ("qemu-system-x86_64", "systemd-nspawn", "debootstrap", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup)"
    return ""


def _status(ms: list[str]) -> dict:
    out = subprocess.run([*ms, "lab", "status", "--json"], capture_output=True, text=True)
    return json.loads(out.stdout or "{}")


def lab_demo(run: Run, me: list[str], work: Path) -> dict[str, float]:
    """Run the lab demo; returns its timings. Raises RuntimeError on a failed step."""
    state = work / "lab-state"
    ms = [*me, "--state-dir", str(state)]
    timings: dict[str, float] = {}
    print("\n== the lab: 3 netns machines and 1 QEMU VM, found and booted by the seed ==")
    print("(the first run builds the node image: a few minutes; later runs use the cache)")
    image = subprocess.run([*ms, "image", "build"], text=True)
    if image.returncode != 0:
        raise RuntimeError("metalseed image build failed")
    argv = [*ms, "lab", "up", "--disks", "1x2G", "--memory", "2048", "--image", "current"]
    for spec in MACHINES:
        argv += ["--machines", spec]
    started = time.monotonic()
    try:
        timings["lab up (segments, BMCs, seed)"] = run(argv)
        seen: dict[str, float] = {}
        deadline = time.monotonic() + ENLIST_TIMEOUT
        while True:
            status = _status(ms)
            for row in status.get("machines", []):
                if row["state"] == "enlisted" and row["machine"] not in seen:
                    seen[row["machine"]] = time.monotonic() - started
                    print(
                        f"  {seen[row['machine']]:6.1f} s  {row['machine']} enlisted as "
                        f"{row['node']} ({row['ip']})",
                        flush=True,
                    )
            if len(seen) == len(status.get("machines", [])) and seen:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all machines enlisted in {ENLIST_TIMEOUT:.0f} s: {status}")
            time.sleep(1)
        for machine, seconds in sorted(seen.items(), key=lambda x: x[1]):
            timings[f"lab up -> {machine} enlisted"] = seconds
        run([*ms, "lab", "status"])
        run([*ms, "nodes", "list"])
        vm = next(r for r in status["machines"] if r["kind"] == "qemu")
        run([*ms, "nodes", "show", vm["node"]])
        return timings
    finally:
        run([*ms, "lab", "down"])

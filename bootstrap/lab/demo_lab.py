"""The lab part of ``make demo``: the whole road, zero touch, to a Ceph cluster that grows.

``metalseed lab up`` builds the provisioning and BMC segments in namespaces
made for the demo, racks 4 netns machines (powered off, each behind a
simulated BMC, one 10 GiB data disk each) and starts the seed daemon; from
there nothing is typed: the seed sweeps the BMC segment, enrolls and rotates
each BMC, sets PXE, powers the machine on and serves its netboot; each
machine boots the hardened node image under systemd-nspawn and its agent
enlists; the seed's join stage runs the Ansible roles and the four become a
Ceph cluster (3 mons, 3 mgrs, 4 OSDs). Then a 5th machine is racked -- power
and BMC only -- and joins on its own. The demo prints the cluster status and
the capacity before and after, the timings, then ``lab down`` removes
everything.
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
TIMEOUT = 900.0
DISKS = "1x10G"
GIB = 1 << 30


def why_not() -> str:
    """Why the lab demo cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "it needs root (network namespaces, systemd-nspawn, loop devices)"
    for tool in ("systemd-nspawn", "debootstrap", "ip", "ceph"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup)"
    return ""


def _json(argv: list[str]) -> dict:
    out = subprocess.run(argv, capture_output=True, text=True)
    try:
        return json.loads(out.stdout or "{}")
    except ValueError:
        return {}


class _Watch:
    """Polls `lab status`: when each machine first reached enlisted and active."""

    def __init__(self, ms: list[str], started: float) -> None:
        self.ms = ms
        self.started = started
        self.seen: dict[tuple[str, str], float] = {}

    def poll(self) -> list[dict]:
        rows = _json([*self.ms, "lab", "status", "--json"]).get("machines", [])
        for row in rows:
            for state in ("enlisted", "active"):
                reached = row["state"] == state or (state == "enlisted" and row["state"] in
                                                    ("joining", "active"))  # fmt: skip
                key = (row["machine"], state)
                if reached and key not in self.seen:
                    self.seen[key] = time.monotonic() - self.started
                    print(f"  {self.seen[key]:6.1f} s  {row['machine']} {state} as "
                          f"{row['node']} ({row['ip']})", flush=True)  # fmt: skip
            if row["state"] == "failed":
                raise RuntimeError(f"{row['machine']} failed: {row}")
        return rows

    def until_active(self, names: set[str]) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            rows = self.poll()
            if names <= {r["machine"] for r in rows if r["state"] == "active"}:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all active in {TIMEOUT:.0f} s: {rows}")
            time.sleep(1)


def _cluster(ms: list[str], want_osds: int) -> dict:
    deadline = time.monotonic() + 180
    while True:
        doc = _json([*ms, "lab", "seed", "cluster", "status", "--json"])
        if doc.get("health") == "HEALTH_OK" and doc.get("osds_up") == want_osds == doc.get(
            "osds_in"
        ):
            return doc
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster is not HEALTH_OK with {want_osds} OSDs: {doc}")
        time.sleep(2)


def lab_demo(run: Run, me: list[str], work: Path) -> dict[str, float]:
    """Run the lab demo; returns its timings. Raises RuntimeError on a failed step."""
    state = work / "lab-state"
    ms = [*me, "--state-dir", str(state)]
    timings: dict[str, float] = {}
    print("\n== the lab: 4 netns machines found, booted and joined into Ceph by the seed ==")
    print("(the first run builds the node image: a few minutes; later runs use the cache)")
    image = subprocess.run([*ms, "image", "build"], text=True)
    if image.returncode != 0:
        raise RuntimeError("metalseed image build failed")
    started = time.monotonic()
    try:
        argv = [*ms, "lab", "up", "--machines", "netns=4", "--disks", DISKS, "--image", "current"]
        timings["lab up (segments, BMCs, seed)"] = run(argv)
        watch = _Watch(ms, started)
        first = {f"netns{i}" for i in range(1, 5)}
        watch.until_active(first)
        before = _cluster(ms, 4)
        timings["lab up -> 4 machines active, HEALTH_OK"] = time.monotonic() - started
        run([*ms, "lab", "seed", "cluster", "status"])

        print("\n== a 5th machine is racked: power and BMC cables only ==")
        grown = time.monotonic()
        watch.started = grown
        run([*ms, "lab", "up", "--machines", "netns=1", "--disks", DISKS])
        watch.until_active({"netns5"})
        after = _cluster(ms, 5)
        deadline = time.monotonic() + 60
        while after["raw_bytes"] <= before["raw_bytes"] and time.monotonic() < deadline:
            time.sleep(2)  # the new OSD's size arrives with its first stats report
            after = _cluster(ms, 5)
        timings["racked -> 5th machine active, its OSD up and in"] = time.monotonic() - grown
        run([*ms, "lab", "seed", "cluster", "status"])
        run([*ms, "nodes", "list"])
        print(
            f"\ncapacity: raw {before['raw_bytes'] / GIB:.1f} GiB -> {after['raw_bytes'] / GIB:.1f}"
            f" GiB (+{(after['raw_bytes'] - before['raw_bytes']) / GIB:.1f} GiB for a 10 GiB disk)"
            f", usable {before['usable_bytes'] / GIB:.1f} -> {after['usable_bytes'] / GIB:.1f} GiB"
            f" (replicated size 3)"
        )
        for (machine, what), seconds in sorted(watch.seen.items(), key=lambda x: x[0]):
            if machine != "netns5":
                timings[f"lab up -> {machine} {what}"] = seconds
        for what in ("enlisted", "active"):
            if ("netns5", what) in watch.seen:
                timings[f"racked -> netns5 {what}"] = watch.seen[("netns5", what)]
        return timings
    finally:
        run([*ms, "lab", "down"])

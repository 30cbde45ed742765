"""Join: power-on -> OSD up and in, for 1 machine and for 4 machines racked at once.

A lab of netns machines booting the real node image, each with one 10 GiB data
disk. Three machines are racked first and bootstrap the cluster (timed too,
as its own row); then one machine is racked, then four at once. For every
machine: the time from the seed's power-on (its ``booting`` event: PXE set and
power on through the BMC) to its OSD being up *and* in, as a watcher inside
the seed's namespace sees it (``metalseed cluster watch``, 0.25 s polls of the
OSD map), split into its stages; the raw capacity its host added over its
disk's size; and the slowest tasks of the join run.

No peer tool does this road here: cephadm needs container images from a
registry (no internet), MAAS/Ironic do not make Ceph clusters. The by-hand
figures in ``../shared/notes/ceph-facts.md`` (an OSD mkfs+start on loopback)
are the floor the roles are compared with in the notes.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from .common import (
    REPO,
    BenchError,
    Options,
    Row,
    Section,
    fmt_s,
    metalseed_argv,
    progress,
    verdict,
)
from .common import workdir as _workdir

TARGET_SECONDS = 30.0
DISK_GIB = 10
GIB = 1 << 30


class Lab:
    def __init__(self, state: Path) -> None:
        self.state = state

    def ms(self, *argv: str, timeout: float = 900, check: bool = True):
        proc = subprocess.run(
            [*metalseed_argv(), "--state-dir", str(self.state), *argv],
            capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise BenchError(f"metalseed {' '.join(argv)}: {proc.stderr[-1500:]}")
        return proc

    def rows(self) -> dict[str, dict]:
        doc = json.loads(self.ms("lab", "status", "--json").stdout or "{}")
        self.lab_id = doc.get("lab", "")
        return {r["machine"]: r for r in doc.get("machines", [])}

    def seed_argv(self, *argv: str) -> list[str]:
        config = str(self.state / "lab" / "seed.toml")
        return ["ip", "netns", "exec", f"msl{self.lab_id}-seed", *metalseed_argv(),
                "--config", config, *argv]  # fmt: skip

    def wait_active(self, names: set[str], timeout: float = 600) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()
            failed = {n: r for n, r in rows.items() if n in names and r["state"] == "failed"}
            if failed:
                raise BenchError(f"machines failed to join: {failed}")
            if all(rows.get(n, {}).get("state") == "active" for n in names):
                return rows
            time.sleep(1)
        raise BenchError(f"not active within {timeout:.0f} s: {names}")

    def events(self, node: str) -> list[dict]:
        out = self.ms("events", node, "--json", "--limit", "1000").stdout
        return json.loads(out or "[]")


def _state_times(events: list[dict]) -> dict[str, float]:
    """The last time the node entered each state (``booting`` = the power-on)."""
    times: dict[str, float] = {}
    for e in events:
        if e.get("kind") == "state":
            target = (e.get("data") or {}).get("to")
            if target:
                times[target] = float(e["ts"])
    return times


def _osd_up_in(watch: Path, host: str) -> float | None:
    for line in watch.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if any(o["host"] == host and o["up"] and o["in"] for o in doc["osds"].values()):
            return float(doc["t"])
    return None


def _slowest_tasks(state: Path, limit: int = 6) -> list[str]:
    runs = sorted(p for p in (state / "join").iterdir() if p.is_dir())
    if not runs:
        return []
    per_task: dict[str, list[float]] = collections.defaultdict(list)
    for path in runs[-1].glob("artifacts/*/job_events/*.json"):
        try:
            event = json.loads(path.read_text())
        except ValueError:
            continue
        data = event.get("event_data") or {}
        if event.get("event") in ("runner_on_ok", "runner_on_failed") and "duration" in data:
            task = f"{data.get('role', '')}: {data.get('task', '')}".strip(": ")
            per_task[task].append(float(data["duration"]))
    ranked = sorted(per_task.items(), key=lambda kv: -max(kv[1]))[:limit]
    return [f"- {task}: {max(d):.1f} s (slowest host)" for task, d in ranked]


def _measure(lab: Lab, names: list[str], watch: Path) -> list[dict]:
    rows = lab.wait_active(set(names))
    deadline = time.monotonic() + 120
    out = []
    for name in names:
        node = rows[name]["node"]
        while (up := _osd_up_in(watch, node)) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        times = _state_times(lab.events(node))
        out.append({"machine": name, "node": node, "up_in": up, **times})
    return out


def _stage_rows(label: str, measured: list[dict]) -> list[Row]:
    totals = [m["up_in"] - m["booting"] for m in measured if m.get("up_in") and "booting" in m]
    if len(totals) < len(measured):
        return [Row(f"{label}: OSD up and in", f"<= {TARGET_SECONDS:g} s", "not every OSD came up",
                    result=verdict(False))]  # fmt: skip
    worst = max(totals)
    rows = [
        Row(
            f"{label}: power-on -> OSD up and in (slowest machine)",
            f"<= {TARGET_SECONDS:g} s per machine",
            fmt_s(worst),
            result=verdict(worst <= TARGET_SECONDS),
        )
    ]
    if len(totals) > 1:
        rows.append(Row(f"{label}: median over machines", "—", fmt_s(statistics.median(totals))))

    def stage(a: str, b: str) -> str:
        spans = [m[b] - m[a] for m in measured if a in m and b in m]
        return fmt_s(max(spans)) if spans else "—"

    rows += [
        Row(f"{label}: power-on -> enlisted (netboot, image, agent)", "—",
            stage("booting", "enlisted")),
        Row(f"{label}: enlisted -> join started (join.settle 3 s, batching)", "—",
            stage("enlisted", "joining")),
        Row(f"{label}: join run (Ansible roles) -> active", "—", stage("joining", "active")),
    ]  # fmt: skip
    return rows


def join(options: Options) -> Section:
    """Power-on -> OSD up/in for 1 and for 4 netns machines joining an existing cluster."""
    if os.geteuid() != 0:
        raise BenchError("the join benchmark needs root (namespaces, loop devices, nspawn)")
    section = Section("Join: power-on to OSD up and in (netns machines, real Ceph)")
    with _workdir("join") as tmp:
        state = tmp / "state"
        lab = Lab(state)
        # the node image is built (or taken from the cache) before anything is timed
        from bootstrap.image import build

        progress("join: making sure the node image is built")
        build.build_image(progress=lambda text, fraction: None)
        watcher = None
        try:
            started = time.time()
            progress("join: 3 machines bootstrap the cluster")
            lab.ms("lab", "up", "--machines", "netns=3", "--disks", f"1x{DISK_GIB}G")
            first = ["netns1", "netns2", "netns3"]
            lab.wait_active(set(first))
            bootstrap_s = time.time() - started
            watch = tmp / "watch.jsonl"
            with watch.open("w") as fh:
                watcher = subprocess.Popen(
                    lab.seed_argv("cluster", "watch"), stdout=fh, stderr=subprocess.DEVNULL
                )
            time.sleep(3)
            progress("join: 1 machine racked")
            lab.ms("lab", "up", "--machines", "netns=1", "--disks", f"1x{DISK_GIB}G")
            one = _measure(lab, ["netns4"], watch)
            four_names = ["netns5", "netns6", "netns7", "netns8"]
            if options.quick:
                four_names = four_names[:2]
            progress(f"join: {len(four_names)} machines racked at once")
            lab.ms("lab", "up", "--machines", f"netns={len(four_names)}", "--disks",
                   f"1x{DISK_GIB}G")  # fmt: skip
            four = _measure(lab, four_names, watch)
            status = json.loads(
                subprocess.run(lab.seed_argv("cluster", "status", "--json"), capture_output=True,
                               text=True, timeout=120, cwd=REPO).stdout or "{}"
            )  # fmt: skip
            slowest = _slowest_tasks(state)
        finally:
            if watcher is not None:
                watcher.terminate()
                watcher.wait(10)
            lab.ms("lab", "down", check=False, timeout=600)
    hosts = {h["host"]: h for h in status.get("hosts", [])}
    fractions = [
        hosts[m["node"]]["raw_bytes"] / (DISK_GIB * GIB) for m in one + four if m["node"] in hosts
    ]
    section.setup = [
        "`python -m bench.run --only join`: a lab (`metalseed lab up`) of netns machines "
        f"booting the real node image, one {DISK_GIB} GiB sparse data disk each; the lab's seed "
        "finds every machine over IPMI, netboots it, and joins it with no command "
        "(join.auto, join.settle = 3 s). 3 machines bootstrap the cluster; then 1 machine is "
        f"racked; then {len(four_names)} at once.",
        "Power-on: the node's `booting` event (PXE set and powered on through its BMC). OSD up "
        "and in: the first OSD map in which the host's OSD is both, seen by `metalseed "
        "cluster watch` in the seed's namespace (0.25 s polls).",
    ]
    section.rows = [
        Row(
            "3 machines: `lab up` -> all three active (bootstrap: mons, mgrs, OSDs, pools)",
            "—",
            fmt_s(bootstrap_s),
        ),  # fmt: skip
        *_stage_rows("1 machine", one),
        *_stage_rows(f"{len(four_names)} machines at once", four),
        Row(
            "raw capacity added per machine / its disk",
            ">= 95%",
            " ".join(f"{f:.1%}" for f in fractions) or "—",
            result=verdict(bool(fractions) and min(fractions) >= 0.95),
        ),
        Row("cluster health at the end", "HEALTH_OK", str(status.get("health"))),
    ]
    section.notes.append(
        "No peer row: cephadm pulls container images from a registry (unreachable here) and "
        "the netboot peers (MAAS, Ironic, Tinkerbell) do not build Ceph. For scale, "
        "`../shared/notes/ceph-facts.md` measured an OSD mkfs and start by hand on loopback "
        "at ~16 s for three in parallel on the same machine."
    )
    if slowest:
        section.notes.append("Where the join run's time went (the last run's slowest tasks):")
        section.notes.append("\n".join(slowest))
    return section


BENCHMARKS = {"join-osd": join}

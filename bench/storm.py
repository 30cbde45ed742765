"""The storm: 1,000 fake machines racked at once, found, powered on, booted and enlisted.

``metalseed lab up --machines fake=N --image callback`` on a fresh state
directory: one BMC simulator process serving N BMCs on the lab's BMC segment,
the seed daemon (``metalseed run``) sweeping that segment, and one fake-rack
process doing every machine's firmware steps for real (DHCP as PXE and as
iPXE, TFTP, HTTP, checksums) and its enlist. Measured from ``lab up`` until
every machine's node is ``enlisted``: wall time, the seed's peak RSS, any
machine not enlisted, any node found twice; and where the seed's time goes
(py-spy, when installed). No stock tool does this whole road, so there is no
peer row; the DHCP, TFTP and HTTP parts are compared with dnsmasq, tftpd-hpa
and nginx in their own sections.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from .common import BenchError, Options, Row, Section, fmt_s, metalseed_argv, progress, verdict
from .common import workdir as _workdir
from .netboot import profile, profile_summary

TARGET_SECONDS = 600.0


def _status(state: Path) -> dict:
    out = subprocess.run(
        [*metalseed_argv(), "--state-dir", str(state), "lab", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(out.stdout or "{}")


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _pid_of(state: Path, name: str) -> int | None:
    try:
        lab = json.loads((state / "lab" / "lab.json").read_text())
    except (OSError, ValueError):
        return None
    return next((p["pid"] for p in lab["processes"] if p["name"] == name), None)


def storm(options: Options) -> Section:
    """1,000 fake machines racked at once: discovered, powered on, booted, enlisted."""
    n = 100 if options.quick else 1000
    if os.geteuid() != 0:
        raise BenchError("the storm needs root (network namespaces, raw sockets)")
    section = Section(f"Storm: {n:,} fake machines racked at once, found, booted and enlisted")
    with _workdir("storm") as tmp:
        state = tmp / "state"
        # the boot image is prepared first, outside the timing (as a seed would have it)
        from bootstrap.image.callback import default_cache, ensure_callback_image

        ensure_callback_image(state / "images", cache_dir=default_cache(), make_current=True)
        argv = [*metalseed_argv(), "--state-dir", str(state), "lab", "up"]
        argv += ["--machines", f"fake={n}", "--image", "current", "--no-join"]
        progress(f"storm: lab up with {n} fake machines")
        started = time.monotonic()
        try:
            up = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            if up.returncode != 0:
                raise BenchError(f"lab up failed: {up.stderr[-1500:]}")
            up_seconds = time.monotonic() - started
            seed_pid = _pid_of(state, "seed")
            timeline: dict[str, float] = {}
            counts: collections.Counter = collections.Counter()
            # py-spy at a low rate: sampling a many-threaded process at 200 Hz costs a core
            spy = profile(seed_pid, tmp / "seed.prof", rate=20) if seed_pid else None
            with spy or contextlib.nullcontext():
                while time.monotonic() - started < TARGET_SECONDS * 1.5:
                    status = _status(state)
                    counts = collections.Counter(r["state"] for r in status.get("machines", []))
                    now = time.monotonic() - started
                    for mark, have in (
                        ("first enrolled", sum(counts.values()) - counts[None] > 0),
                        ("all found", counts[None] == 0),
                        ("first enlisted", counts["enlisted"] > 0),
                        ("half enlisted", counts["enlisted"] >= n / 2),
                    ):
                        if have and mark not in timeline:
                            timeline[mark] = now
                    if counts["enlisted"] == n:
                        break
                    time.sleep(2)
            wall = time.monotonic() - started
            peak = _peak_rss_mb(seed_pid) if seed_pid else None
            bmc_rss = _peak_rss_mb(_pid_of(state, "bmcs-1") or 0)
            nodes = json.loads(
                subprocess.run(
                    [*metalseed_argv(), "--state-dir", str(state), "nodes", "list", "--json"],
                    capture_output=True,
                    text=True,
                    timeout=120,
                ).stdout
                or "[]"
            )
            guids = collections.Counter(node["guid"] for node in nodes)
            duplicated = sum(c - 1 for c in guids.values() if c > 1)
            summary = _profile_lines(tmp / "seed.prof")
            load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        finally:
            subprocess.run(
                [*metalseed_argv(), "--state-dir", str(state), "lab", "down"],
                capture_output=True,
                timeout=300,
            )
    enlisted = counts["enlisted"]
    section.setup = [
        f"`metalseed --state-dir FRESH lab up --machines fake={n} --image current` (the "
        "call-back image made current first, outside the timing); the lab's BMC segment "
        f"holds {n} simulated BMCs in one `metalseed lab bmc` process; the seed daemon "
        "sweeps it every 5 s; one fake-rack process does every machine's firmware steps "
        "(raw-socket DHCP as PXE and as iPXE, TFTP of undionly.kpxe, HTTP script, kernel "
        "and initrd with sha256) and its enlist.",
        "Timed from `lab up` until `lab status` shows every machine's node `enlisted` "
        "(polled every 2 s); RSS is the seed daemon's VmHWM.",
    ]
    section.rows = [
        Row(
            f"{n:,} machines: all enlisted in",
            f"<= {TARGET_SECONDS / 60:.0f} min on 2 cores",
            fmt_s(wall),
            result=verdict(enlisted == n and wall <= TARGET_SECONDS),
        ),
        Row("machines enlisted", f"{n}/{n}", f"{enlisted}/{n}", result=verdict(enlisted == n)),
        Row("nodes found twice", "0", str(duplicated), result=verdict(duplicated == 0)),
        Row("seed peak RSS", "—", f"{peak:.0f} MB" if peak else "not measured"),
        Row("BMC simulator peak RSS", "—", f"{bmc_rss:.0f} MB" if bmc_rss else "not measured"),
        Row("`lab up` returned after", "—", fmt_s(up_seconds)),
        *[Row(f"{mark}", "—", fmt_s(t)) for mark, t in timeline.items()],
    ]
    section.notes.append(
        f"Load average (1/5/15 min) when the last machine enlisted: {load}. Besides the seed, "
        "the box runs the BMC simulator, the fake rack, and one short-lived power-hook "
        "process per power change (the simulator's command hook: a Python start-up for each "
        f"of the {n:,} power-ons), all on the same 2 cores. The seed netboots machines "
        "128 BMCs at a time (`bmc.concurrency`), each netboot being a boot-device and a "
        "power-on exchange over a fresh RMCP+ session; its sweeps probe the whole segment "
        "but log in only to new BMCs."
    )
    if summary:
        section.notes.append("Where the seed's time went (py-spy on `metalseed run`):")
        section.notes.append("\n".join(summary))
    if enlisted < n:
        section.notes.append(
            f"Not enlisted at the end: {n - enlisted} machines, by seed state: "
            + ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "enlisted")
        )
    return section


def _profile_lines(path: Path) -> list[str] | None:
    return profile_summary(path, rate=20) if path.exists() else None


BENCHMARKS = {"lab-storm": storm}

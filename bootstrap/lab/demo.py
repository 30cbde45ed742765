"""``make demo``: the main job on the built-in lab, as far as metalseed reaches today.

Part one starts 8 simulated BMCs on loopback, then runs the operator's
commands for real (each printed before it runs): discover with credential
rotation, boot device, power on, the node table, and cross-checks one machine
with ipmitool. Part two (``demo_lab``, as root) brings up the lab -- 4 netns
machines, each behind a simulated BMC with a 10 GiB data disk -- and its seed
daemon finds, netboots, enlists and joins them into a HEALTH_OK Ceph cluster
with no further command; then a 5th machine is racked and joins on its own.
The cluster status, the capacity before and after and the timings are
printed, and the lab is torn down. Everything it starts is stopped by PID; its state lives in a
temporary directory that is removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import demo_lab

FACTORY_PASSWORD = "lab-factory-pw"  # the simulated BMCs' factory login, as on a sticker


def _run(argv: list[str], env: dict | None = None) -> float:
    shown = ["metalseed", *argv[3:]] if argv[:3] == [sys.executable, "-m", "bootstrap"] else argv
    print(f"\n$ {shlex.join(shown)}", flush=True)
    started = time.monotonic()
    subprocess.run(argv, check=True, env=env)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the state directory")
    parser.add_argument("--no-lab", action="store_true", help="skip the lab part")
    args = parser.parse_args()

    port = 623 if os.geteuid() == 0 else 6230
    work = Path(tempfile.mkdtemp(prefix="metalseed-demo-"))
    state = work / "state"
    creds = work / "bmc-credentials"
    creds.write_text(f"admin:{FACTORY_PASSWORD}\n")
    creds.chmod(0o600)
    manifest = work / "bmcs.json"
    me = [sys.executable, "-m", "bootstrap"]
    ms = [*me, "--state-dir", str(state)]

    print(f"metalseed demo: {args.count} simulated BMCs on 127.0.1.1-{args.count}, UDP port {port}")
    print(f"state directory {state}")
    sim = subprocess.Popen(
        [
            *me,
            "lab",
            "bmc",
            "--count",
            str(args.count),
            "--address",
            "127.0.1.1",
            "--port",
            str(port),
            "--credentials",
            str(creds),
            "--manifest",
            str(manifest),
        ],
        stderr=subprocess.DEVNULL,
    )
    timings: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 20
        while not manifest.exists():
            if sim.poll() is not None or time.monotonic() > deadline:
                print("the BMC simulator did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        print(
            f"$ metalseed lab bmc --count {args.count} --address 127.0.1.1 --port {port} "
            f"--credentials {creds} &   (pid {sim.pid})"
        )

        timings["discover + rotate"] = _run(
            [*ms, "discover", f"127.0.1.0/28:{port}", "--credentials", str(creds), "--rotate"]
        )
        timings["boot-device pxe"] = _run([*ms, "boot-device", "pxe", "--all"])
        timings["power on"] = _run([*ms, "power", "on", "--all"])
        _run([*ms, "nodes", "list"])
        env = {**os.environ, "IPMI_PASSWORD": FACTORY_PASSWORD}
        _run(
            [
                "ipmitool",
                "-I",
                "lanplus",
                "-H",
                "127.0.1.3",
                "-p",
                str(port),
                "-U",
                "admin",
                "-E",
                "power",
                "status",
            ],
            env=env,
        )
        timings["re-discover (idempotent)"] = _quiet(
            [*ms, "discover", f"127.0.1.0/28:{port}", "--credentials", str(creds), "--rotate"]
        )
        _run([*ms, "events", "--limit", "6"])
        reason = "--no-lab was given" if args.no_lab else demo_lab.why_not()
        if reason:
            print(f"\n(lab part skipped: {reason})")
        else:
            timings.update(demo_lab.lab_demo(_run, me, work))
        print("\ntimings:")
        for what, seconds in timings.items():
            print(f"  {what:<34} {seconds:7.2f} s")
        return 0
    except subprocess.CalledProcessError as exc:
        print(f"demo step failed with exit code {exc.returncode}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"demo step failed: {exc}", file=sys.stderr)
        return 1
    finally:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(5)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait(5)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        print("simulated BMCs stopped; demo cleaned up")


def _quiet(argv: list[str]) -> float:
    shown = ["metalseed", *argv[3:]]
    print(f"\n$ {shlex.join(shown)}   # again: nothing new, nothing duplicated", flush=True)
    started = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


if __name__ == "__main__":
    sys.exit(main())

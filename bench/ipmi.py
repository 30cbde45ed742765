"""Shared pieces of the IPMI benchmarks, and the helpers they run as child processes.

The benchmarks themselves live in :mod:`bench.ipmi_power` (power status of 256
BMCs vs an ipmitool loop) and :mod:`bench.ipmi_sweep` (a /22 discovery sweep).
Both run against ``metalseed lab bmc`` started as its own process on loopback
(127.0.5.x-127.0.6.x and 127.0.8.0/22), with a random password that lives only
in a 0600 file and in ipmitool's environment (``IPMI_PASSWORD`` with ``-E``).

``python -m bench.ipmi driver-timing ...`` and ``... sweep-timing ...`` are
helpers the benchmarks run as child processes to time metalseed's driver and
sweep in-process, without the CLI around them; ``CLI_PHASES`` (run with
``python -c``) times the phases of one real ``power status`` CLI run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from .common import (
    BenchError,
    Login,
    Simulator,
    Timed,
    best_median,
    metalseed_argv,
    proc_cpu_seconds,
    timed_run,
)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def fmt_mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def json_rows(timed: Timed, what: str) -> list[dict]:
    try:
        data = json.loads(timed.stdout)
    except ValueError:
        raise BenchError(f"{what} did not print JSON: {timed.stdout[:300]!r}") from None
    if not isinstance(data, list):
        raise BenchError(f"{what} printed {type(data).__name__}, not a JSON array")
    return data


def discover(state_dir: Path, login: Login, ranges: list[str]) -> tuple[Timed, list[dict]]:
    argv = [*metalseed_argv(), "--state-dir", str(state_dir), "discover", *ranges]
    argv += ["--credentials", str(login.path), "--json"]
    timed = timed_run(argv)
    # discover exits 1 when a BMC failed to enroll; the row check below says which
    rows = json_rows(timed, "metalseed discover")
    return timed, rows


def check_enrolled(rows: list[dict], sim: Simulator, what: str, states=("enrolled",)) -> None:
    """Every BMC of the simulator answered, was enrolled, under the GUID it serves."""
    want = {b["bmc"]: b["guid"] for b in sim.manifest["bmcs"]}
    got = {r["bmc"]: r for r in rows}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    failed = [r for r in rows if r.get("error") or r.get("state") not in states]
    wrong_guid = [b for b, g in want.items() if b in got and got[b].get("guid") != g]
    if missing or extra or failed or wrong_guid or len(rows) != len(want):
        failures = [(r["bmc"], r.get("state"), r.get("error")) for r in failed[:5]]
        raise BenchError(
            f"{what}: {len(got)} of {len(want)} BMCs found; missing {missing[:5]}, "
            f"unexpected {extra[:5]}, failed {failures}, wrong GUID {wrong_guid[:5]}"
        )


def count_nodes(state_dir: Path) -> int:
    argv = [*metalseed_argv(), "--state-dir", str(state_dir), "nodes", "list", "--json"]
    return len(json_rows(timed_run(argv).check("metalseed nodes list"), "nodes list"))


def median(values) -> float:
    return best_median(list(values))[1]


#: ``metalseed power status --all --json`` through ``main()`` with phase timers, run as
#: ``python -c CLI_PHASES STATE_DIR OUT``: nothing but ``time`` and ``sys`` is imported
#: before ``bootstrap.cli``. The CLI's JSON goes to stdout; the marks (time.time()) to OUT.
CLI_PHASES = """
import time
t_start = time.time()
import sys
state_dir, out = sys.argv[1], sys.argv[2]
import bootstrap.cli as cli
from bootstrap import actions
marks = {"start": t_start, "imported": time.time()}

def timed(name, fn):
    def wrapper(*a, **kw):
        t0 = time.time()
        try:
            return fn(*a, **kw)
        finally:
            marks[name] = marks.get(name, 0.0) + time.time() - t0
    return wrapper

actions.power_driver = timed("driver", actions.power_driver)
actions.power = timed("body", actions.power)
sys.argv = ["metalseed", "--state-dir", state_dir, "power", "status", "--all", "--json"]
code = 0
try:
    cli.main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
sys.stdout.flush()
marks["main_end"] = time.time()
import json
with open(out, "w") as fh:
    json.dump(marks, fh)
sys.exit(code)
"""


# -- child-process helpers ------------------------------------------------------------------


def _driver_timing(args: argparse.Namespace) -> None:
    """Time 256 power-status reads in-process: the bare driver, then the command body."""
    started = time.perf_counter()
    from bootstrap import actions
    from bootstrap import config as configmod
    from bootstrap.parallel import run_all
    from bootstrap.power.base import BmcTarget

    import_seconds = time.perf_counter() - started
    config = configmod.load(flags={"state_dir": Path(args.state_dir)})
    store = actions.open_store(config)
    driver = actions.power_driver(config)
    nodes = actions.resolve_nodes(store, [], True)
    targets = [BmcTarget(n.bmc, store.get_credential(n.id), node=n.id) for n in nodes]

    def measure(fn) -> dict:
        sim_before = proc_cpu_seconds(args.sim_pid)
        self_before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        errors, rows = fn()
        wall = time.perf_counter() - t0
        self_after = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall": wall,
            "client_cpu": (self_after.ru_utime - self_before.ru_utime)
            + (self_after.ru_stime - self_before.ru_stime),
            "sim_cpu": proc_cpu_seconds(args.sim_pid) - sim_before,
            "errors": errors,
            "rows": rows,
        }

    def driver_pass(conc: int):
        outcomes = run_all(driver.power_state, targets, concurrency=conc)
        return sum(1 for o in outcomes if not o.ok), len(outcomes)

    def actions_pass(conc: int):
        outcomes = actions.power(store, driver, nodes, "status", concurrency=conc)
        return sum(1 for o in outcomes if o.error), len(outcomes)

    passes = []
    plan = [("driver", c, driver_pass) for c in args.concurrency]
    plan.append(("actions", config.bmc.concurrency, actions_pass))
    for kind, conc, fn in plan:
        reps = [measure(lambda fn=fn, conc=conc: fn(conc)) for _ in range(args.repeat)]
        what = (
            f"run_all(driver.power_state, {len(targets)} targets, concurrency={conc})"
            if kind == "driver"
            else f'actions.power(store, driver, {len(nodes)} nodes, "status", concurrency={conc})'
        )
        passes.append(
            {
                "kind": kind,
                "what": what,
                "concurrency": conc,
                "rows": min(r["rows"] for r in reps),
                "reps": reps,
            }
        )
    json.dump(
        {
            "import_seconds": import_seconds,
            "cli_concurrency": config.bmc.concurrency,
            "passes": passes,
        },
        sys.stdout,
    )


def _sweep_timing(args: argparse.Namespace) -> None:
    from bootstrap import config as configmod
    from bootstrap.discovery.ranges import parse_ranges
    from bootstrap.discovery.sweep import sweep

    config = configmod.load()
    targets = parse_ranges(args.ranges, config.bmc.port)
    d = config.discovery
    result = sweep(targets, timeout=d.probe_timeout, rounds=d.probe_rounds, window=d.probe_window)
    json.dump(
        {
            "seconds": result.seconds,
            "probed": result.probed,
            "found": len(result.found),
            "rounds": d.probe_rounds,
            "timeout": d.probe_timeout,
            "window": d.probe_window,
        },
        sys.stdout,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ipmi")
    sub = parser.add_subparsers(dest="helper", required=True)
    dt = sub.add_parser("driver-timing", help="time run_all(driver.power_state) in-process")
    dt.add_argument("--state-dir", required=True, help="a state dir with the BMCs enrolled")
    dt.add_argument("--sim-pid", type=int, required=True)
    dt.add_argument("--concurrency", type=int, action="append", required=True)
    dt.add_argument("--repeat", type=int, default=5)
    st = sub.add_parser("sweep-timing", help="time the presence sweep alone, in-process")
    st.add_argument("ranges", nargs="+")
    args = parser.parse_args(argv)
    helpers = {
        "driver-timing": _driver_timing,
        "sweep-timing": _sweep_timing,
    }
    helpers[args.helper](args)


if __name__ == "__main__":
    main()

"""IPMI benchmark: discovery of a rack where one BMC in ten ignores unknown usernames.

100 simulated BMCs on 127.0.9.1-127.0.9.100 (``metalseed lab bmc --spec``); every
tenth has the fault ``silent_unknown_user`` (no answer at all to a login as a user
it does not know, like pyghmi's own BMC server and many real ones). The same rack
is discovered with a credentials file whose first line is a wrong username and
with one whose first line is the right one; the wrong-first runs should cost at
most twice the right-first ones.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from .common import (
    BenchError,
    Login,
    Options,
    Row,
    Section,
    Simulator,
    Timed,
    best_median,
    bmc_simulator,
    fmt_s,
    private_file,
    progress,
    verdict,
    workdir,
    write_credentials,
)
from .ipmi import check_enrolled, count_nodes, discover, median

NET = "127.0.9"
PORT = 623
BMCS = 100
QUICK_BMCS = 20
SILENT_EVERY = 10
RUNS = 3
QUICK_RUNS = 1
TARGET_FACTOR = 2.0
WRONG_USER = "nobody"  # a username no simulated BMC knows


def _specs(count: int) -> list[dict]:
    specs = []
    for n in range(count):
        spec: dict = {"address": f"{NET}.{n + 1}", "port": PORT}
        if n % SILENT_EVERY == SILENT_EVERY - 1:  # .10, .20, ...: one in ten
            spec["faults"] = {"silent_unknown_user": True}
        specs.append(spec)
    return specs


def discovery_silent(opts: Options) -> Section:
    """`discover` of 100 BMCs, one in ten silent for unknown users: wrong login first vs right."""
    count = QUICK_BMCS if opts.quick else BMCS
    runs = QUICK_RUNS if opts.quick else RUNS
    with workdir("silent") as work:
        login = write_credentials(work)  # the simulator's only user
        specs = _specs(count)
        spec = work / "bmc-spec.json"
        spec.write_text(json.dumps({"bmcs": specs}, indent=1))
        silent = [s["address"] for s in specs if "faults" in s]
        progress(f"silent: starting {count} BMCs on {NET}.1-{count}, {len(silent)} silent")
        with bmc_simulator(work, login, "--spec", str(spec)) as sim:
            if len(sim.endpoints) != count:
                raise BenchError(f"simulator serves {len(sim.endpoints)} BMCs, not {count}")
            return _discovery_silent(work, login, sim, silent, runs)


def _credential_files(work: Path, login: Login) -> dict[str, Login]:
    """The two orders of the same two lines; the wrong one's password is random too."""
    wrong = f"{WRONG_USER}:Bench-{secrets.token_urlsafe(9)}"
    right = f"{login.username}:{login.password}"
    files = {}
    for order, lines in (("right first", (right, wrong)), ("wrong first", (wrong, right))):
        path = private_file(work / order.replace(" ", "-"), "".join(f"{ln}\n" for ln in lines))
        files[order] = Login(login.username, login.password, path)
    return files


def _discovery_silent(
    work: Path, login: Login, sim: Simulator, silent: list[str], runs: int
) -> Section:
    count = len(sim.endpoints)
    files = _credential_files(work, login)
    ranges = [f"{NET}.1-{NET}.{count}:{PORT}"]
    results: dict[str, list[Timed]] = {order: [] for order in files}
    for i in range(runs):
        for order, creds in files.items():  # interleaved, so drift hits both alike
            state = work / f"state-{order.replace(' ', '-')}-{i}"
            timed, rows = discover(state, creds, ranges)
            check_enrolled(rows, sim, f"{order} run {i + 1}")
            wrong_user = [r["bmc"] for r in rows if r.get("username") != login.username]
            if timed.returncode != 0 or wrong_user or count_nodes(state) != count:
                raise BenchError(
                    f"{order} run {i + 1}: exit {timed.returncode}, enrolled under another "
                    f"user: {wrong_user[:5]}"
                )
            results[order].append(timed)
            progress(f"  {order} run {i + 1}: {fmt_s(timed.wall)}, {count}/{count} enrolled")

    right_best, right_med = best_median([t.wall for t in results["right first"]])
    wrong_best, wrong_med = best_median([t.wall for t in results["wrong first"]])
    login_timeout = _login_timeout()
    factor = wrong_med / right_med
    extra = wrong_med - right_med
    section = Section(
        f"Discovery of {count} BMCs, one in {SILENT_EVERY} silent for unknown users, "
        "wrong credential first"
    )
    section.setup = [
        f"Simulator: `metalseed lab bmc --spec FILE` with {count} BMCs on "
        f"{NET}.1-{NET}.{count}:{PORT}; {len(silent)} of them ({', '.join(silent[:3])}, ...) "
        'with `"faults": {"silent_unknown_user": true}`: they send nothing back to a login '
        "as a user they do not know; the others refuse it at once (RAKP 2 error).",
        f"Credentials: two lines, a wrong username (`{WRONG_USER}`) and the right login; "
        "`wrong first` lists the wrong one first, `right first` the same two lines the "
        "other way round. Both files 0600.",
        f"Command: `metalseed --state-dir FRESH discover {' '.join(ranges)} --credentials F "
        f"--json`, {runs} runs per order, interleaved, each with a new state dir. Every run "
        f"checked: all {count} BMCs `enrolled` under the GUID they serve, with the right "
        f"username, {count} nodes in the store.",
        f"`bmc.login_timeout` (the deadline of one login) at its default, {login_timeout} s.",
    ]
    section.rows = [
        Row(
            f"wrong credential first: all {count} enrolled, median of {runs}",
            f"<= {TARGET_FACTOR:.0f}x right first",
            fmt_s(wrong_med),
            f"{fmt_s(right_med)} (right first)",
            f"{factor:.2f}x",
            verdict(factor <= TARGET_FACTOR),
        ),
        Row(
            f"best of {runs}",
            "—",
            fmt_s(wrong_best),
            f"{fmt_s(right_best)} (right first)",
            f"{wrong_best / right_best:.2f}x",
            "—",
        ),
        Row(
            "extra time for the wrong line first (median wrong first - median right first)",
            "—",
            fmt_s(extra),
            f"`bmc.login_timeout` {login_timeout} s",
            f"{extra / login_timeout:.2f} login deadlines",
            "—",
        ),
        Row(
            "BMCs enrolled with the right login",
            f"{count}/{count}",
            f"{count}/{count} in each run",
            f"{count}/{count} in each run",
            "—",
            "pass",
        ),
    ]
    section.notes = [_notes(results, silent, count, login_timeout)]
    return section


def _notes(results: dict[str, list[Timed]], silent: list[str], count: int, deadline: float):
    right_med = median(t.wall for t in results["right first"])
    wrong_med = median(t.wall for t in results["wrong first"])
    extra = wrong_med - right_med
    cpu = {order: median(t.cpu for t in runs) for order, runs in results.items()}
    text = [
        "### Where the time goes",
        "",
        f"The wrong-first runs take {fmt_s(extra)} longer (medians), "
        f"{extra / deadline:.2f} login deadlines of {deadline} s. Median CPU of the discover "
        f"process: {cpu['wrong first']:.2f} s wrong first, {cpu['right first']:.2f} s right "
        "first.",
    ]
    if extra > 1.5 * deadline:
        text.append(
            "That is more than the one deadline a silent BMC should cost before the next "
            "credential is tried: the wrong login is waited for, or retried, past "
            "`bmc.login_timeout`."
        )
        return _paragraph(text)
    text.append(
        "That is one deadline for the whole rack: a silent BMC gives no answer to the wrong "
        "login, so it costs one login deadline before the right line is tried, and the "
        f"{len(silent)} silent BMCs wait out their deadlines at the same time, on their own "
        f"worker threads, while the other {count - len(silent)} refuse the wrong user within "
        "a round trip. Right first, no BMC sees the wrong line at all."
    )
    if wrong_med > TARGET_FACTOR * right_med:
        text.append(
            f"So the {TARGET_FACTOR:.0f}x target can only hold when a right-first discovery "
            f"of the rack itself lasts at least one login deadline; here it takes "
            f"{fmt_s(right_med)} against {deadline} s. A shorter `bmc.login_timeout` narrows "
            "the gap, at the price of giving up sooner on a slow BMC's login."
        )
    return _paragraph(text)


def _paragraph(text: list[str]) -> str:
    """A heading, a blank line, then the sentences as one paragraph."""
    return "\n".join(text[:2]) + "\n" + " ".join(text[2:])


def _login_timeout() -> float:
    from bootstrap.config import BmcConfig

    return BmcConfig().login_timeout


BENCHMARKS = {"discovery-silent": discovery_silent}

"""Shared pieces of the benchmark harness: sections, processes, timing, machine facts.

A benchmark module exposes ``BENCHMARKS``: a mapping of a short name to a
function taking :class:`Options` and returning a :class:`Section`. ``bench.run``
runs them and assembles ``docs/benchmarks.md`` from the sections. A benchmark
that *cannot run* (a simulator or server that does not start, BMCs that are
not all found) raises :class:`BenchError`, with the part it did measure if
any; a benchmark that runs but misses its target returns its section with the
row marked ``missed``.

Everything a benchmark starts is stopped by PID (SIGTERM, then SIGKILL) and
every temporary directory is removed, also when the benchmark fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PASS, MISSED = "pass", "missed"


class BenchError(Exception):
    """The benchmark could not run (as opposed to: it ran and missed a target).

    ``section``, when given, holds what was measured before it stopped (the peer's
    figures, say) and goes into the report in place of a bare "could not run".
    """

    def __init__(self, message: str, *, section: Section | None = None) -> None:
        super().__init__(message)
        self.section = section


@dataclasses.dataclass(frozen=True)
class Options:
    """How ``bench.run`` was asked to run; every benchmark function takes one."""

    quick: bool = False  # fewer and shorter rounds: a smoke run, not figures to quote


@dataclasses.dataclass
class Row:
    metric: str
    target: str = "—"
    measured: str = "—"
    peer: str = "—"
    ratio: str = "—"
    result: str = "—"

    def cells(self) -> list[str]:
        return [self.metric, self.target, self.measured, self.peer, self.ratio, self.result]


@dataclasses.dataclass
class Section:
    title: str
    setup: list[str] = dataclasses.field(default_factory=list)  # bullet lines before the table
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # paragraphs after the table

    COLUMNS = ("metric", "target", "measured", "peer", "ratio", "result")

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.setup:
            out += [f"- {line}" for line in self.setup] + [""]
        if self.rows:
            out.append("| " + " | ".join(self.COLUMNS) + " |")
            out.append("|" + "|".join("---" for _ in self.COLUMNS) + "|")
            for row in self.rows:
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |")
            out.append("")
        for note in self.notes:
            out += [note, ""]
        return "\n".join(out)


# -- output ------------------------------------------------------------------------------

_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def best_median(values: Sequence[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def verdict(ok: bool) -> str:
    return PASS if ok else MISSED


# -- the CLI under test ----------------------------------------------------------------


def python() -> str:
    """The venv's interpreter: the one ``make bench`` runs us with."""
    return sys.executable


def metalseed_argv() -> list[str]:
    """``metalseed`` as an operator runs it: the console script next to our interpreter."""
    script = Path(sys.executable).parent / "metalseed"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "bootstrap"]


def bench_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALSEED_")}
    env.update(extra)
    return env


@dataclasses.dataclass
class Timed:
    argv: list[str]
    returncode: int
    wall: float  # seconds, fork to reap
    user: float  # CPU seconds of the child (and the children it waited for)
    system: float
    max_rss_kb: int  # peak resident set of the child (or its largest waited-for child)
    stdout: str
    stderr: str
    started_at: float = 0.0  # time.time() just before the fork
    ended_at: float = 0.0  # time.time() just after the reap

    @property
    def cpu(self) -> float:
        return self.user + self.system

    def check(self, what: str) -> Timed:
        if self.returncode != 0:
            raise BenchError(
                f"{what} exited {self.returncode}: {self.stderr.strip()[-2000:] or '(no stderr)'}"
            )
        return self


def timed_run(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = 300.0,
) -> Timed:
    """Run ``argv`` to completion; wall time and the child's own rusage (via wait4).

    Output goes to temporary files, not pipes, so nothing but the child runs
    between fork and reap.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started_at = time.time()
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=env if env is not None else bench_env(),
        )
        # A blocking wait4 keeps the harness off the CPU while the child runs;
        # a timer kills the child (by PID) if it hangs.
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        ended_at = time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait again
        if wall >= timeout:
            raise BenchError(f"{' '.join(argv[:4])} ... did not finish in {timeout:.0f} s")
        out.seek(0)
        err.seek(0)
        return Timed(
            list(argv),
            proc.returncode,
            wall,
            usage.ru_utime,
            usage.ru_stime,
            usage.ru_maxrss,
            out.read(),
            err.read(),
            started_at,
            ended_at,
        )


def repeat(n: int, fn: Callable[[], Timed]) -> list[Timed]:
    return [fn() for _ in range(n)]


# -- processes and files ---------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read /proc/{pid}/stat: {exc}") from None
    fields = raw.rsplit(")", 1)[1].split()  # the command name may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def stop_pid(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL: by PID, never by name."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(grace)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"metalseed-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Login:
    username: str
    password: str  # only ever in a 0600 file or a child's environment
    path: Path


def private_file(path: Path, text: str) -> Path:
    """``text`` in a new file only its owner can read (0600 from creation): for secrets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def write_credentials(directory: Path, username: str = "admin") -> Login:
    """A fresh random password in ``directory/bmc-credentials``, created 0600."""
    password = "Bench-" + secrets.token_urlsafe(9)  # 18 bytes: within IPMI's 20
    path = directory / "bmc-credentials"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{username}:{password}\n")
    return Login(username, password, path)


@dataclasses.dataclass
class Simulator:
    proc: subprocess.Popen
    manifest: dict
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def endpoints(self) -> list[str]:
        return [b["bmc"] for b in self.manifest["bmcs"]]

    def cpu_seconds(self) -> float:
        if self.proc.poll() is not None:
            raise BenchError(f"the BMC simulator died (exit {self.proc.returncode})")
        return proc_cpu_seconds(self.proc.pid)


@contextlib.contextmanager
def bmc_simulator(
    directory: Path, login: Login, *args: str, ready_timeout: float = 60.0
) -> Iterator[Simulator]:
    """``metalseed lab bmc ARGS`` as its own process; ready once its manifest exists."""
    manifest = directory / "bmc-manifest.json"
    log = directory / "bmc-sim.log"
    argv = [*metalseed_argv(), "lab", "bmc", "--credentials", str(login.path)]
    argv += ["--manifest", str(manifest), *args]
    with log.open("w") as log_fh:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=bench_env(),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while not manifest.exists():
            if proc.poll() is not None:
                raise BenchError(
                    f"BMC simulator exited {proc.returncode} before it was ready: "
                    f"{log.read_text().strip()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"BMC simulator not ready after {ready_timeout:.0f} s")
            time.sleep(0.05)
        yield Simulator(proc, json.loads(manifest.read_text()), log)
    finally:
        stop_pid(proc)


# -- machine facts -----------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_facts() -> list[tuple[str, str]]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    try:
        from importlib.metadata import version

        pyghmi = version("pyghmi")
    except Exception:
        pyghmi = "not installed"
    return [
        ("CPUs (nproc)", str(os.cpu_count())),
        ("CPU model", cpu),
        ("memory", mem),
        ("kernel", platform.release()),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("pyghmi", pyghmi),
        ("ipmitool", _first_line(["ipmitool", "-V"])),
    ]

"""Shared pieces of the netboot benchmarks (DHCP, TFTP, HTTP): a namespace lab, servers in it.

Every netboot benchmark builds its own lab with :class:`bootstrap.lab.netns.NetnsLab`:
a *switch* namespace holding a bridge, a *server* namespace and a *client*
namespace, each linked to the bridge by a veth (``eth0``) on one /21. Nothing
is added to the host's own namespace, and the lab is removed however the
benchmark ends. The servers under test (``metalseed serve`` and its peer:
dnsmasq, tftpd-hpa, nginx) run in the server namespace -- in turn for DHCP,
side by side on different ports for TFTP and HTTP -- each started fresh and
stopped by PID; the load generators (perfdhcp, curl, wrk) run in the client
namespace.

``ip netns exec NS CMD`` execs CMD in place, so the PID of the Popen is the
server's own PID: CPU is read from ``/proc/PID/stat``, with its children's
(nginx's workers). Also here: the CPU the rest of the machine used meanwhile,
and py-spy profiles of ``metalseed serve``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bootstrap.lab.netns import Netns, NetnsError, NetnsLab

from .common import REPO, BenchError, bench_env, metalseed_argv, progress, stop_pid

#: the benchmark segment: a /21 so full-mode DHCP has room for 1,000+ clients
SEGMENT = ipaddress.IPv4Network("10.213.0.0/21")
SERVER_IP = "10.213.0.1"
CLIENT_IP = "10.213.0.2"
POOL_FIRST, POOL_LAST = "10.213.0.10", "10.213.7.250"
POOL = f"{POOL_FIRST}-{POOL_LAST}"
POOL_SIZE = int(ipaddress.IPv4Address(POOL_LAST)) - int(ipaddress.IPv4Address(POOL_FIRST)) + 1
IFACE = "eth0"
HTTP_PORT = 80
TFTP_PORT = 69
IPXE_DIR = Path("/usr/lib/ipxe")
READY_TIMEOUT = 30.0

#: how servers share the lab: one at a time (DHCP: both would answer), or both at once
TURNS = "Servers take turns in the server namespace, each started fresh and stopped by PID."
SIDE_BY_SIDE = (
    "Both servers run at once in the server namespace on different ports, each idle "
    "while the other is measured, and the rounds alternate between them (the first "
    "server of each pair alternating too), so both see the same background load; "
    "stopped by PID at the end."
)


def lab_line(arrangement: str) -> str:
    """The setup line describing the lab, for every netboot section."""
    return (
        f"Lab: three network namespaces made for the run by `bootstrap.lab.netns.NetnsLab` "
        f"(a switch namespace with a Linux bridge; a server and a client namespace, each "
        f"joined to it by a veth `{IFACE}`), segment {SEGMENT}, server {SERVER_IP}, client "
        f"{CLIENT_IP}; the load generator runs in the client namespace, nothing touches the "
        f"host's own interfaces. {arrangement}"
    )


@dataclasses.dataclass
class Lab:
    switch: Netns
    server: Netns
    client: Netns


@contextlib.contextmanager
def netboot_lab() -> Iterator[Lab]:
    """The switch/server/client namespaces, removed again however the benchmark ends."""
    if os.geteuid() != 0:
        raise BenchError("the netboot benchmarks need root (network namespaces)")
    lab = NetnsLab()
    try:
        try:
            switch = lab.namespace("sw")
            bridge = lab.bridge(switch)
            server = lab.namespace("srv")
            client = lab.namespace("cli")
            plen = SEGMENT.prefixlen
            lab.link(switch, bridge, server, IFACE, address=f"{SERVER_IP}/{plen}")
            lab.link(switch, bridge, client, IFACE, address=f"{CLIENT_IP}/{plen}")
        except NetnsError as exc:
            raise BenchError(f"could not build the namespace lab: {exc}") from None
        yield Lab(switch, server, client)
    finally:
        lab.close()


# -- CPU of a server process (and its children) -------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants, plus the children they reaped."""
    ticks = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        fields = _stat_fields(current)
        if fields is None:
            continue
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
        todo += _children(current)
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU seconds every process on the machine has spent (user + nice + system in /proc/stat).

    Interrupt and softirq time is left out: much of it is our own traffic. Minus
    what the processes under test used over the same interval, this is the CPU
    other work on the machine took from the benchmark.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return sum(int(x) for x in fields[1:4]) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def state_samples(pid: int, hz: float = 100.0) -> Iterator[Counter[str]]:
    """Sample the scheduler state of ``pid``'s threads while the body runs.

    The counter gets one count per sample: "R" if any thread was running, else "D"
    if any was in uninterruptible (disk) wait, else "S". Cheap: one small read of
    /proc per thread per sample.
    """
    counts: Counter[str] = Counter()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1 / hz):
            states = set()
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError, IndexError):
                    states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            counts["R" if "R" in states else "D" if "D" in states else "S"] += 1

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join()


def paired_ratio(ours: Sequence[float], peer: Sequence[float]) -> float:
    """Median of ``ours[i] / peer[i]``: round i of each server ran back to back."""
    return statistics.median(o / p for o, p in zip(ours, peer, strict=True) if p > 0)


# -- servers ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    label: str  # "metalseed", "dnsmasq", ...
    proc: subprocess.Popen
    log: Path
    argv: list[str]
    #: False when the server's CPU cannot be read: tftpd-hpa ignores SIGCHLD, so the
    #: CPU of its per-transfer processes is never added to its own (cutime stays 0)
    cpu_accounted: bool = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU seconds so far (NaN when not accounted, see ``cpu_accounted``)."""
        self.check_alive()
        return tree_cpu_seconds(self.proc.pid) if self.cpu_accounted else math.nan

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.label} exited {self.proc.returncode} during the benchmark: {tail(self.log)}"
            )


def tail(path: Path, chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-chars:] or "(empty log)"


def listening(ns: Netns, proto: str, port: int) -> bool:
    """A socket of ``proto`` ("tcp"/"udp") listens on ``port`` in ``ns``."""
    flag = "-t" if proto == "tcp" else "-u"
    proc = ns.run(["ss", "-H", "-l", "-n", flag, f"sport = :{port}"])
    return proc.returncode == 0 and bool(proc.stdout.strip())


@contextlib.contextmanager
def run_server(
    ns: Netns,
    label: str,
    argv: Sequence[str],
    log: Path,
    ready: Callable[[], bool],
    *,
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
    cpu_accounted: bool = True,
) -> Iterator[Server]:
    """Start ``argv`` in ``ns``; yield once ``ready()``; stop it by PID (SIGTERM, SIGKILL)."""
    with log.open("w") as log_fh:
        proc = ns.popen(
            list(argv),
            cwd=REPO,
            env=env if env is not None else bench_env(),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    server = Server(label, proc, log, list(argv), cpu_accounted)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise BenchError(
                    f"{label} exited {proc.returncode} before it was ready: {tail(log)}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{label} not ready after {timeout:.0f} s: {tail(log)}")
            time.sleep(0.05)
        yield server
    finally:
        stop_pid(proc)


# -- metalseed ---------------------------------------------------------------------------------

SERVICE_MODULES = ("bootstrap.boot.dhcp.server", "bootstrap.boot.tftp", "bootstrap.boot.http")


def metalseed_missing() -> str | None:
    """Why ``metalseed serve`` cannot run here yet (a service module that does not import)."""
    from .common import python

    probe = subprocess.run(
        [
            python(),
            "-c",
            "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]",
        ]
        + list(SERVICE_MODULES),
        cwd=REPO,
        env=bench_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"`metalseed serve` cannot start: its services do not import ({last})"


def serve_argv(state: Path) -> list[str]:
    return [
        *metalseed_argv(),
        "--state-dir",
        str(state),
        "serve",
        "--interface",
        IFACE,
        "--mode",
        "full",
        "--pool",
        POOL,
        "--http-port",
        str(HTTP_PORT),
        "--tftp-port",
        str(TFTP_PORT),
        "--force",
    ]


SERVE_COMMAND = (
    f"`metalseed --state-dir D serve --interface {IFACE} --mode full --pool {POOL} "
    f"--http-port {HTTP_PORT} --tftp-port {TFTP_PORT} --force`"
)


@contextlib.contextmanager
def metalseed_serve(lab: Lab, state: Path, **env: str) -> Iterator[Server]:
    """``metalseed serve`` in the server namespace; ready once ``STATE/serve.json`` exists."""
    state.mkdir(parents=True, exist_ok=True)
    status = state / "serve.json"
    log = state.parent / f"{state.name}-serve.log"
    with run_server(
        lab.server,
        "metalseed",
        serve_argv(state),
        log,
        status.exists,
        env=bench_env(**env),
        timeout=60.0,
    ) as server:
        progress(f"  metalseed serve up (PID {server.pid}): {json.loads(status.read_text())}")
        yield server


def import_image(state: Path, source: Path, name: str) -> None:
    """``metalseed image import SOURCE --name NAME --current`` into ``state``'s catalogue."""
    argv = [*metalseed_argv(), "--state-dir", str(state), "image", "import", str(source)]
    argv += ["--name", name, "--current"]
    proc = subprocess.run(argv, cwd=REPO, env=bench_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"metalseed image import exited {proc.returncode}: {proc.stderr[-1000:]}")


# -- tools and files ---------------------------------------------------------------------------


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BenchError(f"not installed: {', '.join(missing)} (run `make setup`)")


def version_of(argv: Sequence[str], pick: Callable[[str], str] = lambda s: s) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return pick(lines[0]).strip() if lines else "unknown"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def mb_s(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else 0.0


# -- where metalseed's time goes: py-spy ---------------------------------------------------------


def py_spy() -> str | None:
    """py-spy next to our interpreter, or on PATH (``.venv/bin/pip install py-spy``)."""
    from .common import python

    local = Path(python()).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def profile(pid: int, out: Path, rate: int = 200) -> Iterator[None]:
    """Sample ``pid`` with py-spy while the body runs (a no-op without py-spy).

    py-spy samples until the body ends, then gets SIGINT, on which it writes
    ``out`` (collapsed stacks, ``--format raw``) and exits.
    """
    spy = py_spy()
    if spy is None:
        yield
        return
    argv = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    argv += ["--nonblocking", "--output", str(out)]
    with out.with_suffix(".log").open("w") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        time.sleep(0.5)  # let py-spy attach before the load starts
        yield
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
    finally:
        stop_pid(proc)


#: leaf frames that are a thread waiting, not working (py-spy shows a wait in C code
#: as the Python frame that called it)
WAIT_LEAVES = {
    ("select", "selectors.py"),
    ("_worker", "thread.py"),
    ("wait", "threading.py"),
    ("_wait_for_tstate_lock", "threading.py"),
    ("sleep", "tasks.py"),
}


def _frame(frame: str) -> tuple[str, str]:
    """``func (pkg/file.py:123)`` -> ``("func", "pkg/file.py")`` (py-spy's short path)."""
    func, _, where = frame.partition(" (")
    return func, where.rstrip(")").rsplit(":", 1)[0]


def _ours(path: str) -> bool:
    """A frame in metalseed's own code (py-spy shortens paths to ``bootstrap/...``)."""
    return path.startswith("bootstrap/") or "/bootstrap/" in path


def profile_summary(out: Path, top: int = 8, rate: int = 200) -> list[str] | None:
    """Markdown lines: where the working (not waiting) samples were.

    Two columns: the innermost frame (own time, any code), and metalseed's own
    functions (``bootstrap/``) counted with their callees.
    """
    try:
        raw = out.read_text()
    except OSError:
        return None
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    samples = waiting = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames or not count.isdigit():
            continue
        n = int(count)
        samples += n
        func, path = frames[-1]
        if (func.rsplit(".", 1)[-1], Path(path).name) in WAIT_LEAVES:
            waiting += n
            continue
        own[f"{func} ({path})"] += n
        for name in {f"{f} ({p})" for f, p in frames if _ours(p)}:
            ours[name] += n
    busy = samples - waiting
    if not busy:
        return None
    lines = [
        f"py-spy at {rate} Hz: {samples} samples, {waiting} of them a thread waiting (in "
        f"select/epoll, a thread pool's queue, a lock); shares below are of the other {busy}:",
        "",
        "| innermost function (own time) | share | | metalseed function (with callees) | share |",
        "|---|---|---|---|---|",
    ]
    mine = own.most_common(top)
    # leave out the CLI entry points (main, serve) most working samples pass through
    incl = [(name, n) for name, n in ours.most_common() if "(bootstrap/cli/" not in name][:top]
    for i in range(max(len(mine), len(incl))):
        a = f"`{mine[i][0]}` | {mine[i][1] / busy * 100:.0f}%" if i < len(mine) else " | "
        b = f"`{incl[i][0]}` | {incl[i][1] / busy * 100:.0f}%" if i < len(incl) else " | "
        lines.append(f"| {a} | | {b} |")
    return lines


def cpu_text(seconds: float) -> str:
    return "not measurable" if math.isnan(seconds) else f"{seconds:.2f} s"

"""Shared fixtures: the CLI as a subprocess, simulated BMC processes, address blocks.

Every process a fixture starts is stopped by PID in its finalizer. Simulated
BMCs listen on 127.0.0.0/8 only; each test gets its own /24 so tests never
see each other's BMCs.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FACTORY_USER, FACTORY_PASSWORD = "admin", "factory-Pw-7"

_blocks = itertools.count(20)


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def addr_block() -> str:
    """A fresh 127.X.Y prefix (a /24) for this test's BMCs."""
    n = next(_blocks) + (os.getpid() % 50) * 200
    return f"127.{100 + n // 250}.{n % 250}"


@pytest.fixture
def creds_file(tmp_path: Path) -> Path:
    path = tmp_path / "bmc-credentials"
    path.write_text(f"# factory login\n{FACTORY_USER}:{FACTORY_PASSWORD}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def cli(
    *args: str,
    state_dir: Path | None = None,
    check: bool = True,
    timeout: float = 120,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run ``metalseed ARGS`` as an operator would, capturing output."""
    argv = [sys.executable, "-m", "bootstrap"]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    argv += list(args)
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"metalseed {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


class SimHandle:
    def __init__(self, proc: subprocess.Popen, manifest: dict, log: Path) -> None:
        self.proc = proc
        self.manifest = manifest
        self.log = log

    @property
    def bmcs(self) -> list[dict]:
        return self.manifest["bmcs"]

    def endpoints(self) -> list[str]:
        return [b["bmc"] for b in self.bmcs]


@pytest.fixture
def bmc_sim(tmp_path: Path, creds_file: Path) -> Iterator[Callable[..., SimHandle]]:
    """Start ``metalseed lab bmc ARGS`` (a real process); stopped by PID afterwards."""
    started: list[subprocess.Popen] = []

    def start(*args: str, credentials: Path | None = creds_file, timeout: float = 20) -> SimHandle:
        n = len(started)
        manifest = tmp_path / f"bmc-manifest-{n}.json"
        log = tmp_path / f"bmc-sim-{n}.log"
        argv = [sys.executable, "-m", "bootstrap", "lab", "bmc", "--manifest", str(manifest)]
        if credentials is not None:
            argv += ["--credentials", str(credentials)]
        argv += list(args)
        with log.open("w") as log_fh:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=log_fh, stderr=subprocess.STDOUT)
        started.append(proc)
        deadline = time.monotonic() + timeout
        while not manifest.exists():
            if proc.poll() is not None:
                raise AssertionError(f"BMC simulator exited {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"BMC simulator not ready: {log.read_text()}")
            time.sleep(0.05)
        return SimHandle(proc, json.loads(manifest.read_text()), log)

    yield start
    for proc in started:
        stop_process(proc)


def pytest_report_header(config) -> list[str]:
    return [f"running as {'root' if is_root() else 'non-root'}; state dirs under tmp_path"]


@pytest.fixture
def netlab() -> Iterator:
    """A ``NetnsLab``: namespaces and bridges made for this test, removed after it.

    Stop the processes you start inside its namespaces (by PID) before this
    fixture's finalizer runs, i.e. in a fixture that depends on this one.
    """
    if not is_root():
        pytest.skip("needs root to create network namespaces")
    from bootstrap.lab.netns import NetnsLab

    lab = NetnsLab()
    try:
        yield lab
    finally:
        lab.close()


#: a recording stand-in for the seed's HTTP service: files, and POSTs logged as JSON lines
RECORDER = r"""
import http.server, json, sys, time
root, port, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
    def log_message(self, fmt, *args):
        log.write(json.dumps({"t": time.time(), "line": fmt % args}) + "\n")
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        log.write(json.dumps({"t": time.time(), "path": self.path, "body": body.decode(),
                              "auth": self.headers.get("Authorization"),
                              "type": self.headers.get("Content-Type")}) + "\n")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')
http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
"""


def start_serve(
    ns, state: Path, args: list[str], log: Path, *, env: dict | None = None, timeout: float = 60
) -> subprocess.Popen:
    """``metalseed serve ARGS`` in namespace ``ns``, returned once it wrote serve.json."""
    argv = [sys.executable, "-m", "bootstrap", "--state-dir", str(state), "serve", *args]
    with log.open("w") as fh:
        proc = ns.popen(argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not (state / "serve.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise AssertionError(f"metalseed serve did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc

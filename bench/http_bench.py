"""HTTP benchmark: 50 clients fetching a 64 MiB image file, metalseed vs nginx.

The payload is a 64 MiB random file imported into metalseed's catalogue as
``rootfs.squashfs`` of an image (with small dummy ``vmlinuz`` and ``initrd``)
by ``metalseed image import``; metalseed serves it at
``/images/NAME/rootfs.squashfs``. nginx serves the very same file (the
catalogue's copy) at the same path from a generated config: ``daemon off``,
``sendfile on``, ``worker_processes auto``, access log off.

Each server is first checked with curl (the whole file, compared by SHA-256,
and a Range request answered 206); then wrk (2 threads, 50 connections, each
connection fetching the file again as soon as it has it) runs a few rounds.
A small Lua ``done`` hook prints wrk's exact byte count, duration and errors:
aggregate throughput = bytes read / duration (partial transfers included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
from pathlib import Path

from .common import BenchError, Options, Row, Section, progress, timed_run, verdict, workdir
from .netboot import (
    HTTP_PORT,
    SERVE_COMMAND,
    SERVER_IP,
    SIDE_BY_SIDE,
    Lab,
    Server,
    import_image,
    lab_line,
    listening,
    machine_cpu_seconds,
    mb_s,
    metalseed_missing,
    metalseed_serve,
    netboot_lab,
    paired_ratio,
    profile,
    profile_summary,
    py_spy,
    require,
    run_server,
    sha256_of,
    tail,
    version_of,
)

PAYLOAD_BYTES = 64 * 2**20
IMAGE = "bench"
PAYLOAD = "rootfs.squashfs"
CONNECTIONS = 50
THREADS = 2
TARGET = 0.9  # x nginx's aggregate throughput
PATH = f"/images/{IMAGE}/{PAYLOAD}"
PEER_PORT = 8080  # nginx; metalseed serves on HTTP_PORT

WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"bytes": %d, "duration_us": %d, "requests": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d}\\n',
    summary.bytes, summary.duration, summary.requests, e.connect, e.read, e.write,
    e.status, e.timeout))
end
"""


@dataclasses.dataclass(frozen=True)
class Plan:
    rounds: int
    seconds: int

    @classmethod
    def for_run(cls, opts: Options) -> Plan:
        return cls(rounds=1, seconds=3) if opts.quick else cls(rounds=5, seconds=4)


@dataclasses.dataclass
class Round:
    nbytes: int
    seconds: float
    requests: int
    errors: dict[str, int]
    server_cpu: float
    client_cpu: float
    others_cpu: float  # other processes on the machine over the round

    @property
    def mb_s(self) -> float:
        return mb_s(self.nbytes, self.seconds)


@dataclasses.dataclass
class Target:
    """One server under test and what was measured against it."""

    label: str
    server: Server
    port: int
    range_ok: str = ""
    rounds: list[Round] = dataclasses.field(default_factory=list)
    profile: list[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{SERVER_IP}:{self.port}{PATH}"

    @property
    def median(self) -> Round:
        ordered = sorted(self.rounds, key=lambda r: r.mb_s)
        return ordered[len(ordered) // 2]


def make_payload(src: Path) -> None:
    src.mkdir()
    (src / "vmlinuz").write_bytes(os.urandom(64 * 1024))
    (src / "initrd").write_bytes(os.urandom(64 * 1024))
    with (src / PAYLOAD).open("wb") as fh:
        for _ in range(PAYLOAD_BYTES // 2**20):
            fh.write(os.urandom(2**20))


def check(lab: Lab, target: Target, payload: Path, work: Path) -> str:
    """The whole file, byte-compared; then a Range request. Returns the Range verdict."""
    out = work / "check.bin"
    url = target.url
    argv = [*lab.client.prefix, "curl", "-sS", "--fail", "--max-time", "60", "-o", str(out), url]
    timed = timed_run(argv, timeout=90)
    if timed.returncode != 0:
        raise BenchError(
            f"{target.label}: curl {url} exited {timed.returncode}: {timed.stderr.strip()}; "
            f"server log: {tail(target.server.log, 800)}"
        )
    if sha256_of(out) != sha256_of(payload):
        raise BenchError(f"{target.label}: {PATH} over HTTP differs from the file")
    out.unlink()
    argv = [*lab.client.prefix, "curl", "-sS", "-r", "1000-1999", "-o", "/dev/null"]
    argv += ["-w", "%{http_code} %{size_download}", url]
    rng = timed_run(argv, timeout=60).stdout.split()
    return "206, 1000 bytes" if rng == ["206", "1000"] else f"not honoured ({' '.join(rng)})"


def wrk_round(lab: Lab, target: Target, plan: Plan, script: Path) -> Round:
    argv = [*lab.client.prefix, "wrk", "-t", str(THREADS), "-c", str(CONNECTIONS)]
    argv += ["-d", f"{plan.seconds}s", "--timeout", "120s", "-s", str(script), target.url]
    before, machine = target.server.cpu_seconds(), machine_cpu_seconds()
    timed = timed_run(argv, timeout=plan.seconds + 180)
    server_cpu = target.server.cpu_seconds() - before
    others = max(0.0, machine_cpu_seconds() - machine - server_cpu - timed.cpu)
    line = next((ln for ln in timed.stdout.splitlines() if ln.startswith("{")), None)
    if timed.returncode != 0 or line is None:
        raise BenchError(
            f"wrk against {target.label} exited {timed.returncode}: "
            f"{(timed.stderr or timed.stdout).strip()[-500:]}"
        )
    data = json.loads(line)
    errors = {k: data[k] for k in ("connect", "read", "write", "status", "timeout") if data[k]}
    if errors.get("status") or errors.get("connect"):
        raise BenchError(
            f"wrk against {target.label}: errors {errors}; {tail(target.server.log, 500)}"
        )
    seconds = data["duration_us"] / 1e6
    return Round(data["bytes"], seconds, data["requests"], errors, server_cpu, timed.cpu, others)


def measure(lab: Lab, targets: list[Target], plan: Plan, payload: Path, work: Path) -> None:
    """Check every server, then alternate wrk rounds between them."""
    for target in targets:
        target.range_ok = check(lab, target, payload, work)
    script = work / "wrk-done.lua"
    script.write_text(WRK_DONE)
    for i in range(plan.rounds):
        for target in targets if i % 2 == 0 else targets[::-1]:
            r = wrk_round(lab, target, plan, script)
            target.rounds.append(r)
            progress(
                f"    {target.label}: {r.mb_s:.0f} MB/s, {r.requests} complete in "
                f"{r.seconds:.1f} s, server CPU {r.server_cpu:.2f} s, wrk CPU "
                f"{r.client_cpu:.2f} s, errors {r.errors or 'none'}"
            )


NGINX_CONF = """\
worker_processes auto;
daemon off;
user root;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-tmp;
    fastcgi_temp_path {work}/nginx-tmp;
    uwsgi_temp_path {work}/nginx-tmp;
    scgi_temp_path {work}/nginx-tmp;
    server {{
        listen {address}:{port};
        location /images/ {{ root {state}; }}
        location / {{ return 404; }}
    }}
}}
"""


def nginx_conf(work: Path, state: Path) -> Path:
    (work / "nginx-tmp").mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, state=state, address=SERVER_IP, port=PEER_PORT))
    return conf


def http(opts: Options) -> Section:
    """50 concurrent HTTP clients fetch a 64 MiB image file: metalseed vs nginx."""
    plan = Plan.for_run(opts)
    require("nginx", "wrk", "curl", "ss")
    why = metalseed_missing()
    with workdir("http") as work, netboot_lab() as lab, contextlib.ExitStack() as stack:
        src = work / "image-src"
        make_payload(src)
        state = work / "metalseed-state"
        import_image(state, src, IMAGE)
        payload = state / "images" / IMAGE / PAYLOAD
        if not payload.exists() or payload.stat().st_size != PAYLOAD_BYTES:
            raise BenchError(f"the catalogue has no {PAYLOAD_BYTES}-byte {payload}")
        conf = nginx_conf(work, state)
        progress(f"http: nginx and metalseed in {lab.server.name}, wrk in {lab.client.name}")
        nginx = stack.enter_context(
            run_server(
                lab.server,
                "nginx",
                ["nginx", "-c", str(conf), "-p", str(work)],
                work / "nginx.out",
                lambda: listening(lab.server, "tcp", PEER_PORT),
            )
        )
        peer = Target("nginx", nginx, PEER_PORT)
        ours: Target | None = None
        if why is None:
            try:
                server = stack.enter_context(metalseed_serve(lab, state))
                ours = Target("metalseed", server, HTTP_PORT)
                measure(lab, [peer, ours], plan, payload, work)
            except BenchError as exc:
                why, ours = str(exc), None
        if ours is None:
            peer.rounds.clear()
            measure(lab, [peer], plan, payload, work)
        elif py_spy() and _ratio(ours, peer) < TARGET:
            progress("http: profiling metalseed during one more round")
            out = work / "http-profile.txt"
            with profile(ours.server.pid, out):
                wrk_round(lab, ours, plan, work / "wrk-done.lua")
            ours.profile = profile_summary(out)
        section = _section(plan, peer, ours, why)
    if ours is None:
        raise BenchError(f"metalseed: {why}", section=section)
    return section


def _ratio(ours: Target, peer: Target) -> float:
    return paired_ratio([r.mb_s for r in ours.rounds], [r.mb_s for r in peer.rounds])


def _cell(run: Target) -> str:
    r = run.median
    return f"{r.mb_s:.0f} MB/s ({r.requests / r.seconds:.1f} whole files/s)"


def _section(plan: Plan, peer: Target, ours: Target | None, why: str | None) -> Section:
    section = Section(
        f"HTTP: {CONNECTIONS} clients fetching a {PAYLOAD_BYTES // 2**20} MiB image, "
        "metalseed vs nginx"
    )
    nginx_version = version_of(["nginx", "-v"], lambda s: s.split(": ", 1)[-1])
    wrk_version = version_of(["wrk", "-v"], lambda s: s.split(" [")[0])
    section.setup = [
        lab_line(SIDE_BY_SIDE),
        f"Payload: {PAYLOAD_BYTES:,} random bytes imported with `metalseed image import DIR "
        f"--name {IMAGE} --current` as `{PAYLOAD}` (beside 64 KiB dummy `vmlinuz` and "
        f"`initrd`); both servers serve the catalogue's copy at `{PATH}`.",
        f"metalseed: {SERVE_COMMAND}.",
        f"Peer: {nginx_version}, `nginx -c CONF -p DIR`, generated config: `daemon off; "
        "user root; worker_processes auto; sendfile on; tcp_nopush on; access_log off;`, "
        f"`listen {SERVER_IP}:{PEER_PORT}; location /images/ {{ root STATE_DIR; }}` "
        f"({os.cpu_count()} worker processes here).",
        f"Load: {wrk_version}, `wrk -t {THREADS} -c {CONNECTIONS} -d {plan.seconds}s "
        f"--timeout 120s -s done.lua http://{SERVER_IP}:PORT{PATH}`: {CONNECTIONS} "
        f"connections each fetching the file over and over, {plan.rounds} rounds per "
        "server, the median round shown. "
        "Throughput = bytes wrk read / duration (the Lua `done` hook prints both exactly); "
        "ratio = the median of the per-pair ratios (each metalseed round against the nginx "
        "round run next to it), which cancels most of the machine's background load. "
        "Before the rounds each server is checked: the whole file by SHA-256, and "
        "`Range: bytes=1000-1999`.",
    ]
    if ours is None:
        section.rows.append(
            Row(
                f"aggregate throughput, {CONNECTIONS} connections",
                f">= {TARGET:.1f}x nginx",
                f"could not run: {why}",
                _cell(peer),
                "—",
                "—",
            )
        )
        return section
    ratio = _ratio(ours, peer)
    section.rows = [
        Row(
            f"aggregate throughput, {CONNECTIONS} connections",
            f">= {TARGET:.1f}x nginx",
            _cell(ours),
            _cell(peer),
            f"{ratio:.2f}x",
            verdict(ratio >= TARGET),
        ),
        Row(
            "server CPU per GB served (all rounds)",
            "—",
            _cpu_per_gb(ours),
            _cpu_per_gb(peer),
            "—",
            "—",
        ),
        Row("Range request", "206", ours.range_ok, peer.range_ok, "—", "—"),
    ]
    section.notes.append(_rounds_table(peer, ours))
    section.notes.append(_limit_note(peer, ours))
    if ratio < TARGET:
        section.notes.append(_miss_note(ours, peer))
    return section


def _cpu_per_gb(run: Target) -> str:
    cpu = sum(r.server_cpu for r in run.rounds)
    gb = sum(r.nbytes for r in run.rounds) / 1e9
    return f"{cpu / gb:.2f} s ({cpu:.1f} CPU s for {gb:.1f} GB)"


def _rounds_table(peer: Target, ours: Target) -> str:
    lines = [
        "Every round, pair by pair (which server went first alternates from pair to pair; "
        "server CPU from /proc/PID/stat, nginx's "
        'workers included; wrk\'s from wait4(2); both compete for the same cores; "others" '
        "is the CPU other processes on the machine used during the round, in cores: "
        "/proc/stat minus the server and wrk):",
        "",
        "| pair | server | MB/s | whole files | seconds | server CPU | wrk CPU | others | "
        "wrk errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, pair in enumerate(zip(peer.rounds, ours.rounds, strict=True)):
        for run, r in zip((peer, ours), pair, strict=True):
            lines.append(
                f"| {i + 1} | {run.label} | {r.mb_s:.0f} | {r.requests} | {r.seconds:.1f} "
                f"| {r.server_cpu:.2f} s | {r.client_cpu:.2f} s "
                f"| {r.others_cpu / r.seconds:.1f} | {r.errors or 'none'} |"
            )
    return "\n".join(lines)


def _limit_note(peer: Target, ours: Target) -> str:
    def cores(t: Target, attr: str) -> float:
        return statistics.median(getattr(r, attr) / r.seconds for r in t.rounds)

    ncpu = os.cpu_count() or 1
    return (
        f"What limits the figure: wrk and the kernel work it sets off (receiving and "
        f"copying {PAYLOAD_BYTES // 2**20} MiB per request) took {cores(peer, 'client_cpu'):.1f} "
        f"cores against nginx and {cores(ours, 'client_cpu'):.1f} against metalseed, of the "
        f"{ncpu} this machine has; the servers, which hand the file to the kernel "
        f"(sendfile), {cores(peer, 'server_cpu'):.2f} (nginx) and "
        f"{cores(ours, 'server_cpu'):.2f} (metalseed). When the client takes nearly all "
        "cores, both servers are held to about the same rate and the ratio shows that "
        "metalseed is not the bottleneck, not how far past nginx it could go."
    )


def _miss_note(ours: Target, peer: Target) -> str:
    o, p = ours.median, peer.median
    cpu = statistics.median(r.server_cpu / r.seconds for r in ours.rounds)
    lines = [
        "### Where metalseed's HTTP time goes",
        "",
        f"metalseed's process was busy {cpu * 100:.0f}% of one core during its rounds "
        f"({_cpu_per_gb(ours)} per GB against nginx's {_cpu_per_gb(peer)}); nginx moved "
        f"{p.mb_s:.0f} MB/s to metalseed's {o.mb_s:.0f} MB/s.",
    ]
    if ours.profile:
        lines += ["", "Profile of `metalseed serve` during one more wrk round:", "", *ours.profile]
    elif py_spy() is None:
        lines += ["", "(py-spy not installed: `.venv/bin/pip install py-spy` for a profile.)"]
    return "\n".join(lines)


BENCHMARKS = {"netboot-http": http}

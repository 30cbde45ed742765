"""Real firmware end to end: a QEMU machine netboots the call-back image and calls home.

SeaBIOS and the iPXE ROM of a virtio NIC DHCP on a provisioning segment in
network namespaces, fetch an iPXE script, the Debian kernel and the busybox
initramfs over HTTP; the initramfs leases an address and POSTs to the seed.
The first test uses dnsmasq and a recording HTTP server (the image and the
firmware on their own); the second drives it all through metalseed: a
simulated BMC whose power hook is the QEMU machine, ``discover``,
``boot-device pxe``, ``power on``, and ``metalseed serve`` answering.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bootstrap.lab.console import Console
from tests.conftest import RECORDER, REPO, cli
from tests.vm.conftest import HTTP_PORT, POOL, SEED_IP, SEED_PREFIX

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.netns]

CALLBACK_TIMEOUT = 90  # TCG: ~9 s measured here; a loaded CI box is slower


def _report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n  {text}", flush=True)


def test_initrd_is_a_reproducible_newc_archive(callback_build, tmp_path):
    from bootstrap.image.callback import build_callback

    again = build_callback(callback_build.kernel, tmp_path / "again")
    initrd = callback_build.files["initrd"].read_bytes()
    assert again.files["initrd"].read_bytes() == initrd  # byte for byte
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=gzip.decompress(initrd), capture_output=True, check=True
    ).stdout.decode()
    names = set(listing.split())
    assert {"init", "bin/busybox", "dev/console", "etc/metalseed/modules"} <= names
    assert "lib/modules/virtio_net.ko" in names and "lib/modules/e1000.ko" in names


@pytest.mark.peer
def test_firmware_boots_the_callback_image_from_dnsmasq(
    callback_build, segment, vms, seed_process, tmp_path, capsys
):
    from bootstrap.lab.qemu import VmPaths, start_vm

    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (dnsmasq-base)")
    www = tmp_path / "www"
    www.mkdir()
    for name, path in callback_build.files.items():
        (www / name).write_bytes(path.read_bytes())
    token = "harness-" + uuid.uuid4().hex
    base = f"http://{SEED_IP}:{HTTP_PORT}"
    (www / "boot.ipxe").write_text(
        "#!ipxe\n"
        f"kernel {base}/vmlinuz initrd=initrd {callback_build.cmdline} metalseed.url={base} "
        f"metalseed.node=vm-a metalseed.token={token} metalseed.mac=${{net0/mac}}\n"
        f"initrd {base}/initrd\n"
        "boot\n"
    )
    # IPv6 RAs (else iPXE waits ~13 s) and no-pxedhcp (else it waits for a proxy offer)
    seed_process(
        [
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            "--interface=prov0",
            "--bind-interfaces",
            f"--dhcp-range={SEED_PREFIX}.100,{SEED_PREFIX}.150,255.255.255.0,1h",
            "--no-ping",
            f"--dhcp-boot={base}/boot.ipxe",
            "--dhcp-option=encap:175,176,1b",
            f"--dhcp-leasefile={tmp_path / 'leases'}",
            f"--pid-file={tmp_path / 'dnsmasq.pid'}",
            "--log-facility=-",
            "--enable-ra",
            "--dhcp-range=fd97::,ra-only",
        ],
        tmp_path / "dnsmasq.log",
    )
    segment.seed.ip("addr", "add", "fd97::1/64", "dev", "prov0", "nodad")
    http_log = tmp_path / "http.log"
    seed_process(
        [sys.executable, "-c", RECORDER, str(www), str(HTTP_PORT), str(http_log)],
        tmp_path / "recorder.log",
    )
    time.sleep(0.5)  # both bind within milliseconds; the firmware needs 2 s to reach DHCP

    spec = vms("vm-a", "52:54:00:00:0a:01")
    started = time.monotonic()
    start_vm(spec, vms.state_dir)
    console = Console(VmPaths(vms.state_dir, spec.name).serial, started)
    try:
        seconds = console.wait_for("callback", CALLBACK_TIMEOUT)
    finally:
        console.close()

    posts = [r for r in map(json.loads, http_log.read_text().splitlines()) if "path" in r]
    assert len(posts) == 1, posts
    post = posts[0]
    assert post["path"] == "/api/v1/callback"
    assert post["auth"] == f"Bearer {token}"
    assert post["type"] == "application/json"
    body = json.loads(post["body"])
    assert body["node"] == "vm-a" and body["mac"] == spec.mac
    assert body["kernel"] == callback_build.kernel.version
    assert body["uuid"] == spec.uuid  # SMBIOS -> DMI: the same UUID the BMC reports
    assert body["ip"].startswith(f"{SEED_PREFIX}.") and body["uptime"] > 0
    assert token not in console.text()  # the token is never printed on the console
    _report(capsys, f"dnsmasq boot: power-on -> callback {seconds:.2f} s ({console.timeline()})")


def _step(event: dict) -> str:
    """The boot step an event stands for: its kind, or the step that made a state change."""
    if event["kind"] == "state" and ": " in event["message"]:
        return event["message"].split(": ", 1)[1].split(":", 1)[0]
    return event["kind"]


def _first(events: list[dict], what: str, match) -> int:
    for i, event in enumerate(events):
        if match(event):
            return i
    raise AssertionError(f"no {what} event among:\n" + "\n".join(map(json.dumps, events)))


def _wait_serving(proc: subprocess.Popen, log: Path, status: Path, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"metalseed serve exited {proc.returncode}:\n{log.read_text()}")
        if "serving" in log.read_text() and status.exists():
            return json.loads(status.read_text())
        if time.monotonic() > deadline:
            raise AssertionError(f"metalseed serve not ready in {timeout} s:\n{log.read_text()}")
        time.sleep(0.1)


def test_power_on_netboots_and_calls_home(
    kernel_cache,
    qemu_available,
    segment,
    vms,
    seed_process,
    bmc_sim,
    addr_block,
    creds_file,
    tmp_path,
    capsys,
):
    from bootstrap.image.callback import ensure_callback_image
    from bootstrap.lab.qemu import VmPaths, hook_command, vm_pid

    state = tmp_path / "state"
    image = ensure_callback_image(state / "images", cache_dir=kernel_cache, make_current=True)
    assert set(image.files) == {"vmlinuz", "initrd"}

    serve_log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "bootstrap", "--state-dir", str(state), "serve"]
    argv += ["--interface", segment.interface, "--mode", "full", "--pool", POOL]
    argv += ["--http-port", str(HTTP_PORT)]
    serve = seed_process(argv, serve_log, cwd=REPO)
    info = _wait_serving(serve, serve_log, state / "serve.json")
    assert info["address"] == SEED_IP and info["http_port"] == HTTP_PORT

    spec = vms("node-a", "52:54:00:00:0b:01")
    bmc_spec = tmp_path / "bmcs.json"
    bmc_spec.write_text(json.dumps({"bmcs": [{"address": f"{addr_block}.1", "guid": spec.uuid}]}))
    sim = bmc_sim("--spec", str(bmc_spec), "--power-hook", hook_command(vms.machines_file))

    discover = ["discover", sim.endpoints()[0], "--credentials", str(creds_file), "--json"]
    [found] = json.loads(cli(*discover, state_dir=state).stdout)
    assert found["guid"] == spec.uuid and found["state"] == "enrolled", found
    node = found["node"]
    cli("boot-device", "pxe", node, state_dir=state)

    paths = VmPaths(vms.state_dir, spec.name)
    started = time.monotonic()
    wall_started = time.time()
    cli("power", "on", node, state_dir=state)
    console = Console(paths.serial, started)
    try:
        console.wait_for("callback", CALLBACK_TIMEOUT)
        events: list[dict] = []
        deadline = time.monotonic() + 10
        while not any(e["kind"] == "boot.callback" for e in events):
            assert time.monotonic() < deadline, f"no boot.callback event: {events}"
            time.sleep(0.3)
            out = cli("events", node, "--json", "--limit", "500", state_dir=state).stdout
            events = sorted(json.loads(out), key=lambda e: e["id"])
    finally:
        console.close()

    steps = [_step(e) for e in events]
    dhcp = _first(events, "DHCP", lambda e: _step(e).startswith("dhcp"))
    script = _first(events, "iPXE script", lambda e: _step(e) == "http.script")

    def fetched(name):
        return lambda e: e["kind"] == "http.file" and f"{image.name}/{name}" in e["message"]

    kernel = _first(events, "kernel download", fetched("vmlinuz"))
    initrd = _first(events, "initrd download", fetched("initrd"))
    callback = _first(events, "call-back", lambda e: e["kind"] == "boot.callback")
    assert dhcp < script < kernel < callback and script < initrd < callback, steps
    booting = _first(events, "booting", lambda e: e["data"].get("to") == "booting")
    assert events[booting]["data"]["from"] == "enrolled" and booting <= dhcp, steps
    shown = json.loads(cli("nodes", "show", node, "--json", state_dir=state).stdout)
    assert shown["state"] == "booting", shown

    vm = json.loads(paths.info.read_text())
    from_qemu = events[callback]["ts"] - vm["started"]
    total = events[callback]["ts"] - wall_started
    _report(
        capsys,
        f"metalseed boot: power on -> callback {total:.2f} s (QEMU start -> callback "
        f"{from_qemu:.2f} s; console: {console.timeline()})",
    )

    pid = vm_pid(paths)
    assert pid is not None, "the image halts after calling home: the machine stays on"
    cli("power", "off", node, state_dir=state)
    deadline = time.monotonic() + 15
    while vm_pid(paths) is not None or _alive(pid):
        assert time.monotonic() < deadline, f"QEMU pid {pid} still running after power off"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited child not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_kvm_is_used_only_when_the_cpu_can(tmp_path):
    from bootstrap.lab.qemu import VmPaths, VmSpec, kvm_usable, qemu_argv

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme sse2 hypervisor\n")
    assert not kvm_usable(cpuinfo, Path("/dev/kvm"))  # /dev/kvm exists here; no vmx/svm
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vmx sse2\n")
    assert not kvm_usable(cpuinfo, tmp_path / "no-kvm")
    spec = VmSpec("m1", str(uuid.uuid4()), "52:54:00:00:00:01", "tap-m1", disks=(64,))
    argv = qemu_argv(spec, VmPaths(tmp_path, "m1"), "tcg")
    joined = " ".join(argv)
    assert "accel=tcg" in joined and "-cpu host" not in joined
    assert f"type=1,uuid={spec.uuid}" in argv and "-nographic" in argv
    assert f"virtio-net-pci,netdev=net0,mac={spec.mac},bootindex=1" in argv
    assert f"file:{tmp_path / 'm1.serial.log'}" in argv
    assert any(a.startswith(f"file={tmp_path / 'm1.disk0.img'},if=virtio") for a in argv)

"""The netboot part of ``make demo``: one QEMU machine, from BMC power-on to call-home.

A provisioning segment is built inside network namespaces made for the demo
(a switch namespace with a bridge and the VM's tap, a seed namespace with
``prov0``); nothing touches the host's own interfaces. The machine's
simulated BMC listens on loopback and its power hook starts and stops the
QEMU process (TCG: this machine has no usable KVM). The seed's commands run
for real: ``serve`` in the seed namespace, ``discover``, ``boot-device pxe``
and ``power on`` against the BMC. The VM's real firmware (SeaBIOS and the
``ipxe-qemu`` ROM) DHCPs from metalseed, fetches its iPXE script, a Debian
kernel and the call-back initramfs over HTTP, and the initramfs POSTs home.
Everything started is stopped by PID, the namespaces are removed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .console import Console, ConsoleTimeout

SEED_PREFIX = "10.98.0"
SEED_IP = f"{SEED_PREFIX}.1"
POOL = f"{SEED_PREFIX}.100-{SEED_PREFIX}.150"
BMC_ADDRESS = "127.0.1.40"
CALLBACK_TIMEOUT = 120.0

Run = Callable[..., float]


def why_not() -> str:
    """Why the netboot demo cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "it needs root (network namespaces, a tap device, DHCP on port 67)"
    for tool in ("qemu-system-x86_64", "ip", "apt-get"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup)"
    return ""


def _wait_file(path: Path, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {timeout:.0f} s:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _events(ms: list[str], node: str) -> list[dict]:
    out = subprocess.run(
        [*ms, "events", node, "--json", "--limit", "500"], capture_output=True, text=True
    )
    return sorted(json.loads(out.stdout or "[]"), key=lambda e: e["id"])


def netboot_demo(run: Run, me: list[str], work: Path, port: int, creds: Path) -> dict[str, float]:
    """Run the netboot demo; returns its timings. Raises on a failed step."""
    from ..image.callback import default_cache, ensure_callback_image
    from .netns import NetnsLab
    from .qemu import VmPaths, VmSpec, hook_command, lab_mac, stop_vm, write_machines

    state = work / "state"
    ms = [*me, "--state-dir", str(state)]
    timings: dict[str, float] = {}

    print("\n== netboot: a QEMU machine powered on through its BMC ==", flush=True)
    started = time.monotonic()
    image = ensure_callback_image(state / "images", cache_dir=default_cache(), make_current=True)
    timings["call-back image ready"] = time.monotonic() - started
    print(
        f"image {image.name}: Debian kernel + busybox call-back initramfs "
        f"({', '.join(sorted(image.files))}), made current"
    )

    guid = str(uuid.uuid4())
    vm_state = work / "vms"
    vm_state.mkdir()
    machines_file = work / "machines.json"
    serve = sim = None
    spec = None
    lab = NetnsLab()
    try:
        switch = lab.namespace("sw")
        bridge = lab.bridge(switch)
        seed = lab.namespace("seed")
        lab.link(switch, bridge, seed, "prov0", address=f"{SEED_IP}/24")
        tap = lab.tap(switch, bridge, "tap-vm1")
        spec = VmSpec(name="vm1", uuid=guid, mac=lab_mac(guid), tap=tap, netns=switch.name)
        write_machines(machines_file, vm_state, [spec])
        print(
            f"segment: namespace {seed.name} (prov0 {SEED_IP}/24) <-> bridge in {switch.name} "
            f"<-> VM vm1 (MAC {spec.mac}, SMBIOS UUID {guid})"
        )

        serve_log = work / "serve.log"
        argv = [*ms, "serve", "--interface", "prov0", "--mode", "full", "--pool", POOL]
        argv += ["--http-port", "80"]
        print(
            f"\n$ ip netns exec {seed.name} metalseed serve --interface prov0 --mode full "
            f"--pool {POOL} --http-port 80 &"
        )
        with serve_log.open("w") as fh:
            serve = seed.popen(argv, stdout=fh, stderr=subprocess.STDOUT)
        _wait_file(state / "serve.json", serve, serve_log, "metalseed serve", 60)

        bmc_spec = work / "vm-bmc.json"
        bmc_spec.write_text(
            json.dumps({"bmcs": [{"address": BMC_ADDRESS, "port": port, "guid": guid}]})
        )
        manifest = work / "vm-bmc-manifest.json"
        sim_log = work / "vm-bmc.log"
        hook = hook_command(machines_file)
        print(f"$ metalseed lab bmc --spec {bmc_spec.name} --power-hook '<start/stop vm1>' &")
        with sim_log.open("w") as fh:
            sim = subprocess.Popen(
                [
                    *me,
                    "lab",
                    "bmc",
                    "--spec",
                    str(bmc_spec),
                    "--power-hook",
                    hook,
                    "--credentials",
                    str(creds),
                    "--manifest",
                    str(manifest),
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        _wait_file(manifest, sim, sim_log, "the BMC simulator", 20)

        endpoint = f"{BMC_ADDRESS}:{port}"
        timings["discover vm1's BMC"] = run(
            [*ms, "discover", endpoint, "--credentials", str(creds), "--rotate"]
        )
        run([*ms, "boot-device", "pxe", endpoint])
        paths = VmPaths(vm_state, spec.name)
        power_started = time.monotonic()
        wall_started = time.time()
        run([*ms, "power", "on", endpoint])
        console = Console(paths.serial, power_started)
        try:
            console.wait_for("callback", CALLBACK_TIMEOUT)
        except ConsoleTimeout as exc:
            raise RuntimeError(f"vm1 did not call home: {exc}") from None
        finally:
            console.close()
        node = _node_of(ms, endpoint)
        events: list[dict] = []
        deadline = time.monotonic() + 15
        while not any(e["kind"] == "boot.callback" for e in events):
            if time.monotonic() > deadline:
                raise RuntimeError("vm1 called home but the seed recorded no boot.callback")
            time.sleep(0.3)
            events = _events(ms, node)
        callback_ts = next(e["ts"] for e in events if e["kind"] == "boot.callback")
        timings["power on -> call-home"] = callback_ts - wall_started
        print(f"\nvm1's console, seconds after power-on: {console.timeline()}")
        run([*ms, "events", node, "--limit", "14"])
        run([*ms, "nodes", "show", node])
        timings["power off"] = run([*ms, "power", "off", endpoint])
        return timings
    finally:
        if spec is not None:
            stop_vm(spec.name, vm_state)
        _stop(sim)
        _stop(serve)
        lab.close()


def _node_of(ms: list[str], endpoint: str) -> str:
    out = subprocess.run([*ms, "nodes", "list", "--json"], capture_output=True, text=True)
    for node in json.loads(out.stdout or "[]"):
        if node.get("bmc") == endpoint:
            return node["node"] if "node" in node else node["id"]
    raise RuntimeError(f"no node with BMC {endpoint}: {shlex.quote(out.stdout)[:400]}")


if __name__ == "__main__":  # pragma: no cover - run through bootstrap.lab.demo
    sys.exit("run `make demo` (python -m bootstrap.lab.demo)")

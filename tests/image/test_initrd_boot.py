"""The node image's kernel and initrd in QEMU: fetch, verify, switch root -- or refuse.

QEMU boots ``vmlinuz`` + ``initrd`` directly (``-kernel``/``-initrd``, the
command line the seed's iPXE script would pass) on a tap in a switch
namespace; a seed namespace runs dnsmasq (DHCP for the initrd's udhcpc) and a
recording HTTP server (the rootfs, and POSTs logged as JSON lines).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import RECORDER, stop_process

pytestmark = [
    pytest.mark.image,
    pytest.mark.qemu,
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.timeout(900),
]

SEED_IP = "10.96.0.1"
PORT = 8080
MAC = "52:54:00:4d:53:02"
TOKEN = "tok-" + "5ecret" * 4
BOOT_TIMEOUT = 420  # TCG: download, sha256 and a full systemd boot, on a busy box


def _report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n  {text}", flush=True)


@pytest.fixture
def seed(image_host, netlab, tmp_path):
    """A seed namespace (DHCP + recording HTTP) and a switch namespace for QEMU's tap."""
    for tool in ("qemu-system-x86_64", "dnsmasq"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup.sh)")
    switch = netlab.namespace("isw")
    bridge = netlab.bridge(switch)
    seed_ns = netlab.namespace("iseed")
    netlab.link(switch, bridge, seed_ns, "prov0", address=f"{SEED_IP}/24")
    tap = netlab.tap(switch, bridge, "tap-node")
    www = tmp_path / "www"
    www.mkdir()
    log = tmp_path / "http.log"
    procs = [
        seed_ns.popen(
            [
                "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                "--interface=prov0", "--bind-interfaces", "--no-ping",
                "--dhcp-range=10.96.0.100,10.96.0.150,255.255.255.0,1h",
                f"--dhcp-leasefile={tmp_path / 'leases'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        seed_ns.popen(
            [sys.executable, "-c", RECORDER, str(www), str(PORT), str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]  # fmt: skip
    time.sleep(0.5)
    ctx = {"switch": switch, "tap": tap, "www": www, "log": log, "procs": procs}
    yield ctx
    for proc in reversed(procs):
        stop_process(proc)


def _boot(seed, node_image, tmp_path, rootfs: Path, sha256: str) -> tuple[subprocess.Popen, Path]:
    from bootstrap.lab.qemu import accelerator

    (seed["www"] / "rootfs.squashfs").symlink_to(rootfs)
    url = f"http://{SEED_IP}:{PORT}"
    cmdline = (
        f"{node_image.manifest['cmdline']} BOOTIF=01-{MAC.replace(':', '-')} "
        f"metalseed.url={url} metalseed.node=node-9 metalseed.token={TOKEN} metalseed.mac={MAC} "
        f"metalseed.rootfs={url}/rootfs.squashfs?mac={MAC.replace(':', '-')} "
        f"metalseed.rootfs_sha256={sha256} {os.environ.get('METALSEED_TEST_CMDLINE', '')}"
    )
    serial = tmp_path / "serial.log"
    accel = accelerator()
    argv = [
        "qemu-system-x86_64", "-machine", f"pc,accel={accel}", "-m", "1536", "-smp", "1",
        "-kernel", str(node_image.files["vmlinuz"]), "-initrd", str(node_image.files["initrd"]),
        "-append", cmdline, "-nographic", "-serial", f"file:{serial}", "-monitor", "none",
        "-netdev", f"tap,id=n0,ifname={seed['tap']},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC}", "-no-reboot",
    ]  # fmt: skip
    if accel == "kvm":
        argv += ["-cpu", "host"]
    proc = seed["switch"].popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seed["procs"].append(proc)
    return proc, serial


def _posts(seed, path: str) -> list[dict]:
    records = map(json.loads, seed["log"].read_text().splitlines())
    return [r for r in records if r.get("path") == path]


def _wait_for(serial: Path, proc: subprocess.Popen, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = serial.read_text(errors="replace") if serial.exists() else ""
        if text in out:
            return out
        assert "boot stopped:" not in out, out[-3000:]
        assert proc.poll() is None, f"QEMU exited {proc.returncode}:\n{out[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not on the console after {timeout} s:\n{out[-3000:]}")


def test_checksum_mismatch_refuses_to_boot_and_tells_the_seed(node_image, seed, tmp_path):
    fake = tmp_path / "not-the-rootfs.squashfs"
    fake.write_bytes(b"metalseed" * 100_000)
    want = "ab" * 32
    got = hashlib.sha256(fake.read_bytes()).hexdigest()
    proc, serial = _boot(seed, node_image, tmp_path, fake, want)
    line = f"metalseed: rootfs checksum mismatch: expected {want} got {got} — refusing to boot"
    console = _wait_for(serial, proc, "reboot: System halted", BOOT_TIMEOUT)
    assert "boot stopped: rootfs checksum mismatch" in console
    assert line in console
    assert "switching root" not in console
    assert TOKEN not in console  # neither the init nor the kernel (loglevel=4) prints it

    posts = _posts(seed, "/api/v1/callback")
    assert len(posts) == 1, posts
    assert posts[0]["auth"] == f"Bearer {TOKEN}"
    assert json.loads(posts[0]["body"]) == {
        "mac": MAC,
        "node": "node-9",
        "stage": "initrd",
        "error": "rootfs sha256 mismatch",
    }


def test_good_rootfs_switches_root_to_systemd(node_image, seed, tmp_path, capsys):
    rootfs = node_image.files["rootfs.squashfs"]
    sha256 = node_image.manifest["files"]["rootfs.squashfs"]["sha256"]
    started = time.monotonic()
    proc, serial = _boot(seed, node_image, tmp_path, rootfs, sha256)
    _wait_for(serial, proc, "rootfs: sha256 ok", BOOT_TIMEOUT)
    verified = time.monotonic() - started
    console = _wait_for(serial, proc, "login:", BOOT_TIMEOUT)
    booted = time.monotonic() - started
    assert "switching root to systemd" in console
    assert "Debian GNU/Linux 12" in console
    assert TOKEN not in console
    # systemd-networkd leased the NIC again and the agent called the seed: the network,
    # the firewall's outbound side and the agent's unit all work after switch_root
    deadline = time.monotonic() + 120
    while not (enlists := _posts(seed, "/api/v1/enlist")):
        assert time.monotonic() < deadline, "the node agent never called the seed"
        time.sleep(1)
    assert enlists[0]["auth"] == f"Bearer {TOKEN}"
    assert json.loads(enlists[0]["body"])["mac"] == MAC
    assert not _posts(seed, "/api/v1/callback")  # no error report from the initrd
    console = serial.read_text(errors="replace")
    failed = [line for line in console.splitlines() if "FAILED" in line]
    # the recorder is no seed: its answer does not satisfy the agent; nothing else may fail
    assert all("metalseed-" in line for line in failed), failed
    _report(capsys, f"QEMU: rootfs verified {verified:.1f} s, login prompt {booted:.1f} s")

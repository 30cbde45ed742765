"""Fixtures for QEMU machines: the call-back image, a provisioning segment, VMs.

A provisioning segment is a switch namespace with a bridge, a seed namespace
wired to it as ``prov0``, and a tap per VM on the bridge; QEMU runs in the
switch namespace (it must run where its tap lives). Every VM and service a
fixture starts is stopped by PID before the namespaces are removed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import stop_process

SEED_PREFIX = "10.97.0"
SEED_IP = f"{SEED_PREFIX}.1"
POOL = f"{SEED_PREFIX}.100-{SEED_PREFIX}.150"
HTTP_PORT = 8080


@pytest.fixture(scope="session")
def kernel_cache() -> Path:
    from bootstrap.image.callback import default_cache

    return default_cache()


@pytest.fixture(scope="session")
def qemu_available() -> None:
    if os.geteuid() != 0:
        pytest.skip("QEMU machines need root (taps, namespaces)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (make setup)")


@pytest.fixture(scope="session")
def callback_build(kernel_cache: Path, qemu_available, tmp_path_factory):
    """The call-back image built from the cached Debian kernel (fetched once if missing)."""
    from bootstrap.image.callback import build_callback, fetch_kernel

    kernel = fetch_kernel(kernel_cache)
    return build_callback(kernel, tmp_path_factory.mktemp("callback"))


@dataclasses.dataclass
class Segment:
    """One provisioning L2 segment in namespaces."""

    lab: object
    switch: object  # Netns: the bridge, the taps, QEMU
    seed: object  # Netns: prov0 with SEED_IP
    bridge: str
    interface: str = "prov0"


@pytest.fixture
def segment(netlab) -> Segment:
    switch = netlab.namespace("sw")
    bridge = netlab.bridge(switch)
    seed = netlab.namespace("seed")
    netlab.link(switch, bridge, seed, "prov0", address=f"{SEED_IP}/24")
    return Segment(netlab, switch, seed, bridge)


@pytest.fixture
def vms(segment: Segment, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Make VM specs with a tap on the segment; every VM is stopped by PID afterwards."""
    from bootstrap.lab.qemu import VmSpec, stop_vm, write_machines

    state = tmp_path / "vms"
    state.mkdir()
    machines_file = tmp_path / "machines.json"
    specs: list[VmSpec] = []

    def make(name: str, mac: str, guid: str | None = None) -> VmSpec:
        tap = segment.lab.tap(segment.switch, segment.bridge, f"tap-{name}")
        spec = VmSpec(
            name=name, uuid=guid or str(uuid.uuid4()), mac=mac, tap=tap, netns=segment.switch.name
        )
        specs.append(spec)
        write_machines(machines_file, state, specs)
        return spec

    make.state_dir = state  # type: ignore[attr-defined]
    make.machines_file = machines_file  # type: ignore[attr-defined]
    yield make
    for spec in specs:
        stop_vm(spec.name, state)


@pytest.fixture
def seed_process(segment: Segment, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start long-running processes in the seed namespace; stopped by PID afterwards."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        with log.open("w") as fh:
            proc = segment.seed.popen(argv, stdout=fh, stderr=subprocess.STDOUT, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        stop_process(proc)

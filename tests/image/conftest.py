"""Fixtures for the node image: built (or taken from the cache) once per session.

* ``node_image``: ``build_image`` with the real recipe, into the image cache
  (``$METALSEED_IMAGE_CACHE``, default ``/var/cache/metalseed/images``): the
  first session builds it (about two minutes), later ones reuse it.
* ``rootfs``: the image's squashfs mounted read-only; ``scratch_root`` a
  writable overlay on it for commands that need to write (``sshd -T`` wants
  host keys and ``/run/sshd``), discarded after the session.
* ``boot_machine``: boots a root tree with its own systemd under
  ``systemd-nspawn --boot``, inside network namespaces made for the test
  (``NetnsLab``), on a fresh overlay so the tree is never modified. The
  segment has a "provisioning" peer running dnsmasq (DHCP and the hostname)
  and an "outsider" address on the same peer outside the provisioning range.

Everything is undone in finalizers: nspawn and dnsmasq stopped by PID, mounts
unmounted (loop devices go with them), namespaces deleted.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, is_root, stop_process

PREFIX = "10.98.0"
PEER_IP = f"{PREFIX}.1"  # inside the provisioning range given to the machine
OUTSIDER_IP = f"{PREFIX}.200"  # same segment, outside it
MACHINE_IP = f"{PREFIX}.10"
MACHINE_MAC = "52:54:00:4d:53:01"
MACHINE_HOSTNAME = "node-7"
PROVISIONING_CIDR = f"{PREFIX}.0/25"


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 120)
    return subprocess.run(argv, **kwargs)


def _umount(path: Path) -> None:
    if os.path.ismount(path):
        proc = _run(["umount", str(path)])
        if proc.returncode != 0:  # something still inside: let it go when it can
            _run(["umount", "--lazy", str(path)])


@pytest.fixture(scope="session")
def image_host() -> None:
    if not is_root():
        pytest.skip("the node image needs root (debootstrap, chroot, loop mounts)")
    missing = [t for t in ("debootstrap", "mksquashfs", "unshare") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/setup.sh)")


@pytest.fixture(scope="session")
def node_image(image_host):
    """The real node image (``Built``), from the cache when the recipe is unchanged."""
    from bootstrap.image.build import AGENT_DIR, ImageCache, Inputs, build_image, default_cache

    if not (AGENT_DIR / "__main__.py").is_file():
        pytest.skip("bootstrap/agent/ is not in the tree yet")
    return build_image(Inputs(), ImageCache(default_cache()))


@pytest.fixture(scope="session")
def rootfs(node_image, tmp_path_factory) -> Iterator[Path]:
    """The image's rootfs.squashfs mounted read-only (loop; freed on unmount)."""
    mnt = tmp_path_factory.mktemp("rootfs")
    proc = _run(
        [
            "mount",
            "-t",
            "squashfs",
            "-o",
            "ro,loop",
            str(node_image.files["rootfs.squashfs"]),
            str(mnt),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    try:
        yield mnt
    finally:
        _umount(mnt)


def overlay(lower: Path, work: Path) -> Path:
    """A writable overlay on ``lower`` under ``work``; unmount ``work/merged`` afterwards."""
    for sub in ("upper", "work", "merged"):
        (work / sub).mkdir(parents=True)
    opts = f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}"
    proc = _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(work / "merged")])
    assert proc.returncode == 0, proc.stderr
    return work / "merged"


@pytest.fixture(scope="session")
def scratch_root(rootfs, tmp_path_factory) -> Iterator[Path]:
    """A throw-away writable view of the image (overlay) for chrooted commands."""
    merged = overlay(rootfs, tmp_path_factory.mktemp("scratch"))
    try:
        yield merged
    finally:
        _umount(merged)


# -- booted machines -----------------------------------------------------------------------


@dataclasses.dataclass
class Machine:
    """A root tree booted with its own systemd in network namespaces made for the test."""

    root: Path  # the overlay the machine runs on (its writes land in the upper dir)
    proc: subprocess.Popen  # systemd-nspawn
    netns: object  # Netns of the machine
    peer: object  # Netns of the provisioning peer (dnsmasq, ssh clients)
    log: Path

    @property
    def leader(self) -> int:
        """The PID of the machine's systemd (nspawn's child)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a command inside the machine (all its namespaces)."""
        return _run(["nsenter", "-t", str(self.leader), "-a", *argv], timeout=timeout)

    def wait_booted(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"nspawn exited {self.proc.returncode}: {self.log.read_text()}"
                )
            try:
                state = self.run("systemctl", "is-system-running", timeout=10).stdout.strip()
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                state = ""
            if state in ("running", "degraded"):
                return state
            time.sleep(0.5)
        raise AssertionError(f"machine not booted after {timeout} s (state {state!r})")


@pytest.fixture(scope="session")
def lynis_files(image_host) -> Path:
    """Debian's lynis on the host, to copy into a machine (the image must not ship it)."""
    for path in ("/usr/sbin/lynis", "/usr/share/lynis/include", "/etc/lynis/plugins"):
        if not Path(path).exists():
            pytest.skip("lynis is not installed (scripts/setup.sh)")
    return Path("/usr/share/lynis")


def install_lynis(root: Path) -> str:
    """Copy lynis into ``root/var/tmp/lynis`` (an overlay's upper dir); its path inside."""
    dest = root / "var/tmp/lynis"
    dest.mkdir(parents=True)
    shutil.copy2("/usr/sbin/lynis", dest / "lynis")
    shutil.copytree("/usr/share/lynis/include", dest / "include")
    shutil.copytree("/usr/share/lynis/db", dest / "db")
    shutil.copytree("/etc/lynis/plugins", dest / "plugins")
    shutil.copy2("/etc/lynis/default.prf", dest / "default.prf")
    return "/var/tmp/lynis"


class Booter:
    """Boots root trees as machines; ``close()`` stops them and removes what was made."""

    def __init__(self, lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.started: list[subprocess.Popen] = []
        self.mounts: list[Path] = []

    def boot(self, tree: Path, name: str) -> Machine:
        """Boot ``tree`` (never modified: the machine runs on an overlay) wired to a peer."""
        lab, tmp = self.lab, self.tmp
        switch = lab.namespace(f"{name}sw")
        bridge = lab.bridge(switch)
        node = lab.namespace(f"{name}node")
        peer = lab.namespace(f"{name}peer")
        lab.link(switch, bridge, node, "eth0", mac=MACHINE_MAC)
        lab.link(switch, bridge, peer, "eth0", address=f"{PEER_IP}/24")
        peer.ip("addr", "add", f"{OUTSIDER_IP}/24", "dev", "eth0")
        dnsmasq = peer.popen(
            [
                "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                "--interface=eth0", "--bind-interfaces", "--no-ping",
                f"--dhcp-range={PREFIX}.100,{PREFIX}.150,255.255.255.0,1h",
                f"--dhcp-host={MACHINE_MAC},{MACHINE_IP},{MACHINE_HOSTNAME}",
                f"--dhcp-leasefile={tmp / f'{name}.leases'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.started.append(dnsmasq)
        merged = overlay(tree, tmp / f"{name}-overlay")
        self.mounts.append(merged)
        log = tmp / f"{name}-nspawn.log"
        with log.open("w") as fh:
            proc = subprocess.Popen(
                [
                    "systemd-nspawn", "--quiet", "-D", str(merged), "--boot",
                    "--register=no", "--keep-unit", f"--machine=ms-{name}",
                    f"--network-namespace-path=/run/netns/{node.name}",
                    "--capability=CAP_NET_ADMIN", "--console=pipe",
                ],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                # /proc/sys/net of its own namespace writable: systemd-sysctl applies the
                # image's network sysctls as on hardware (the kernel-wide ones stay the host's)
                env={**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"},
                cwd=REPO,
            )  # fmt: skip
        self.started.append(proc)
        machine = Machine(merged, proc, node, peer, log)
        deadline = time.monotonic() + 10
        while True:
            try:
                machine.leader  # noqa: B018 -- the container's init exists
                break
            except (OSError, IndexError, ValueError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nspawn did not start: {log.read_text()}") from None
                time.sleep(0.1)
        return machine

    def close(self) -> None:
        for proc in reversed(self.started):  # nspawn turns SIGTERM into an orderly poweroff
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    stop_process(proc, grace=5)
        self.started.clear()
        for merged in self.mounts:
            _umount(merged)
        self.mounts.clear()


@pytest.fixture(scope="module")
def booter(image_host, tmp_path_factory) -> Iterator[Booter]:
    """A ``Booter`` for this module's machines; all stopped and removed afterwards."""
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn is not installed (systemd-container)")
    from bootstrap.lab.netns import NetnsLab

    lab = NetnsLab()
    booter = Booter(lab, tmp_path_factory.mktemp("machines"))
    try:
        yield booter
    finally:
        try:
            booter.close()
        finally:
            lab.close()


@pytest.fixture(scope="session")
def stock_minbase(image_host) -> Path:
    """A stock Debian minbase with systemd and openssh-server (lynis's baseline).

    debootstrap'ed once into the image cache (``stock-minbase/root``) and reused;
    booted machines run on overlays of it, so it stays stock.
    """
    from bootstrap.image.build import ImageCache, Inputs, default_cache

    recipe = Inputs().recipe()
    cache = ImageCache(default_cache())
    base = cache.root / "stock-minbase"
    if (base / ".complete").exists():
        return base / "root"
    with cache.locked(lambda _text, _fraction: None):
        if not (base / ".complete").exists():
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            cache.debs.mkdir(exist_ok=True)
            argv = [
                "debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,openssh-server",
                f"--cache-dir={cache.debs}", recipe.suite, str(base / "root"), recipe.mirror,
            ]  # fmt: skip
            proc = _run(argv, timeout=900)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            (base / ".complete").write_text("")
    return base / "root"

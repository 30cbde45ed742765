"""The ``netns`` machine kind: a network namespace that netboots and runs the real image.

A netns machine is a namespace ``msl<ID>-m<N>`` with one veth ``eth0`` (its
MAC) on the provisioning bridge, and sparse disk files under
``LAB/machines/NAME/diskK.img``. Powering it on starts a *runner*::

    ip netns exec msl<ID>-m<N> python -m bootstrap.lab.netnsmachine run LAB_DIR NAME

(``ip netns exec`` execs it: the recorded PID is the runner's, and it gets a
mount namespace of its own, so its mounts die with it). The runner

1. netboots with the firmware emulator (DHCP as PXE and iPXE, TFTP, HTTP
   script, kernel, initrd and rootfs checked against their sha256);
2. loop-attaches the disk files, mounts the downloaded squashfs read-only
   under a tmpfs upper with overlayfs (every loop device and mount point
   recorded in ``lab.json`` first);
3. writes into the overlay the kernel command line, a DMI directory with the
   machine's UUID, and a drop-in that points the real agent at them;
4. runs ``systemd-nspawn --boot`` in the machine's namespace with the disks
   bound in, and waits. SIGTERM (power off) becomes an orderly shutdown of
   the container (SIGKILL after a grace); then it unmounts and detaches.

``release()`` cleans up what a killed runner left, from the record and from
``losetup`` (loop devices backed by the lab's files).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .labstate import LOCK_FILE, LabState, LabStore, Machine, Process, runs, stop

log = logging.getLogger(__name__)

INTERFACE = "eth0"
RETRY = 5.0  # seconds between failed network boots, as a PXE ROM retries
SHUTDOWN_GRACE = 45.0  # a container's orderly poweroff before SIGKILL
NSPAWN_REBOOT = 133  # systemd-nspawn's exit status when the container rebooted
LAB_ETC = "etc/metalseed-lab"  # inside the machine: cmdline and DMI
DROPIN = "etc/systemd/system/metalseed-agent.service.d/lab.conf"


@dataclasses.dataclass(frozen=True)
class Paths:
    lab_dir: Path
    name: str

    @property
    def dir(self) -> Path:
        return self.lab_dir / "machines" / self.name

    def disk(self, k: int) -> Path:
        return self.dir / f"disk{k}.img"

    @property
    def boot(self) -> Path:
        return self.dir / "boot"

    @property
    def lower(self) -> Path:
        return self.dir / "lower"

    @property
    def tmp(self) -> Path:
        return self.dir / "tmp"

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def runner_pid(self) -> Path:
        return self.dir / "runner.pid"

    @property
    def nspawn_pid(self) -> Path:
        return self.dir / "nspawn.pid"

    @property
    def log(self) -> Path:
        return self.dir / "runner.log"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


# -- the host side: create, power, release ----------------------------------------------------


def create_disks(paths: Paths, sizes: list[int]) -> None:
    paths.dir.mkdir(parents=True, exist_ok=True)
    for k, size in enumerate(sizes):
        if not paths.disk(k).exists():
            with paths.disk(k).open("wb") as fh:
                fh.truncate(size << 20)  # sparse


def _runner_process(paths: Paths) -> Process | None:
    try:
        pid = int(paths.runner_pid.read_text())
    except (OSError, ValueError):
        return None
    tag = f"bootstrap.lab.netnsmachine run {paths.lab_dir} {paths.name} "
    return Process(name=f"runner-{paths.name}", pid=pid, tag=tag)


def _nspawn_process(paths: Paths) -> Process | None:
    try:
        pid = int(paths.nspawn_pid.read_text())
    except (OSError, ValueError):
        return None
    return Process(name=f"nspawn-{paths.name}", pid=pid, tag=f"--directory={paths.root} ")


def running(paths: Paths) -> bool:
    process = _runner_process(paths)
    return process is not None and runs(process)


def power_on(lab_dir: Path, state: LabState, machine: Machine, python: str = sys.executable) -> int:
    """Start the machine's runner unless it runs; its PID."""
    paths = Paths(lab_dir, machine.name)
    paths.dir.mkdir(parents=True, exist_ok=True)
    with (paths.dir / "power.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = _runner_process(paths)
        if current is not None and runs(current):
            return current.pid
        argv = ["ip", "netns", "exec", machine.netns, python, "-m", "bootstrap.lab.netnsmachine"]
        argv += ["run", str(lab_dir), machine.name]
        with paths.log.open("a") as fh:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        paths.runner_pid.write_text(f"{proc.pid}\n")
        log.info("machine %s powered on: runner pid %s", machine.name, proc.pid)
        return proc.pid


def power_off(lab_dir: Path, machine: Machine) -> bool:
    """Stop the runner (it shuts the container down and cleans up); True if it ran."""
    paths = Paths(lab_dir, machine.name)
    stopped = False
    runner = _runner_process(paths)
    if runner is not None:
        stopped = stop(runner, grace=SHUTDOWN_GRACE + 15)
    orphan = _nspawn_process(paths)  # a killed runner leaves its container behind
    if orphan is not None and runs(orphan):
        stop(orphan, grace=SHUTDOWN_GRACE)
        stopped = True
    paths.runner_pid.unlink(missing_ok=True)
    return stopped


def _lab_loops(lab_dir: Path) -> list[str]:
    """Loop devices backed by a file under the lab directory (``losetup -J``)."""
    proc = _run(["losetup", "-J"], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    prefix = str(lab_dir.resolve()) + "/"
    return [
        dev["name"]
        for dev in json.loads(proc.stdout).get("loopdevices", [])
        if (dev.get("back-file") or "").split(" (deleted)")[0].startswith(prefix)
    ]


def _mounted(path: str) -> bool:
    with open("/proc/self/mounts") as fh:
        return any(line.split()[1] == path for line in fh if len(line.split()) > 1)


def unmount(path: str) -> None:
    while _mounted(path):
        if _run(["umount", path], check=False).returncode != 0:
            _run(["umount", "--lazy", path], check=False)
            break


def release(lab_dir: Path, state: LabState) -> int:
    """Unmount the recorded mounts, detach the lab's loop devices; how many were detached."""
    for mount in reversed(state.mounts):
        unmount(mount)
    detached = 0
    for dev in dict.fromkeys([*state.loops, *_lab_loops(lab_dir)]):
        if _run(["losetup", "-d", dev], check=False).returncode == 0:
            detached += 1
    return detached


# -- the runner ---------------------------------------------------------------------------------


def _record(lab_dir: Path, mutate, *, wait: bool = True) -> bool:
    """Change lab.json under its lock (if the lab still exists); False if not done."""
    store = LabStore(lab_dir)
    with (lab_dir / LOCK_FILE).open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # `lab down` holds it: it releases everything itself
        state = store.load()
        if state is None:
            return False
        mutate(state)
        store.save(state)
        return True


def mount_cgroups() -> None:
    """Give this mount namespace the host's cgroup hierarchies, for systemd-nspawn.

    ``ip netns exec`` mounts a fresh sysfs for the machine's namespace, which
    hides ``/sys/fs/cgroup``. The runner's mount namespace is its own, so
    mounting the hierarchies again here (the same ones: the kernel reuses
    them) leaves the host alone and goes away with the runner.
    """
    base = "/sys/fs/cgroup"
    if _mounted(base):
        return
    _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "cgroup-root", base])
    with open("/proc/cgroups") as fh:
        controllers = [
            line.split()[0]
            for line in fh
            if not line.startswith("#") and len(line.split()) >= 4 and line.split()[3] == "1"
        ]
    hierarchies = [(c, c) for c in controllers] + [("systemd", "none,name=systemd")]
    for name, opts in hierarchies:
        os.makedirs(f"{base}/{name}", exist_ok=True)
        _run(["mount", "-t", "cgroup", "-o", opts, "cgroup", f"{base}/{name}"], check=False)
    os.makedirs(f"{base}/unified", exist_ok=True)
    _run(["mount", "-t", "cgroup2", "cgroup2", f"{base}/unified"], check=False)


class Runner:
    """One power-on of one machine: netboot, overlay, nspawn, teardown."""

    def __init__(self, lab_dir: Path, machine: Machine, lab_id: str) -> None:
        self.lab_dir = lab_dir
        self.machine = machine
        self.lab_id = lab_id
        self.paths = Paths(lab_dir, machine.name)
        self.off = threading.Event()
        self.loops: list[str] = []
        self.mounts: list[str] = []

    def netboot(self) -> tuple[Path, str] | None:
        from .firmware import BootContext, Options, boot_machine

        booted: dict[str, object] = {}

        def on_boot(context: BootContext) -> None:
            if context.rootfs is None or context.rootfs.path is None:
                raise RuntimeError("the boot script names no metalseed.rootfs")
            booted.update(rootfs=Path(context.rootfs.path), cmdline=context.cmdline)

        options = Options(download_dir=self.paths.boot, fetch_rootfs=True)
        result = boot_machine(
            INTERFACE, self.machine.mac, self.machine.uuid,
            options=options, on_boot=on_boot, cancel=self.off, keep_address=False,
        )  # fmt: skip
        (self.paths.dir / "firmware.json").write_text(json.dumps(result.to_json(), indent=2))
        steps = ", ".join(f"{s.name} {s.seconds:.2f}s" for s in result.steps)
        log.info("%s: firmware %s in %.1f s (%s)", self.machine.name, result.outcome,
                 result.total, steps)  # fmt: skip
        if result.outcome != "booted" or "rootfs" not in booted:
            log.warning("%s: no boot (%s): %s", self.machine.name, result.outcome, result.error)
            return None
        return booted["rootfs"], str(booted["cmdline"])  # type: ignore[return-value]

    def attach_disks(self) -> None:
        for k in range(len(self.machine.disks)):
            dev = _run(["losetup", "--find", "--show", str(self.paths.disk(k))]).stdout.strip()
            self.loops.append(dev)
            _record(self.lab_dir, lambda s, d=dev: s.loops.append(d))

    def mount(self, rootfs: Path) -> None:
        paths = self.paths
        targets = [str(paths.lower), str(paths.tmp), str(paths.root)]
        _record(self.lab_dir, lambda s: s.mounts.extend(t for t in targets if t not in s.mounts))
        for target in targets:
            Path(target).mkdir(parents=True, exist_ok=True)
        self.mounts.append(str(paths.lower))
        _run(["mount", "-t", "squashfs", "-o", "ro,loop", str(rootfs), str(paths.lower)])
        self.mounts.append(str(paths.tmp))
        _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "lab-upper", str(paths.tmp)])
        (paths.tmp / "upper").mkdir()
        (paths.tmp / "work").mkdir()
        opts = f"lowerdir={paths.lower},upperdir={paths.tmp / 'upper'},workdir={paths.tmp / 'work'}"
        self.mounts.append(str(paths.root))
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(paths.root)])

    def write_machine_files(self, cmdline: str) -> None:
        root = self.paths.root
        etc = root / LAB_ETC
        (etc / "dmi").mkdir(parents=True, exist_ok=True)
        etc.chmod(0o700)
        fd = os.open(etc / "cmdline", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:  # the join token is in it
            fh.write(cmdline.strip() + "\n")
        dmi = {
            "product_uuid": self.machine.uuid.lower(),
            "sys_vendor": "metalseed-lab",
            "product_name": "netns machine",
        }
        for key, value in dmi.items():
            (etc / "dmi" / key).write_text(value + "\n")
        disks = ",".join(Path(d).name for d in self.loops)
        dropin = root / DROPIN
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(
            "# written by the metalseed lab: a netns machine has no kernel command line or\n"
            "# DMI of its own, so the agent reads them from files\n"
            "[Unit]\n"
            "ConditionKernelCommandLine=\n"
            "\n"
            "[Service]\n"
            f"Environment=METALSEED_AGENT_CMDLINE=/{LAB_ETC}/cmdline "
            f"METALSEED_AGENT_DMI_DIR=/{LAB_ETC}/dmi METALSEED_AGENT_DISKS={disks}\n"
        )

    def nspawn_argv(self) -> list[str]:
        argv = [
            "systemd-nspawn", "--quiet", f"--directory={self.paths.root}", "--boot",
            "--register=no", "--keep-unit", f"--machine={self.machine.name}",
            f"--network-namespace-path=/run/netns/{self.machine.netns}",
            "--capability=CAP_NET_ADMIN", "--console=pipe",
        ]  # fmt: skip
        return argv + [f"--bind={dev}" for dev in self.loops]

    def nspawn(self) -> int | None:
        """Run the container until it exits (its status) or power-off (None)."""
        env = {**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
        with self.paths.console.open("a") as fh:
            proc = subprocess.Popen(
                self.nspawn_argv(), stdin=subprocess.DEVNULL, stdout=fh,
                stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        self.paths.nspawn_pid.write_text(f"{proc.pid}\n")
        log.info("%s: systemd-nspawn pid %s booting the image", self.machine.name, proc.pid)
        try:
            while proc.poll() is None:
                if self.off.wait(0.5):
                    proc.send_signal(signal.SIGTERM)  # nspawn: an orderly container poweroff
                    try:
                        proc.wait(SHUTDOWN_GRACE)
                    except subprocess.TimeoutExpired:
                        log.warning("%s: container did not stop; killing", self.machine.name)
                        proc.kill()
                        proc.wait()
                    return None
            log.info("%s: container exited %s", self.machine.name, proc.returncode)
            return proc.returncode
        finally:
            self.paths.nspawn_pid.unlink(missing_ok=True)

    def teardown(self) -> None:
        for mount in reversed(self.mounts):
            unmount(mount)
        for dev in self.loops:
            _run(["losetup", "-d", dev], check=False)
        mounts, loops = list(self.mounts), list(self.loops)

        def forget(s: LabState) -> None:
            s.mounts[:] = [m for m in s.mounts if m not in mounts]
            s.loops[:] = [d for d in s.loops if d not in loops]

        _record(self.lab_dir, forget, wait=False)
        self.mounts.clear()
        self.loops.clear()

    def run(self) -> int:
        while not self.off.is_set():
            booted = self.netboot()
            if booted is None:
                if self.off.wait(RETRY):
                    break
                continue
            rootfs, cmdline = booted
            try:
                self.attach_disks()
                self.mount(rootfs)
                self.write_machine_files(cmdline)
                status = self.nspawn()
            finally:
                self.teardown()
            if status != NSPAWN_REBOOT:
                break
        log.info("%s: powered off", self.machine.name)
        return 0


def run(lab_dir: Path, name: str) -> int:
    state = LabStore(lab_dir).load()
    machine = state.machine(name) if state else None
    if state is None or machine is None or machine.kind != "netns":
        log.error("no netns machine %s in the lab at %s", name, lab_dir)
        return 2
    runner = Runner(lab_dir, machine, state.id)
    mount_cgroups()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.off.set())
    return runner.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bootstrap.lab.netnsmachine")
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="power-on of one netns machine (in its namespace)")
    r.add_argument("lab_dir", type=Path)
    r.add_argument("name")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s netnsmachine: %(message)s", stream=sys.stderr
    )
    return run(args.lab_dir, args.name)


if __name__ == "__main__":
    sys.exit(main())

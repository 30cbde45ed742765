"""The heavy part of ``metalseed image build``: from nothing to the image's files.

``assemble_image`` runs the recipe in ``images/node/`` (see ``build.py`` for
the cache around it):

1. ``debootstrap --variant=minbase`` of the suite, its downloads kept in the
   cache's ``debs/``;
2. the recipe's dpkg excludes, then one apt run in the image root: the package
   list plus every update from the release, its updates and security suites;
3. the kernel out of the image's ``/boot`` (``vmlinuz``), its modules trimmed
   by the recipe and indexed, the initrd built from them (``initrd.py``);
4. the recipe's ``rootfs/`` files and the node agent copied in, then
   ``customize.sh`` run in the image root (hardening, trimming);
5. the setuid check, the package list (``dpkg-query``), ``mksquashfs``.

Commands inside the image root run chrooted in a private mount namespace
(``unshare --mount``) holding the API filesystems and bind mounts they need,
so no mount outlives its step, whatever happens to the build.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from .build import (
    AGENT_TARGET,
    Assembled,
    ImageBuildError,
    ImageFetchError,
    Inputs,
    Progress,
    Recipe,
    parse_dpkg_query,
)
from .initrd import node_initrd

log = logging.getLogger(__name__)

TOOLS = ("debootstrap", "mksquashfs", "unshare", "chroot", "dpkg-query")


def check_host() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building the node image needs root (debootstrap, chroot, mounts)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageBuildError(f"missing tools: {', '.join(missing)} (run scripts/setup.sh)")


#: steps of a build and the share of the time each takes (for the progress bar)
STEPS = {
    "debootstrap": (0.00, 0.10),
    "packages": (0.10, 0.55),
    "kernel and initrd": (0.55, 0.60),
    "customize": (0.60, 0.64),
    "squashfs": (0.64, 0.99),
}

#: runs inside a private mount namespace: API filesystems and bind mounts for ROOT,
#: then the command chrooted. Arguments: ROOT [SRC DEST]... -- COMMAND...
_IN_ROOT = r"""
set -e
root=$1
shift
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
while [ "$1" != "--" ]; do
	mount --bind "$1" "$root$2"
	shift 2
done
shift
exec chroot "$root" "$@"
"""
#: a private mount and PID namespace per step: its mounts vanish with it, and when
#: unshare dies (with us: see _die_with_parent) everything in the step dies too
_UNSHARE = [
    "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--",
]  # fmt: skip
_CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "TERM": "dumb",
}
_FETCH_FAILED = re.compile(
    r"Failed to fetch|Temporary failure resolving|Couldn't download|Could not resolve"
    r"|Failed getting release file|Couldn't retrieve"
)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the build process dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


class _Step:
    """One step's subprocesses: output to the build log, progress from output lines."""

    def __init__(self, name: str, log_path: Path, report: Progress) -> None:
        self.name = name
        self.log_path = log_path
        self.report = report
        self.start, self.end = STEPS.get(name, (0.0, 0.0))
        report(name, self.start)
        log.info("image build: %s", name)

    def fraction(self, done: float) -> None:
        done = min(max(done, 0.0), 1.0)
        self.report(self.name, self.start + (self.end - self.start) * done)

    def run(
        self,
        argv: Sequence[str],
        *,
        on_line: Callable[[str], float | None] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 3600,
    ) -> str:
        tail: list[str] = []
        with self.log_path.open("ab") as logf:
            # the command itself, without the namespace set-up around it
            shown = list(argv)
            if "--" in shown:
                shown = shown[len(shown) - shown[::-1].index("--") :]
            logf.write(f"\n$ {' '.join(shown)[:500]}\n".encode())
            logf.flush()
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise ImageBuildError(f"{self.name}: {shown[0]}: {exc}") from None
            assert proc.stdout is not None
            watchdog = threading.Timer(timeout, proc.kill)
            watchdog.start()
            buffered = b""
            while chunk := proc.stdout.read1(65536):
                logf.write(chunk)
                buffered += chunk
                *lines, buffered = re.split(rb"[\r\n]", buffered)
                for raw in lines:
                    line = raw.decode(errors="replace").strip()
                    if line:
                        tail = (tail + [line])[-15:]
                        if on_line and (done := on_line(line)) is not None:
                            self.fraction(done)
            rc = proc.wait()
            watchdog.cancel()
        if rc != 0:
            text = "\n  ".join(tail)
            cls = ImageFetchError if _FETCH_FAILED.search(text) else ImageBuildError
            raise cls(f"{self.name}: {shown[0]} exited {rc}; last output:\n  {text}")
        return "\n".join(tail)

    def in_root(
        self,
        root: Path,
        argv: Sequence[str],
        *,
        binds: Sequence[tuple[Path, str]] = (),
        env: Mapping[str, str] | None = None,
        on_line: Callable[[str], float | None] | None = None,
    ) -> str:
        mounts = [str(x) for src, dest in binds for x in (src, dest)]
        cmd = [*_UNSHARE, "sh", "-c", _IN_ROOT, "in-root", str(root), *mounts, "--", *argv]
        return self.run(cmd, env={**_CHROOT_ENV, **(env or {})}, on_line=on_line)


def _counter(patterns: Sequence[str], expected: Callable[[], int]) -> Callable[[str], float | None]:
    """Progress from output: matching lines so far over ``expected()`` (0: unknown)."""
    seen = [0]
    regex = re.compile("|".join(patterns))

    def on_line(line: str) -> float | None:
        if regex.match(line):
            seen[0] += 1
            total = expected()
            return seen[0] / total if total else None
        return None

    return on_line


def assemble_image(
    recipe: Recipe, inputs: Inputs, root: Path, out: Path, debs: Path, report: Progress
) -> Assembled:
    """debootstrap, packages, kernel + initrd, recipe files + agent, customize, squashfs."""
    log_path = out.parent / "build.log"
    agent = inputs.agent_files()  # fails early when the agent is missing

    step = _Step("debootstrap", log_path, report)
    phases = {
        "I: Retrieving": 0.1,
        "I: Extracting": 0.4,
        "I: Installing": 0.6,
        "I: Configuring": 0.8,
    }
    step.run(
        [
            *_UNSHARE,  # debootstrap mounts /proc etc. in the root: not in our namespace
            "debootstrap",
            "--variant=minbase",
            f"--cache-dir={debs.resolve()}",
            recipe.suite,
            str(root),
            recipe.mirror,
        ],
        on_line=lambda line: next((v for k, v in phases.items() if line.startswith(k)), None),
        env={**_CHROOT_ENV, "PATH": os.environ.get("PATH", _CHROOT_ENV["PATH"])},
    )

    step = _Step("packages", log_path, report)
    _copy_tree(inputs.recipe_dir / "rootfs" / "etc" / "dpkg", root / "etc" / "dpkg")
    (root / "etc/apt/sources.list").write_text("\n".join(recipe.apt_sources) + "\n")
    for extra in (root / "etc/apt/sources.list.d").glob("*"):
        extra.unlink()
    (root / "etc/apt/apt.conf.d/90metalseed-build").write_text(
        'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
        'Acquire::Languages "none";\nAcquire::Retries "3";\nAPT::Sandbox::User "root";\n'
    )
    policy = root / "usr/sbin/policy-rc.d"  # no service starts inside the build
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    total = [0]

    def apt_line(line: str) -> float | None:
        if m := re.match(r"(\d+) upgraded, (\d+) newly installed", line):
            total[0] += 2 * (int(m.group(1)) + int(m.group(2)))
        return counter(line)

    counter = _counter([r"Unpacking ", r"Setting up "], lambda: total[0])
    script = 'apt-get -q update && apt-get -y -q dist-upgrade && apt-get -y -q install "$@"'
    step.in_root(
        root,
        ["sh", "-c", script, "apt", *recipe.packages],
        binds=[(debs.resolve(), "/var/cache/apt/archives")],
        on_line=apt_line,
    )

    step = _Step("kernel and initrd", log_path, report)
    kernel, modules = _kernel(step, root, recipe, inputs, out)

    step = _Step("customize", log_path, report)
    _copy_tree(inputs.recipe_dir / "rootfs", root)
    for name, src in agent.items():
        dest = root / AGENT_TARGET / name
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        shutil.copyfile(src, dest)
        dest.chmod(0o644)
    shutil.copyfile(inputs.recipe_dir / "customize.sh", root / ".metalseed-customize.sh")
    env = {
        "METALSEED_PURGE": " ".join(recipe.purge),
        "METALSEED_SETUID_ALLOWED": " ".join(recipe.setuid_allowed),
    }
    try:
        step.in_root(root, ["sh", "/.metalseed-customize.sh"], env=env)
    finally:
        (root / ".metalseed-customize.sh").unlink(missing_ok=True)
    setuid = sorted(_setuid_files(root))
    if unexpected := sorted(set(setuid) - set(recipe.setuid_allowed)):
        raise ImageBuildError(
            f"setuid/setgid files left that the recipe does not allow: {unexpected}"
        )
    query = subprocess.run(
        [
            "dpkg-query",
            f"--admindir={root / 'var/lib/dpkg'}",
            "-W",
            "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if query.returncode != 0:
        raise ImageBuildError(f"dpkg-query failed: {query.stderr.strip()}")
    packages = parse_dpkg_query(query.stdout)

    step = _Step("squashfs", log_path, report)
    step.run(
        [
            "mksquashfs",
            str(root),
            str(out / "rootfs.squashfs"),
            "-noappend",
            "-comp",
            "zstd",
            "-Xcompression-level",
            str(recipe.squashfs_compression_level),
            "-processors",
            str(os.cpu_count() or 1),
        ],
        on_line=lambda line: (
            int(m.group(1)) / 100 if (m := re.search(r"\s(\d+)%$", line)) else None
        ),
    )
    shutil.rmtree(root)
    return Assembled(packages=packages, kernel=kernel, initrd_modules=modules, setuid=setuid)


def _kernel(
    step: _Step, root: Path, recipe: Recipe, inputs: Inputs, out: Path
) -> tuple[str, list[str]]:
    """``vmlinuz`` out of the image, its modules trimmed and indexed, the initrd built."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one kernel in the image's /boot, found {len(kernels)}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    modules_dir = root / "usr/lib/modules" / version
    if not modules_dir.is_dir():  # not a merged-/usr root
        modules_dir = root / "lib/modules" / version
    for sub in recipe.kernel_modules_exclude:
        shutil.rmtree(modules_dir / sub, ignore_errors=True)
    step.in_root(root, ["depmod", "-a", version])
    shutil.copyfile(kernels[0], out / "vmlinuz")
    initrd, modules = node_initrd(
        inputs.recipe_dir, inputs.busybox, modules_dir, recipe.initrd_modules
    )
    (out / "initrd").write_bytes(initrd)
    return version, modules


def _copy_tree(src: Path, dest: Path) -> None:
    """Copy a recipe tree into the image: root-owned, 0755 dirs, 0644 or 0755 files."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(0o755)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            shutil.copyfile(path, target)
            target.chmod(0o755 if os.access(path, os.X_OK) else 0o644)


def _setuid_files(root: Path) -> Iterator[str]:
    """Regular files with a setuid or setgid bit, as absolute paths inside the image."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            st = path.lstat()
            if (st.st_mode & 0o170000) == 0o100000 and st.st_mode & 0o6000:
                yield "/" + path.relative_to(root).as_posix()

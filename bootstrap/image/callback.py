"""The call-back image: a Debian kernel and a busybox initramfs that phones home.

A small test image for netboot: it proves a machine got from power-on through
DHCP, iPXE and a kernel to userspace on the provisioning network, by POSTing
to the seed's ``/api/v1/callback``. The recipe (``init``, the udhcpc script)
lives in ``images/callback/``; this module puts it together:

* ``fetch_kernel``: the concrete package ``linux-image-amd64`` depends on, got
  with ``apt-get download`` (never installed into the host's ``/boot``) and
  unpacked with ``dpkg-deb -x`` into a cache directory. Idempotent; once
  fetched it works offline.
* ``build_callback``: ``vmlinuz`` and ``initrd`` (gzip'ed newc cpio written
  here, byte-for-byte reproducible) into an output directory, skipped when
  the inputs have not changed.
* ``ensure_callback_image``: both, then registered in the image catalogue.

Run ``python -m bootstrap.image.callback fetch-kernel`` (what
``scripts/fetch-kernel.sh`` does) or ``... build --images DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import FatalError, MetalseedError, NotFoundError, UsageError
from .catalogue import Catalogue, Image
from .initrd import Entry, load_order, module_bytes, newc_archive, parse_modules_dep

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("/var/cache/metalseed")
CACHE_ENV = "METALSEED_KERNEL_CACHE"
META_PACKAGE = "linux-image-amd64"
RECIPE_DIR = Path(__file__).resolve().parents[2] / "images" / "callback"
BUSYBOX = Path("/bin/busybox")
#: what the image needs; their dependencies are added from modules.dep, in load order
WANTED_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "e1000")
#: serial console for the lab's QEMU machines; after the call-back the machine halts, so
#: its power stays what its BMC says until the BMC turns it off
DEFAULT_CMDLINE = "console=ttyS0 loglevel=4 metalseed.after=halt"
DEFAULT_NAME = "callback"
_COMPLETE = ".complete"


class KernelFetchError(FatalError):
    """The kernel package could not be resolved, downloaded or unpacked."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    package: str  # e.g. linux-image-6.1.0-56-amd64
    version: str  # uname -r, e.g. 6.1.0-56-amd64
    root: Path  # the unpacked package

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.version


# -- the kernel package ---------------------------------------------------------


def default_cache() -> Path:
    """``$METALSEED_KERNEL_CACHE``, else ``/var/cache/metalseed`` (read when called)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def resolve_kernel_package(meta: str = META_PACKAGE) -> str:
    """The concrete kernel package ``meta`` depends on, from the local apt cache."""
    try:
        proc = subprocess.run(
            ["apt-cache", "depends", meta], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelFetchError(f"apt-cache depends {meta}: {exc}") from None
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and not m.group(1).startswith("<"):
            return m.group(1)
    raise KernelFetchError(
        f"apt-cache depends {meta} names no linux-image package "
        f"(exit {proc.returncode}: {proc.stderr.strip()}); run apt-get update?"
    )


def _kernel_in(root: Path, package: str) -> Kernel:
    boots = sorted((root / "boot").glob("vmlinuz-*"))
    if len(boots) != 1:
        raise KernelFetchError(f"{package}: expected one vmlinuz in {root / 'boot'}")
    return Kernel(package, boots[0].name.removeprefix("vmlinuz-"), root)


def cached_kernels(cache_dir: Path) -> list[Kernel]:
    """Completely unpacked kernels in ``cache_dir/kernel``, newest first."""
    base = cache_dir / "kernel"
    if not base.is_dir():
        return []
    done = [d for d in base.iterdir() if (d / _COMPLETE).is_file()]
    done.sort(key=lambda d: (d / _COMPLETE).stat().st_mtime, reverse=True)
    return [_kernel_in(d / "root", d.name) for d in done]


def fetch_kernel(
    cache_dir: Path = DEFAULT_CACHE,
    package: str | None = None,
    *,
    update: bool = False,
    offline: bool = False,
) -> Kernel:
    """The Debian kernel unpacked under ``cache_dir/kernel/PACKAGE/root``.

    With a kernel already cached and no ``package`` named, that kernel is used
    as it is (no apt at all) unless ``update`` asks for the one
    ``linux-image-amd64`` currently depends on. ``offline`` never downloads.
    """
    cached = cached_kernels(cache_dir)
    if package is None and (offline or (cached and not update)):
        if not cached:
            raise KernelFetchError(f"no kernel cached in {cache_dir / 'kernel'}")
        return cached[0]
    if package is None:
        try:
            package = resolve_kernel_package()
        except KernelFetchError as exc:
            if not cached:
                raise
            log.warning("%s; using cached %s", exc, cached[0].package)
            return cached[0]
    if not re.fullmatch(r"linux-image-[A-Za-z0-9.+~-]+", package):
        raise KernelFetchError(f"not a kernel package name: {package!r}")
    target = cache_dir / "kernel" / package
    if (target / _COMPLETE).exists():
        return _kernel_in(target / "root", package)
    if offline:
        raise KernelFetchError(f"{package} is not cached in {cache_dir / 'kernel'}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download at a time; the next finds it done
        if not (target / _COMPLETE).exists():
            work = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=target.parent))
            try:
                _download_unpack(package, work)
                (work / _COMPLETE).write_text(_kernel_in(work / "root", package).version + "\n")
                if target.exists():  # an incomplete earlier attempt
                    shutil.rmtree(target)
                os.rename(work, target)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
    return _kernel_in(target / "root", package)


def _run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=600, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelFetchError(f"{argv[0]}: {exc}") from None
    if proc.returncode != 0:
        raise KernelFetchError(f"{' '.join(argv[:2])}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _download_unpack(package: str, work: Path) -> None:
    """``apt-get download`` into ``work``, unpack to ``work/root``, index its modules."""
    log.info("downloading %s", package)
    work.chmod(0o755)  # apt's sandbox user must be able to write the .deb here
    _run(["apt-get", "download", "-q", package], cwd=work)
    debs = list(work.glob("*.deb"))
    if len(debs) != 1:
        raise KernelFetchError(f"apt-get download {package} left {len(debs)} .deb files")
    deb = debs[0]
    _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
    (work / "deb").write_text(deb.name + "\n")
    deb.unlink()  # 70 MB; the unpacked tree is what is used
    kernel = _kernel_in(work / "root", package)
    # the package ships no modules.dep (its postinst makes it): index the unpacked tree
    _run(["depmod", "-b", str(work / "root"), kernel.version])


# -- the initramfs --------------------------------------------------------------


def initramfs_entries(
    recipe: Path, busybox: Path, modules: Sequence[tuple[str, Path]]
) -> list[Entry]:
    """The initramfs tree: busybox, the init and udhcpc scripts, modules and their load order."""
    d, x, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
    entries = [Entry(p, d) for p in ("bin", "dev", "etc", "etc/metalseed", "lib", "lib/modules")]
    entries += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("bin/busybox", x, busybox.read_bytes()),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        Entry("init", x, (recipe / "init").read_bytes()),
        Entry("etc/metalseed/udhcpc.script", x, (recipe / "udhcpc.script").read_bytes()),
        Entry("etc/metalseed/modules", f, "".join(f"{m}\n" for m, _ in modules).encode()),
    ]
    entries += [Entry(f"lib/modules/{m}.ko", f, module_bytes(path)) for m, path in modules]
    return sorted(entries, key=lambda e: e.path)


# -- the image ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Built:
    """A built call-back image: its files, kernel command line and input digest."""

    files: Mapping[str, Path]
    cmdline: str
    key: str
    kernel: Kernel


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def build_callback(
    kernel: Kernel,
    out_dir: Path,
    *,
    recipe: Path = RECIPE_DIR,
    busybox: Path = BUSYBOX,
    modules: Sequence[str] = WANTED_MODULES,
    cmdline: str = DEFAULT_CMDLINE,
) -> Built:
    """``vmlinuz`` and ``initrd`` in ``out_dir``; unchanged inputs reuse the last build."""
    if not busybox.is_file():
        raise UsageError(f"{busybox} is missing: install busybox-static")
    table = parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    mods = [(m, kernel.modules_dir / table[m][0]) for m in load_order(table, modules)]
    entries = initramfs_entries(recipe, busybox, mods)
    key = _digest(
        kernel.vmlinuz.read_bytes(),
        cmdline.encode(),
        *(e.path.encode() + e.mode.to_bytes(4, "big") + e.data for e in entries),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"vmlinuz": out_dir / "vmlinuz", "initrd": out_dir / "initrd"}
    stamp = out_dir / "build.json"
    try:
        done = json.loads(stamp.read_text()).get("key") == key
    except (OSError, ValueError):
        done = False
    if not (done and all(p.is_file() for p in files.values())):
        stamp.unlink(missing_ok=True)
        _write(files["initrd"], gzip.compress(newc_archive(entries), compresslevel=9, mtime=0))
        _write(files["vmlinuz"], kernel.vmlinuz.read_bytes())
        meta = {"key": key, "kernel": kernel.version, "package": kernel.package}
        _write(stamp, (json.dumps({**meta, "modules": [m for m, _ in mods]}) + "\n").encode())
    return Built(files, cmdline, key, kernel)


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def ensure_callback_image(
    images_dir: Path,
    *,
    name: str = DEFAULT_NAME,
    cache_dir: Path = DEFAULT_CACHE,
    make_current: bool = True,
    cmdline: str = DEFAULT_CMDLINE,
    offline: bool = False,
) -> Image:
    """Fetch the kernel if needed, build the image and put it in the catalogue at ``images_dir``.

    Seconds when everything is cached: an image already in the catalogue from
    the same inputs (and intact) is kept as it is.
    """
    kernel = fetch_kernel(cache_dir, offline=offline)
    built = build_callback(kernel, cache_dir / "callback" / kernel.version, cmdline=cmdline)
    catalogue = Catalogue(images_dir)
    image = None
    try:
        existing = catalogue.get(name)
        if existing.extra.get("build_key") == built.key and not catalogue.verify(name):
            image = existing
    except (NotFoundError, UsageError):  # not there yet, or unreadable: (re)build it
        pass
    if image is None:
        extra = {"kind": "callback", "build_key": built.key, "kernel": kernel.version}
        image = catalogue.add(name, built.files, cmdline=built.cmdline, extra=extra)
    if make_current:
        catalogue.set_current(name)
    return image


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bootstrap.image.callback", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch-kernel", help="download and unpack the Debian kernel (cached)")
    build = sub.add_parser("build", help="build the call-back image into a catalogue")
    for p in (fetch, build):
        p.add_argument(
            "--cache",
            type=Path,
            default=None,
            help=f"cache directory (${CACHE_ENV}, {DEFAULT_CACHE})",
        )
        p.add_argument("--offline", action="store_true", help="use only what is cached")
    fetch.add_argument(
        "--update", action="store_true", help="fetch what linux-image-amd64 depends on now"
    )
    build.add_argument("--images", type=Path, required=True, help="catalogue root (STATE/images)")
    build.add_argument("--name", default=DEFAULT_NAME)
    build.add_argument("--cmdline", default=DEFAULT_CMDLINE, help="kernel command line")
    build.add_argument("--no-current", action="store_true", help="do not make it current")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.cache = args.cache or default_cache()
    try:
        if args.cmd == "fetch-kernel":
            kernel = fetch_kernel(args.cache, update=args.update, offline=args.offline)
            print(f"{kernel.package} ({kernel.version}) in {kernel.root}")
        else:
            image = ensure_callback_image(
                args.images,
                name=args.name,
                cache_dir=args.cache,
                make_current=not args.no_current,
                cmdline=args.cmdline,
                offline=args.offline,
            )
            print(f"image {image.name} in {image.path}: " + ", ".join(sorted(image.files)))
    except MetalseedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

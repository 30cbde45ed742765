"""Busybox initramfs archives: kernel modules in load order, reproducible newc cpio.

Shared by the call-back image (``callback.py``) and the node image
(``build.py``). Everything here is pure except the few functions that read a
module or busybox from disk (``module_bytes``, ``modules_for``,
``busybox_entries``):

* ``parse_modules_dep`` / ``parse_builtin`` read a kernel's ``modules.dep`` and
  ``modules.builtin``; ``load_order`` lists the wanted modules and all they
  depend on, each after its dependencies (built-in ones are left out).
* ``newc_archive`` writes the SVR4 "newc" cpio the kernel unpacks as its
  initramfs, with fixed timestamps and inode numbers: the same entries give the
  same bytes; ``gzip_archive`` compresses it the same way every time.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import lzma
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..errors import UsageError

DIR, EXE, FILE = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644


# -- modules --------------------------------------------------------------------


def module_name(path: str) -> str:
    """``kernel/drivers/net/virtio_net.ko.xz`` -> ``virtio_net`` (dashes as underscores)."""
    return re.sub(r"\.ko(\.\w+)?$", "", path.rsplit("/", 1)[-1]).replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` -> {module name: (relative path, [dependency names])}."""
    table = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        table[module_name(path)] = (path.strip(), [module_name(d) for d in deps.split()])
    return table


def parse_builtin(text: str) -> set[str]:
    """``modules.builtin`` -> the names of modules compiled into the kernel."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(
    table: Mapping[str, tuple[str, list[str]]],
    wanted: Iterable[str],
    builtin: Iterable[str] = (),
) -> list[str]:
    """``wanted`` and everything they depend on, each after its dependencies.

    Modules in ``builtin`` need no loading and are skipped; any other module
    missing from ``table`` is an error.
    """
    inside = {m.replace("-", "_") for m in builtin}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(mod: str) -> None:
        mod = mod.replace("-", "_")
        if mod in order or mod in inside:
            return
        if mod not in table:
            raise UsageError(f"kernel module {mod} is not in modules.dep")
        if mod in visiting:
            raise UsageError(f"kernel module dependency cycle at {mod}")
        visiting.add(mod)
        for dep in table[mod][1]:
            visit(dep)
        visiting.discard(mod)
        order.append(mod)

    for mod in wanted:
        visit(mod)
    return order


def module_bytes(path: Path) -> bytes:
    """A module's ELF bytes: busybox insmod loads plain ``.ko`` files only."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix != ".ko":
        raise UsageError(f"{path.name}: cannot unpack this module compression")
    return data


def modules_for(modules_dir: Path, wanted: Sequence[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of ``wanted`` and their dependencies from a kernel's modules dir."""
    try:
        table = parse_modules_dep((modules_dir / "modules.dep").read_text())
        builtin_file = modules_dir / "modules.builtin"
        builtin = parse_builtin(builtin_file.read_text()) if builtin_file.exists() else set()
    except OSError as exc:
        raise UsageError(f"cannot read the module index in {modules_dir}: {exc}") from None
    return [(m, modules_dir / table[m][0]) for m in load_order(table, wanted, builtin)]


# -- cpio -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file, directory, symlink or device node in the initramfs."""

    path: str  # without a leading slash
    mode: int  # including the type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Sequence[Entry], mtime: int = 0) -> bytes:
    """A newc (SVR4, no CRC) cpio archive, as the kernel unpacks initramfs."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    def header(ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], name: str):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(raw), 0)
        out.write(b"070701" + "".join(f"{v:08x}" for v in fields).encode())
        out.write(raw)
        pad()

    for ino, entry in enumerate(entries, start=1):
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        header(ino, entry.mode, nlink, len(entry.data), entry.rdev, entry.path)
        out.write(entry.data)
        pad()
    header(0, 0, 1, 0, (0, 0), "TRAILER!!!")
    return out.getvalue()


def gzip_archive(entries: Sequence[Entry]) -> bytes:
    """``newc_archive`` gzip'ed with a fixed header: the same entries, the same bytes."""
    return gzip.compress(newc_archive(entries), compresslevel=9, mtime=0)


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """``entries`` plus a directory entry for every missing parent, sorted by path."""
    by_path = {e.path: e for e in entries}
    for path in list(by_path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            by_path.setdefault("/".join(parts[:i]), Entry("/".join(parts[:i]), DIR))
    return sorted(by_path.values(), key=lambda e: e.path)


def base_entries(busybox: bytes) -> list[Entry]:
    """What every busybox initramfs here has: busybox as ``/bin/sh`` and two device nodes."""
    return [
        Entry("dev", DIR),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("bin/busybox", EXE, busybox),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
    ]


def module_entries(modules: Sequence[tuple[str, Path]], listing: str) -> list[Entry]:
    """The modules as ``lib/modules/NAME.ko`` and their load order in ``listing``."""
    entries = [Entry(f"lib/modules/{m}.ko", FILE, module_bytes(path)) for m, path in modules]
    entries.append(Entry(listing, FILE, "".join(f"{m}\n" for m, _ in modules).encode()))
    return entries


def node_initrd(
    recipe_dir: Path, busybox: Path, modules_dir: Path, wanted: Sequence[str]
) -> tuple[bytes, list[str]]:
    """The node image's initrd (gzip'ed cpio) and the modules it loads, in order.

    ``recipe_dir`` holds ``init`` and ``udhcpc.script`` (``images/node``);
    ``modules_dir`` is ``/usr/lib/modules/VERSION`` of the image's own kernel, so
    the modules match the kernel that boots.
    """
    mods = modules_for(modules_dir, wanted)
    entries = [
        *base_entries(busybox.read_bytes()),
        Entry("init", EXE, (recipe_dir / "init").read_bytes()),
        Entry("etc/metalseed/udhcpc.script", EXE, (recipe_dir / "udhcpc.script").read_bytes()),
        *module_entries(mods, "etc/metalseed/modules"),
    ]
    return gzip_archive(with_parents(entries)), [m for m, _ in mods]

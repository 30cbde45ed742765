"""``metalseed image build``: the node image from the recipe in ``images/node/``.

The image is Debian (debootstrap ``--variant=minbase``, then one apt run for the
packages and all updates), hardened and trimmed by the recipe, and comes out as
``vmlinuz``, ``initrd`` (built here with ``initrd.py`` from the image's own
kernel modules), ``rootfs.squashfs`` and ``manifest.json``.

Builds are cached by the *input hash*: sha256 over every recipe file (names,
contents, executable bits), the node agent's sources, the busybox that goes
into the initrd and ``BUILDER_VERSION`` (bump it when a change here changes
what a build produces). An unchanged recipe is a cache hit: no build, just the
import into the catalogue. Layout of the cache (``$METALSEED_IMAGE_CACHE``,
default ``/var/cache/metalseed/images``)::

    .lock               flock: one build at a time
    debs/               .deb files debootstrap and apt downloaded (re-runs fetch nothing)
    builds/HASH/        a finished build: the four files and build.log
    .work-HASH-*/       a build in progress (root/, out/, build.log); never a result
    failed-HASH.log     the log of the last failed build of HASH

A build happens in ``.work-*`` and its ``out/`` is renamed to ``builds/HASH``
only when complete: a crash or a failure leaves no image behind. Every mount a
step needs exists only inside a private mount namespace (``unshare``) that
dies with the step.

``build_image`` takes the heavy part as a parameter (``assemble``, default
``assemble_image``): unit tests replace it to test hashing, caching, locking
and crash safety without debootstrap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..errors import FatalError, RetryableError
from .catalogue import Catalogue, Image, sha256_file

log = logging.getLogger(__name__)

#: bump when a change to this module or initrd.py changes what a build produces
BUILDER_VERSION = 1
REPO = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO / "images" / "node"
AGENT_DIR = REPO / "bootstrap" / "agent"
OSD_SCRIPT = REPO / "roles" / "ceph_osd" / "files" / "osd-device.sh"
BUSYBOX = Path("/bin/busybox")
CACHE_ENV = "METALSEED_IMAGE_CACHE"
DEFAULT_CACHE = Path("/var/cache/metalseed/images")
DEFAULT_NAME = "node"
FILES = ("vmlinuz", "initrd", "rootfs.squashfs")
MANIFEST = "manifest.json"
KEEP_BUILDS = 2
#: where the agent lands in the image (PYTHONPATH of metalseed-agent.service)
AGENT_TARGET = "usr/lib/metalseed"

Progress = Callable[[str, float], None]  # (what is happening, overall fraction 0..1)


class ImageBuildError(FatalError):
    """The image could not be built (bad recipe, missing tool, a step failed)."""


class ImageFetchError(ImageBuildError, RetryableError):
    """A package download failed: the mirror may be back later."""


# -- the recipe (pure) ----------------------------------------------------------------

_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MODULE = re.compile(r"^[A-Za-z0-9_-]+$")
_KERNEL_ARG = re.compile(r"^[\x21-\x7e]+$")


@dataclasses.dataclass(frozen=True)
class Recipe:
    suite: str
    mirror: str
    apt_sources: tuple[str, ...]
    packages: tuple[str, ...]
    purge: tuple[str, ...]
    cmdline: str
    initrd_modules: tuple[str, ...]
    kernel_modules_exclude: tuple[str, ...]
    setuid_allowed: tuple[str, ...]
    squashfs_compression_level: int


def parse_recipe(text: str) -> Recipe:
    """``recipe.toml`` -> ``Recipe``; anything missing, unknown or malformed is an error."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ImageBuildError(f"recipe.toml: {exc}") from None
    fields = {f.name for f in dataclasses.fields(Recipe)}
    if unknown := sorted(set(data) - fields):
        raise ImageBuildError(f"recipe.toml: unknown keys {', '.join(unknown)}")
    if missing := sorted(fields - set(data)):
        raise ImageBuildError(f"recipe.toml: missing keys {', '.join(missing)}")

    def strings(key: str, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ImageBuildError(f"recipe.toml: {key} must be a list of strings")
        bad = [v for v in value if pattern is not None and not pattern.match(v)]
        if bad:
            raise ImageBuildError(f"recipe.toml: {key}: invalid entries {bad}")
        return tuple(value)

    for key in ("suite", "mirror"):
        if not isinstance(data[key], str) or not re.match(r"^[\x21-\x7e]+$", data[key]):
            raise ImageBuildError(f"recipe.toml: {key} must be one word")
    level = data["squashfs_compression_level"]
    if not isinstance(level, int) or not 1 <= level <= 22:
        raise ImageBuildError("recipe.toml: squashfs_compression_level must be 1..22")
    excludes = strings("kernel_modules_exclude", re.compile(r"^kernel/[A-Za-z0-9_/.-]+$"))
    if any(".." in e for e in excludes):
        raise ImageBuildError("recipe.toml: kernel_modules_exclude must stay under kernel/")
    return Recipe(
        suite=data["suite"],
        mirror=data["mirror"],
        apt_sources=strings("apt_sources", re.compile(r"^deb [\x20-\x7e]+$")),
        packages=strings("packages", _PACKAGE),
        purge=strings("purge", _PACKAGE),
        cmdline=" ".join(strings("cmdline", _KERNEL_ARG)),
        initrd_modules=strings("initrd_modules", _MODULE),
        kernel_modules_exclude=excludes,
        setuid_allowed=strings("setuid_allowed", re.compile(r"^/[\x21-\x7e]+$")),
        squashfs_compression_level=level,
    )


# -- inputs and their hash --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Where a build's inputs live. ``agent_dir``: the ``bootstrap/agent`` package."""

    recipe_dir: Path = RECIPE_DIR
    agent_dir: Path = AGENT_DIR
    busybox: Path = BUSYBOX

    def recipe(self) -> Recipe:
        try:
            return parse_recipe((self.recipe_dir / "recipe.toml").read_text())
        except OSError as exc:
            raise ImageBuildError(f"cannot read the recipe: {exc}") from None

    def agent_files(self) -> dict[str, Path]:
        """``{path in the image under usr/lib/metalseed: source}``: bootstrap/__init__.py, agent."""
        sources = sorted(p for p in self.agent_dir.rglob("*.py") if "__pycache__" not in p.parts)
        if not (self.agent_dir / "__main__.py").is_file():
            raise ImageBuildError(
                f"the node agent is missing: {self.agent_dir}/__main__.py does not exist "
                "(bootstrap/agent/ must be in the tree to build the node image)"
            )
        files = {"bootstrap/__init__.py": self.agent_dir.parent / "__init__.py"}
        if not files["bootstrap/__init__.py"].is_file():
            files["bootstrap/__init__.py"] = Path(os.devnull)
        for src in sources:
            files[f"bootstrap/agent/{src.relative_to(self.agent_dir).as_posix()}"] = src
        # the ceph_osd role's script: the agent brings a member's OSDs back with it
        files["osd-device.sh"] = OSD_SCRIPT
        return files

    def hashed_files(self) -> dict[str, tuple[bool, bytes]]:
        """Every input file as ``{name: (executable, contents)}``."""
        out: dict[str, tuple[bool, bytes]] = {}
        if not self.busybox.is_file():
            raise ImageBuildError(f"{self.busybox} is missing: install busybox-static")
        try:
            for path in sorted(self.recipe_dir.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    name = f"recipe/{path.relative_to(self.recipe_dir).as_posix()}"
                    out[name] = (os.access(path, os.X_OK), path.read_bytes())
            for name, src in self.agent_files().items():
                out[f"agent/{name}"] = (False, src.read_bytes())
            out["busybox"] = (True, self.busybox.read_bytes())
        except OSError as exc:
            raise ImageBuildError(f"cannot read the build inputs: {exc}") from None
        return out


def input_hash(files: Mapping[str, tuple[bool, bytes]], builder_version: int) -> str:
    """sha256 over the inputs: order-independent, sensitive to names, contents, exec bits."""
    h = hashlib.sha256(f"metalseed-node-image builder={builder_version}\n".encode())
    for name in sorted(files):
        executable, data = files[name]
        h.update(f"{name}\0{int(executable)}\0{len(data)}\0".encode())
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


# -- manifests (pure) ---------------------------------------------------------------------


def parse_dpkg_query(text: str) -> dict[str, str]:
    """``${Package}\\t${Version}\\t${db:Status-Abbrev}`` lines -> installed {package: version}."""
    packages = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2].startswith("ii"):
            packages[parts[0]] = parts[1]
    return dict(sorted(packages.items()))


@dataclasses.dataclass(frozen=True)
class Assembled:
    """What the heavy part of a build reports besides the files it wrote."""

    packages: Mapping[str, str]
    kernel: str
    initrd_modules: Sequence[str] = ()
    setuid: Sequence[str] = ()


def make_manifest(
    *,
    key: str,
    recipe: Recipe,
    files: Mapping[str, tuple[str, int]],
    assembled: Assembled,
    build_seconds: float,
    built: float,
) -> dict[str, Any]:
    """The build's ``manifest.json``: files (sha256, size), packages, hash, cmdline."""
    return {
        "kind": "node",
        "input_hash": key,
        "builder_version": BUILDER_VERSION,
        "suite": recipe.suite,
        "kernel": assembled.kernel,
        "cmdline": recipe.cmdline,
        "files": {n: {"sha256": s, "size": z} for n, (s, z) in sorted(files.items())},
        "packages": dict(sorted(assembled.packages.items())),
        "initrd_modules": list(assembled.initrd_modules),
        "setuid": sorted(assembled.setuid),
        "built": built,
        "build_seconds": round(build_seconds, 1),
    }


# -- the cache -------------------------------------------------------------------------


def default_cache() -> Path:
    """``$METALSEED_IMAGE_CACHE``, else ``/var/cache/metalseed/images`` (read when called)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


@dataclasses.dataclass(frozen=True)
class Built:
    """A finished build in the cache."""

    path: Path
    manifest: Mapping[str, Any]
    cached: bool  # True: found in the cache, nothing was built

    @property
    def key(self) -> str:
        return self.manifest["input_hash"]

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.path / name for name in FILES}


class ImageCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def debs(self) -> Path:
        return self.root / "debs"

    def build_dir(self, key: str) -> Path:
        return self.root / "builds" / key

    def lookup(self, key: str) -> Built | None:
        """The finished build of ``key`` if it is there and its files have their sizes."""
        path = self.build_dir(key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            sizes = {n: int(manifest["files"][n]["size"]) for n in FILES}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if manifest.get("input_hash") != key:
            return None
        if any(
            not (path / n).is_file() or (path / n).stat().st_size != s for n, s in sizes.items()
        ):
            return None
        return Built(path, manifest, cached=True)

    @contextlib.contextmanager
    def locked(self, progress: Progress) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress("waiting for another image build", 0.0)
                log.info("another image build holds %s; waiting", self.root / ".lock")
                fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def clean_stale(self) -> None:
        """Work dirs of builds that died (call with the lock held: none is running)."""
        for stale in self.root.glob(".work-*"):
            log.info("removing %s (left by an interrupted build)", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def prune(self, keep: int = KEEP_BUILDS) -> None:
        """Keep the ``keep`` most recent builds."""
        builds = sorted(
            (p for p in (self.root / "builds").glob("*") if p.is_dir()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in builds[keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def prune_debs(self, keep: Mapping[str, str], names: Sequence[str] = ()) -> None:
        """Drop downloaded .debs that are not ``keep`` ({package: version}) or in ``names``."""
        for deb in self.debs.glob("*.deb"):
            parts = deb.name.split("_")
            if len(parts) != 3:
                continue
            name, version = parts[0], unquote(parts[1])
            if keep.get(name) != version and name not in names:
                deb.unlink(missing_ok=True)


Assemble = Callable[[Recipe, Inputs, Path, Path, Path, Progress], Assembled]


def build_image(
    inputs: Inputs | None = None,
    cache: ImageCache | None = None,
    *,
    rebuild: bool = False,
    progress: Progress | None = None,
    assemble: Assemble | None = None,
) -> Built:
    """The image for ``inputs``: from the cache, else built (under the cache lock).

    ``assemble(recipe, inputs, root, out, debs, progress)`` does the heavy part:
    it fills ``out`` with ``FILES`` using ``root`` as scratch space.
    """
    inputs = inputs or Inputs()
    cache = cache or ImageCache(default_cache())
    report = progress or (lambda _text, _fraction: None)
    recipe = inputs.recipe()
    key = input_hash(inputs.hashed_files(), BUILDER_VERSION)
    if not rebuild and (hit := cache.lookup(key)):
        report("cached", 1.0)
        return hit
    if assemble is None:
        from .assemble import assemble_image, check_host

        check_host()
        assemble = assemble_image
    try:
        cache.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError(f"cannot use the image cache {cache.root}: {exc}") from None
    with cache.locked(report):
        if not rebuild and (hit := cache.lookup(key)):  # built while we waited
            return hit
        cache.clean_stale()
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".work-{key[:16]}-", dir=cache.root))
        try:
            out, root = work / "out", work / "root"
            out.mkdir()
            cache.debs.mkdir(exist_ok=True)
            try:
                assembled = assemble(recipe, inputs, root, out, cache.debs, report)
            except OSError as exc:  # a file step of the build (disk full, permissions)
                raise ImageBuildError(f"image build failed: {exc}") from None
            report("manifest", 0.99)
            files = {}
            for name in FILES:
                if not (out / name).is_file():
                    raise ImageBuildError(f"the build produced no {name}")
                files[name] = (sha256_file(out / name), (out / name).stat().st_size)
            manifest = make_manifest(
                key=key,
                recipe=recipe,
                files=files,
                assembled=assembled,
                build_seconds=time.monotonic() - started,
                built=time.time(),
            )
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            final = cache.build_dir(key)
            final.parent.mkdir(exist_ok=True)
            if final.exists():  # --rebuild, or a damaged earlier build
                shutil.rmtree(final)
            os.rename(out, final)
        except BaseException:
            if (work / "build.log").exists():
                shutil.copyfile(work / "build.log", cache.root / f"failed-{key}.log")
            shutil.rmtree(work, ignore_errors=True)
            raise
        if (work / "build.log").exists():
            os.rename(work / "build.log", final / "build.log")
        shutil.rmtree(work, ignore_errors=True)
        (cache.root / f"failed-{key}.log").unlink(missing_ok=True)
        cache.prune()
        cache.prune_debs(assembled.packages, recipe.purge)
    report("built", 1.0)
    return Built(final, manifest, cached=False)


def install_image(
    built: Built, images_dir: Path, *, name: str = DEFAULT_NAME, make_current: bool = True
) -> Image:
    """Put ``built`` into the catalogue as ``name``; kept as it is if already there intact.

    "Already there" means the same files (sha256), not just the same input hash:
    ``--rebuild`` of an unchanged recipe (new security updates) is imported.
    """
    catalogue = Catalogue(images_dir)
    image = None
    with contextlib.suppress(FatalError):  # not there yet, or unreadable: import it
        existing = catalogue.get(name)
        same = {n: f.sha256 for n, f in existing.files.items()} == {
            n: built.manifest["files"][n]["sha256"] for n in FILES
        }
        if same and not catalogue.verify(name):
            image = existing
    try:
        if image is None:
            skip = ("files", "cmdline", "name", "created")
            extra = {k: v for k, v in built.manifest.items() if k not in skip}
            cmdline = built.manifest["cmdline"]
            image = catalogue.add(name, built.files, cmdline=cmdline, extra=extra)
        if make_current:
            catalogue.set_current(name)
    except OSError as exc:
        raise ImageBuildError(f"cannot import the image into {images_dir}: {exc}") from None
    return image


def export_image(built: Built, output: Path) -> list[Path]:
    """Copy the build's files and ``manifest.json`` into ``output``."""
    written = []
    try:
        output.mkdir(parents=True, exist_ok=True)
        for name in (*FILES, MANIFEST):
            dest = output / name
            tmp = output / f".{name}.tmp"
            shutil.copyfile(built.path / name, tmp)
            os.replace(tmp, dest)
            written.append(dest)
    except OSError as exc:
        raise ImageBuildError(f"cannot write the image to {output}: {exc}") from None
    return written

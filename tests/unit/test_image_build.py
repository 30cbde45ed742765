"""The node image build around its heavy part: recipe, input hash, manifest, cache.

``build_image`` takes the heavy part (debootstrap, apt, chroot, mksquashfs) as
its ``assemble`` parameter; these tests pass a fake that writes small files at
that I/O boundary, so hashing, caching, locking, crash safety and the
catalogue import run for real without root or a mirror.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from bootstrap.errors import FatalError
from bootstrap.image import build
from bootstrap.image.build import (
    BUILDER_VERSION,
    Assembled,
    ImageBuildError,
    ImageCache,
    Inputs,
    build_image,
    export_image,
    input_hash,
    install_image,
    make_manifest,
    parse_dpkg_query,
    parse_recipe,
)
from bootstrap.image.catalogue import Catalogue
from tests.conftest import REPO, cli

RECIPE = (REPO / "images/node/recipe.toml").read_text()


@pytest.fixture
def inputs(tmp_path: Path) -> Inputs:
    recipe = tmp_path / "recipe"
    (recipe / "rootfs/etc").mkdir(parents=True)
    (recipe / "recipe.toml").write_text(RECIPE)
    (recipe / "init").write_text("#!/bin/sh\n")
    (recipe / "init").chmod(0o755)
    (recipe / "rootfs/etc/issue").write_text("hello\n")
    agent = tmp_path / "src/bootstrap/agent"
    agent.mkdir(parents=True)
    (agent.parent / "__init__.py").write_text("")
    (agent / "__init__.py").write_text("")
    (agent / "__main__.py").write_text("print('agent')\n")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    return Inputs(recipe_dir=recipe, agent_dir=agent, busybox=busybox)


class FakeAssemble:
    """Stands in for ``assemble_image``: small files in ``out``, a log, a call count."""

    def __init__(self, delay: float = 0.0, fail: BaseException | None = None) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail

    def __call__(self, recipe, inputs, root, out, debs, progress) -> Assembled:
        self.calls += 1
        (out.parent / "build.log").write_text("fake build\n")
        progress("debootstrap", 0.1)
        time.sleep(self.delay)
        (out / "vmlinuz").write_bytes(b"kernel")
        (out / "initrd").write_bytes(b"initrd")
        if self.fail is not None:
            raise self.fail
        (out / "rootfs.squashfs").write_bytes(b"squashfs" * 100)
        return Assembled(packages={"systemd": "252"}, kernel="6.1.0-test", setuid=[])


class NewerPackages(FakeAssemble):
    def __call__(self, recipe, inputs, root, out, debs, progress) -> Assembled:
        result = super().__call__(recipe, inputs, root, out, debs, progress)
        (out / "rootfs.squashfs").write_bytes(b"newer squashfs")
        return result


# -- the recipe -----------------------------------------------------------------------------


def test_the_repository_recipe_parses():
    recipe = parse_recipe(RECIPE)
    assert recipe.suite == "bookworm"
    assert {"systemd", "openssh-server", "nftables", "ceph-osd", "python3"} <= set(recipe.packages)
    assert "slab_nomerge" in recipe.cmdline.split()
    assert recipe.setuid_allowed == ()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t + 'extra = "x"\n', "unknown keys extra"),
        (lambda t: t.replace("suite = ", "# suite = "), "missing keys suite"),
        (lambda t: t.replace('"systemd",', '"Bad Name",', 1), "invalid entries"),
        (lambda t: t.replace("= 15", "= 99"), "squashfs_compression_level"),
        (lambda t: t.replace('"kernel/sound"', '"kernel/../../etc"'), "stay under kernel/"),
        (lambda t: t.replace('"slab_nomerge"', '"a b"'), "invalid entries"),
        (lambda t: t + "[", "recipe.toml"),
    ],
)
def test_a_bad_recipe_is_refused_with_the_reason(change, message):
    with pytest.raises(ImageBuildError, match=message):
        parse_recipe(change(RECIPE))


# -- inputs and their hash -----------------------------------------------------------------------


def test_input_hash_is_stable_and_independent_of_order():
    a = {"recipe/x": (False, b"1"), "agent/y": (True, b"2")}
    b = dict(reversed(list(a.items())))
    assert input_hash(a, 1) == input_hash(b, 1)
    assert len(input_hash(a, 1)) == 64


@pytest.mark.parametrize(
    "other",
    [
        {"recipe/x": (False, b"changed"), "agent/y": (True, b"2")},
        {"recipe/x": (True, b"1"), "agent/y": (True, b"2")},  # exec bit
        {"recipe/z": (False, b"1"), "agent/y": (True, b"2")},  # name
        {"recipe/x": (False, b"1")},  # a file less
    ],
)
def test_input_hash_changes_with_content_mode_name_and_files(other):
    base = {"recipe/x": (False, b"1"), "agent/y": (True, b"2")}
    assert input_hash(base, 1) != input_hash(other, 1)


def test_input_hash_changes_with_the_builder_version():
    files = {"recipe/x": (False, b"1")}
    assert input_hash(files, 1) != input_hash(files, 2)


def test_hashed_files_cover_recipe_agent_sources_and_busybox(inputs):
    files = inputs.hashed_files()
    assert files["recipe/init"] == (True, b"#!/bin/sh\n")
    assert "recipe/rootfs/etc/issue" in files
    assert "agent/bootstrap/__init__.py" in files
    assert files["agent/bootstrap/agent/__main__.py"][1] == b"print('agent')\n"
    assert files["busybox"][1] == b"\x7fELF busybox"
    before = input_hash(files, BUILDER_VERSION)

    (inputs.agent_dir / "__pycache__").mkdir()
    (inputs.agent_dir / "__pycache__/x.cpython-311.pyc").write_bytes(b"junk")
    (inputs.agent_dir / "notes.txt").write_text("not code")
    assert input_hash(inputs.hashed_files(), BUILDER_VERSION) == before  # *.py only

    (inputs.agent_dir / "inventory.py").write_text("X = 1\n")
    assert input_hash(inputs.hashed_files(), BUILDER_VERSION) != before


def test_a_missing_agent_fails_clearly(inputs):
    shutil.rmtree(inputs.agent_dir)
    with pytest.raises(ImageBuildError, match="node agent is missing"):
        inputs.hashed_files()


# -- manifests -------------------------------------------------------------------------------


def test_dpkg_query_output_keeps_installed_packages_only():
    text = "systemd\t252.39-1\tii \nbinutils\t2.40-2\trc \nfoo\t1\tun \nzlib1g\t1:1.2\tii \n"
    assert parse_dpkg_query(text) == {"systemd": "252.39-1", "zlib1g": "1:1.2"}


def test_manifest_has_files_packages_hash_and_cmdline():
    recipe = parse_recipe(RECIPE)
    manifest = make_manifest(
        key="k" * 64,
        recipe=recipe,
        files={"vmlinuz": ("aa", 3), "initrd": ("bb", 4)},
        assembled=Assembled(packages={"b": "2", "a": "1"}, kernel="6.1", setuid=["/x"]),
        build_seconds=12.34,
        built=1000.0,
    )
    assert manifest["files"] == {
        "initrd": {"sha256": "bb", "size": 4},
        "vmlinuz": {"sha256": "aa", "size": 3},
    }
    assert list(manifest["packages"]) == ["a", "b"]
    assert manifest["input_hash"] == "k" * 64
    assert manifest["cmdline"] == recipe.cmdline
    assert manifest["kernel"] == "6.1" and manifest["setuid"] == ["/x"]
    assert manifest["builder_version"] == BUILDER_VERSION
    json.dumps(manifest)  # serialisable as it is


# -- the cache ---------------------------------------------------------------------------------


def test_first_build_assembles_then_the_cache_answers(inputs, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    fake = FakeAssemble()
    seen = []
    first = build_image(inputs, cache, assemble=fake, progress=lambda t, f: seen.append((t, f)))
    assert fake.calls == 1 and not first.cached
    assert first.path == cache.build_dir(first.key)
    assert (first.path / "build.log").read_text() == "fake build\n"
    for name, path in first.files.items():
        assert path.stat().st_size == first.manifest["files"][name]["size"]
    assert seen[-1] == ("built", 1.0)

    again = build_image(inputs, cache, assemble=fake)
    assert fake.calls == 1 and again.cached
    assert again.manifest == first.manifest

    build_image(inputs, cache, assemble=fake, rebuild=True)
    assert fake.calls == 2


def test_a_changed_recipe_builds_again(inputs, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    fake = FakeAssemble()
    first = build_image(inputs, cache, assemble=fake)
    (inputs.recipe_dir / "rootfs/etc/issue").write_text("changed\n")
    second = build_image(inputs, cache, assemble=fake)
    assert fake.calls == 2 and second.key != first.key


def test_a_damaged_cached_build_is_rebuilt(inputs, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    fake = FakeAssemble()
    first = build_image(inputs, cache, assemble=fake)
    first.files["rootfs.squashfs"].write_bytes(b"truncated")
    assert cache.lookup(first.key) is None
    build_image(inputs, cache, assemble=fake)
    assert fake.calls == 2


@pytest.mark.parametrize("error", [ImageBuildError("apt failed"), KeyboardInterrupt()])
def test_a_failed_build_leaves_no_image_behind(inputs, tmp_path, error):
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(type(error)):
        build_image(inputs, cache, assemble=FakeAssemble(fail=error))
    assert not list((cache.root / "builds").glob("*"))
    assert not list(cache.root.glob(".work-*"))
    logs = list(cache.root.glob("failed-*.log"))
    assert len(logs) == 1 and logs[0].read_text() == "fake build\n"
    # the next good build works and clears the failure log
    build_image(inputs, cache, assemble=FakeAssemble())
    assert not list(cache.root.glob("failed-*.log"))


def test_a_missing_output_file_is_a_failed_build(inputs, tmp_path):
    class NoRootfs(FakeAssemble):
        def __call__(self, recipe, inputs, root, out, debs, progress):
            result = super().__call__(recipe, inputs, root, out, debs, progress)
            (out / "rootfs.squashfs").unlink()
            return result

    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(ImageBuildError, match="no rootfs.squashfs"):
        build_image(inputs, cache, assemble=NoRootfs())
    assert cache.lookup(input_hash(inputs.hashed_files(), BUILDER_VERSION)) is None


def test_work_left_by_a_killed_build_is_cleaned_by_the_next(inputs, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    stale = cache.root / ".work-0123456789abcdef-dead"
    (stale / "root/usr").mkdir(parents=True)
    build_image(inputs, cache, assemble=FakeAssemble())
    assert not stale.exists()


def test_only_the_newest_builds_are_kept(inputs, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    keys = []
    for n in range(4):
        (inputs.recipe_dir / "rootfs/etc/issue").write_text(f"{n}\n")
        keys.append(build_image(inputs, cache, assemble=FakeAssemble()).key)
        time.sleep(0.01)  # distinct mtimes
    kept = {p.name for p in (cache.root / "builds").iterdir()}
    assert kept == set(keys[-build.KEEP_BUILDS :])


def test_downloaded_debs_not_in_the_new_build_are_dropped(inputs, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    cache.debs.mkdir(parents=True)
    names = [
        "systemd_252_amd64.deb",  # in the build: kept
        "systemd_251_amd64.deb",  # an older version: dropped
        "zlib1g_1%3a1.2_amd64.deb",  # not installed: dropped
        "binutils_2.40-2_amd64.deb",  # purged by the recipe, needed by the next build: kept
        "partial",
    ]
    for name in names:
        (cache.debs / name).write_text("")
    build_image(inputs, cache, assemble=FakeAssemble())
    left = sorted(p.name for p in cache.debs.iterdir())
    assert left == ["binutils_2.40-2_amd64.deb", "partial", "systemd_252_amd64.deb"]


def test_an_unusable_cache_directory_is_a_build_error(inputs, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ImageBuildError, match="cannot use the image cache"):
        build_image(inputs, ImageCache(tmp_path / "file/cache"), assemble=FakeAssemble())


def test_concurrent_builds_of_one_recipe_assemble_once(inputs, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    fake = FakeAssemble(delay=0.5)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(build_image(inputs, cache, assemble=fake))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert fake.calls == 1
    assert sorted(r.cached for r in results) == [False, True]


# -- the catalogue and --output ---------------------------------------------------------------


def test_install_imports_into_the_catalogue_once_and_makes_it_current(inputs, tmp_path):
    built = build_image(inputs, ImageCache(tmp_path / "cache"), assemble=FakeAssemble())
    images = tmp_path / "state/images"
    image = install_image(built, images, name="node")
    catalogue = Catalogue(images)
    assert catalogue.current().name == "node"
    assert image.extra["input_hash"] == built.key
    assert image.extra["packages"] == {"systemd": "252"}
    assert image.cmdline == built.manifest["cmdline"]
    assert catalogue.verify("node") == []
    again = install_image(built, images, name="node")
    assert again.created == image.created  # intact and the same: not copied again

    install_image(built, images, name="other", make_current=False)
    assert catalogue.current().name == "node"

    # the same recipe rebuilt (say, with new security updates): new files, imported
    rebuilt = build_image(
        inputs, ImageCache(tmp_path / "cache"), assemble=NewerPackages(), rebuild=True
    )
    assert rebuilt.key == built.key
    assert install_image(rebuilt, images, name="node").created > image.created


def test_export_copies_the_files_and_the_manifest(inputs, tmp_path):
    built = build_image(inputs, ImageCache(tmp_path / "cache"), assemble=FakeAssemble())
    out = tmp_path / "out"
    export_image(built, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*build.FILES, build.MANIFEST])
    assert json.loads((out / "manifest.json").read_text())["input_hash"] == built.key


def test_errors_belong_to_the_error_tree():
    assert issubclass(ImageBuildError, FatalError)
    assert build.ImageFetchError.retryable


# -- the command --------------------------------------------------------------------------------


def test_cli_build_is_a_cache_hit_for_an_unchanged_recipe(tmp_path):
    """``metalseed image build`` with the repository's recipe and a cache that has it."""
    inputs = Inputs()
    try:
        key = input_hash(inputs.hashed_files(), BUILDER_VERSION)
    except ImageBuildError as exc:
        pytest.skip(str(exc))
    cache = ImageCache(tmp_path / "cache")
    built = cache.build_dir(key)
    built.mkdir(parents=True)
    files = {}
    for name in build.FILES:
        (built / name).write_bytes(name.encode())
        files[name] = ("0" * 64, len(name))
    manifest = make_manifest(
        key=key,
        recipe=inputs.recipe(),
        files=files,
        assembled=Assembled(packages={}, kernel="6.1.0-test"),
        build_seconds=1,
        built=1,
    )
    (built / "manifest.json").write_text(json.dumps(manifest))
    state = tmp_path / "state"
    env = {"METALSEED_IMAGE_CACHE": str(cache.root)}
    out = cli("image", "build", "--output", str(tmp_path / "out"), state_dir=state, env=env)
    assert "cached" in out.stdout and key[:12] in out.stdout
    assert (tmp_path / "out/rootfs.squashfs").read_bytes() == b"rootfs.squashfs"
    assert Catalogue(state / "images").current().name == "node"

    cli("image", "build", "--name", "n2", "--no-current", state_dir=state, env=env)
    assert Catalogue(state / "images").current().name == "node"
    bad = cli("image", "build", "--name", "../x", state_dir=state, env=env, check=False)
    assert bad.returncode == 2


# -- initrd building blocks ----------------------------------------------------------------------


def test_load_order_puts_dependencies_first_and_skips_builtins():
    from bootstrap.image.initrd import load_order, parse_builtin, parse_modules_dep

    table = parse_modules_dep(
        "kernel/net/virtio_net.ko: kernel/net/net_failover.ko kernel/virtio/virtio.ko\n"
        "kernel/net/net_failover.ko: kernel/net/failover.ko\n"
        "kernel/net/failover.ko:\n"
        "kernel/fs/squashfs/squashfs.ko.xz:\n"
    )
    builtin = parse_builtin("kernel/virtio/virtio.ko\n")
    order = load_order(table, ["virtio_net", "squashfs"], builtin)
    assert order == ["failover", "net_failover", "virtio_net", "squashfs"]
    with pytest.raises(FatalError, match="not in modules.dep"):
        load_order(table, ["e1000"])


def test_initrd_entries_get_their_parent_directories_and_fixed_bytes():
    import stat

    from bootstrap.image.initrd import EXE, Entry, gzip_archive, with_parents

    entries = with_parents([Entry("etc/metalseed/modules", EXE, b"x"), Entry("init", EXE, b"")])
    assert [e.path for e in entries] == ["etc", "etc/metalseed", "etc/metalseed/modules", "init"]
    assert stat.S_ISDIR(entries[0].mode)
    assert gzip_archive(entries) == gzip_archive(list(entries))  # same entries, same bytes

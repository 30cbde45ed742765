"""The image catalogue: manifests, the current image, safe names, crash-safe replacement."""

from __future__ import annotations

import hashlib
import json

import pytest

from bootstrap.errors import NotFoundError
from bootstrap.image.catalogue import Catalogue, ImageError


@pytest.fixture
def files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "vmlinuz").write_bytes(b"kernel" * 100)
    (src / "initrd").write_bytes(b"initrd" * 50)
    return {"vmlinuz": src / "vmlinuz", "initrd": src / "initrd"}


def test_add_writes_a_manifest_with_sha256_and_size(tmp_path, files):
    cat = Catalogue(tmp_path / "images")
    image = cat.add("test-1", files, cmdline="console=ttyS0")
    manifest = json.loads((image.path / "manifest.json").read_text())
    assert manifest["files"]["vmlinuz"] == {
        "sha256": hashlib.sha256(b"kernel" * 100).hexdigest(),
        "size": 600,
    }
    assert cat.get("test-1").cmdline == "console=ttyS0"
    assert cat.current() is None
    assert [i.name for i in cat.list()] == ["test-1"]


def test_current_follows_set_current(tmp_path, files):
    cat = Catalogue(tmp_path / "images")
    cat.add("a", files, make_current=True)
    cat.add("b", files)
    assert cat.current().name == "a"
    cat.set_current("b")
    assert cat.current().name == "b"
    with pytest.raises(NotFoundError):
        cat.set_current("c")


def test_replacing_an_image_leaves_no_temporary_directories(tmp_path, files):
    cat = Catalogue(tmp_path / "images")
    cat.add("a", files)
    files["vmlinuz"].write_bytes(b"new kernel")
    image = cat.add("a", files)
    assert image.files["vmlinuz"].size == len(b"new kernel")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["a"]


def test_verify_names_files_that_changed(tmp_path, files):
    cat = Catalogue(tmp_path / "images")
    image = cat.add("a", files)
    assert cat.verify("a") == []
    (image.path / "initrd").unlink()
    (image.path / "initrd").write_bytes(b"tampered")
    assert cat.verify("a") == ["initrd"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 200, "a..b"])
def test_unsafe_names_are_refused(tmp_path, files, name):
    cat = Catalogue(tmp_path / "images")
    with pytest.raises(ImageError):
        cat.add(name, files)
    with pytest.raises((ImageError, NotFoundError)):
        cat.get(name)


def test_only_manifest_files_resolve(tmp_path, files):
    image = Catalogue(tmp_path / "images").add("a", files)
    assert image.file_path("vmlinuz").read_bytes().startswith(b"kernel")
    with pytest.raises(NotFoundError):
        image.file_path("manifest.json")

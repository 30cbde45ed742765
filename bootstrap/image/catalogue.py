"""The image catalogue: boot images the seed serves, each with a manifest.

Layout under the catalogue root (``STATE_DIR/images``)::

    images/
      current            the name of the image new boots get (one line)
      NAME/
        manifest.json    {"name", "created", "cmdline", "files": {FILE: {"sha256", "size"}}, ...}
        vmlinuz initrd rootfs.squashfs ...

An image directory is written under a temporary name and renamed into place,
so a crash never leaves a half-written image that looks complete. Image and
file names are restricted to a safe alphabet: they end up in URLs and paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import NotFoundError, UsageError

MANIFEST = "manifest.json"
CURRENT = "current"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ImageError(UsageError):
    """A bad image name, a missing file, or a manifest that does not match."""


def safe_name(name: str, what: str = "image name") -> str:
    if not _SAFE.match(name) or ".." in name:
        raise ImageError(f"invalid {what} {name!r}: letters, digits, '.', '_', '-' only")
    return name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ImageFile:
    name: str
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class Image:
    name: str
    path: Path
    files: Mapping[str, ImageFile]
    cmdline: str = ""
    created: float = 0.0
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def file_path(self, name: str) -> Path:
        """The path of one of this image's files; only names in the manifest resolve."""
        if name not in self.files:
            raise NotFoundError(f"image {self.name} has no file {name!r}")
        return self.path / name

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created": self.created,
            "cmdline": self.cmdline,
            "files": {f.name: {"sha256": f.sha256, "size": f.size} for f in self.files.values()},
            **dict(self.extra),
        }


class Catalogue:
    def __init__(self, root: Path) -> None:
        self.root = root

    # -- reading ---------------------------------------------------------------

    def get(self, name: str) -> Image:
        path = self.root / safe_name(name)
        try:
            data = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise NotFoundError(f"no image {name!r} in {self.root}") from None
        except (OSError, ValueError) as exc:
            raise ImageError(f"image {name}: unreadable manifest: {exc}") from None
        files = {
            fname: ImageFile(fname, entry["sha256"], int(entry["size"]))
            for fname, entry in data.get("files", {}).items()
        }
        extra = {k: v for k, v in data.items() if k not in ("name", "created", "cmdline", "files")}
        return Image(
            name=name,
            path=path,
            files=files,
            cmdline=data.get("cmdline", ""),
            created=float(data.get("created", 0.0)),
            extra=extra,
        )

    def list(self) -> list[Image]:
        if not self.root.is_dir():
            return []
        names = sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())
        return [self.get(name) for name in names if _SAFE.match(name)]

    def current(self) -> Image | None:
        try:
            name = (self.root / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return self.get(name) if name else None

    def verify(self, name: str) -> list[str]:
        """Files whose size or sha256 no longer match the manifest (empty: all good)."""
        image = self.get(name)
        bad = []
        for f in image.files.values():
            path = image.path / f.name
            if not path.is_file() or path.stat().st_size != f.size or sha256_file(path) != f.sha256:
                bad.append(f.name)
        return bad

    # -- writing ---------------------------------------------------------------

    def add(
        self,
        name: str,
        files: Mapping[str, Path],
        *,
        cmdline: str = "",
        make_current: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> Image:
        """Copy ``files`` (``{served name: source path}``) in as image ``name``, replacing it."""
        safe_name(name)
        for fname, src in files.items():
            safe_name(fname, "file name")
            if not Path(src).is_file():
                raise ImageError(f"image {name}: {src} is not a file")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            entries = {}
            for fname, src in files.items():
                dest = tmp / fname
                shutil.copyfile(src, dest)  # a copy: later writes to the source cannot leak in
                entries[fname] = {"sha256": sha256_file(dest), "size": dest.stat().st_size}
            manifest = {
                **dict(extra or {}),
                "name": name,
                "created": time.time(),
                "cmdline": cmdline,
                "files": entries,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            final = self.root / name
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=self.root))
                os.rename(final, old / name)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            self.set_current(name)
        return self.get(name)

    def set_current(self, name: str) -> None:
        self.get(name)  # must exist
        tmp = self.root / f".{CURRENT}.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.root / CURRENT)

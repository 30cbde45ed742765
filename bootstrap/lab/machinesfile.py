"""Machines files: the JSON a BMC power hook reads to find the machine behind a GUID.

``{"state_dir": DIR, "machines": [SPEC, ...]}``, written atomically. The QEMU
and fake kinds each keep one, with their own spec class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar


class Spec(Protocol):
    def to_json(self) -> dict[str, Any]: ...


S = TypeVar("S")


def write(path: Path, state_dir: Path, specs: Sequence[Spec]) -> Path:
    doc = {"state_dir": str(state_dir), "machines": [s.to_json() for s in specs]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read(
    path: Path, from_json: Callable[[dict[str, Any]], S], error: type[Exception]
) -> tuple[Path, tuple[S, ...]]:
    """``(state_dir, specs)``; ``error`` (the caller's exception) for anything malformed."""
    try:
        doc = json.loads(path.read_text())
        return Path(doc["state_dir"]), tuple(from_json(m) for m in doc["machines"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise error(f"{path}: not a machines file ({exc})") from None

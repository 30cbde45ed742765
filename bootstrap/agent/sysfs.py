"""Small readers for sysfs/procfs attribute files, and the string cleaner. No I/O at import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: the longest string the agent sends (the seed refuses longer ones)
MAX_STR = 256


def clean(value: Any) -> str | None:
    """A firmware or driver string made safe to send: printable, stripped, bounded."""
    if value is None:
        return None
    text = "".join(ch if ch.isprintable() else " " for ch in str(value)).strip()
    return text[:MAX_STR] or None


def read_text(path: Path) -> str | None:
    """An attribute file's stripped text; None when missing, unreadable or empty."""
    try:
        value = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return value or None


def read_int(path: Path) -> int | None:
    value = read_text(path)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None

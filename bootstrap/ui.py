"""Terminal output: tables (rich on a TTY, aligned text otherwise), JSON, progress.

Progress goes to stderr and only when stderr is a terminal, so pipes and
``--json`` output stay clean.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None
) -> None:
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    if sys.stdout.isatty():
        table = Table(title=title, header_style="bold")
        for h in headers:
            table.add_column(h)
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def ago(ts: float, now: float | None = None) -> str:
    if not ts:
        return ""
    seconds = max(0.0, (now or time.time()) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


class Bar:
    """A progress bar on stderr when it is a terminal; a no-op otherwise."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress = progress
        self._task = task

    def update(self, completed: int, total: int | None = None, text: str | None = None) -> None:
        if self._progress is not None and self._task is not None:
            kwargs: dict[str, Any] = {"completed": completed}
            if total is not None:
                kwargs["total"] = total
            if text is not None:
                kwargs["description"] = text
            self._progress.update(self._task, **kwargs)

    def advance(self, by: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, by)


@contextlib.contextmanager
def progress(description: str, total: int, enabled: bool = True) -> Iterator[Bar]:
    if not (enabled and sys.stderr.isatty()):
        yield Bar(None, None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as prog:
        yield Bar(prog, prog.add_task(description, total=total))

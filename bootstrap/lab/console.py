"""Watch a lab machine's serial console for the milestones of a netboot.

A QEMU machine writes firmware and kernel output to ``STATE/NAME.serial.log``.
``Console`` follows that file on a thread and records when each milestone
(``MILESTONES``, in boot order) first appeared, so tests and the demo can wait
for one and report a timeline.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

#: console output that marks the boot phases, in the order they appear
MILESTONES = {
    name: re.compile(pattern)
    for name, pattern in {
        "firmware": r"iPXE initialising devices",
        "dhcp": r"Configuring \(net0",
        "script": r"\[script\]",
        "kernel fetched": r"vmlinuz\S*\.\.\. ok",
        "initrd fetched": r"initrd\S*\.\.\. ok",
        "userspace": r"metalseed: \[",
        "lease": r"\] dhcp: ",
        "callback": r"callback accepted",
        # the image gave up (no NIC, no lease, call-back refused): no point waiting on
        "failed": r"metalseed: \[[\d.]+\] done: (?!called home)",
    }.items()
}


class ConsoleTimeout(AssertionError):
    """A milestone did not appear in time, or the image gave up first."""


class Console:
    """A machine's serial log, watched on a thread: when each milestone first appeared."""

    def __init__(
        self,
        path: Path,
        started: float,
        milestones: dict[str, re.Pattern[str]] | None = None,
        poll: float = 0.05,
    ) -> None:
        self.path = path
        self.started = started
        self.milestones = MILESTONES if milestones is None else milestones
        self.seen: dict[str, float] = {}
        self._poll = poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _watch(self) -> None:
        while not self._stop.is_set():
            text = self.text()
            now = time.monotonic()
            for name, marker in self.milestones.items():
                if name not in self.seen and marker.search(text):
                    self.seen[name] = now - self.started
            self._stop.wait(self._poll)

    def wait_for(self, name: str, timeout: float) -> float:
        """Seconds from start to milestone ``name``; ConsoleTimeout with the console tail."""
        deadline = time.monotonic() + timeout
        while name not in self.seen:
            if "failed" in self.seen:
                raise ConsoleTimeout(f"the image gave up before {name!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ConsoleTimeout(f"no {name!r} on the console in {timeout} s:\n{self.tail()}")
            time.sleep(self._poll)
        return self.seen[name]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def timeline(self) -> str:
        return ", ".join(
            f"{name} {t:.2f}s" for name, t in sorted(self.seen.items(), key=lambda x: x[1])
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)

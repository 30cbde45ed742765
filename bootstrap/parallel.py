"""Run one blocking job per item on a bounded pool of threads, keeping every outcome.

Used wherever metalseed talks to many BMCs at once. A job's metalseed error is
its result, not a crash of the batch; anything else is a bug and propagates.

A job may also be given a ``deadline``: a BMC that stops answering in a way
the IPMI library never notices (a session wedged inside pyghmi) must cost the
operator one failed machine, not a sweep that never ends. A job past its
deadline is reported as ``JobTimeout`` and abandoned; its worker is a daemon
thread, so an abandoned job cannot keep the process from exiting either.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .errors import MetalseedError, RetryableError

T = TypeVar("T")
R = TypeVar("R")


class JobTimeout(RetryableError):
    """A job did not finish within its deadline and was abandoned."""


@dataclasses.dataclass(frozen=True)
class Outcome(Generic[T, R]):
    item: T
    result: R | None = None
    error: MetalseedError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_all(
    job: Callable[[T], R],
    items: Iterable[T],
    *,
    concurrency: int,
    on_done: Callable[[Outcome[T, R]], None] | None = None,
    deadline: float | None = None,
    describe: Callable[[T], str] = str,
    clock: Callable[[], float] = time.monotonic,
) -> list[Outcome[T, R]]:
    """``job(item)`` for every item, ``concurrency`` at a time; outcomes in input order.

    ``deadline``: seconds one job may run; past it the item's outcome is a
    ``JobTimeout`` (named by ``describe(item)``) and its thread is abandoned,
    which also frees its place for the next item.
    """
    items = list(items)
    if not items:
        return []
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(items)):
        todo.put(i)
    finished: queue.SimpleQueue[tuple[int, Outcome[T, R] | BaseException]] = queue.SimpleQueue()
    started: dict[int, float] = {}
    lock = threading.Lock()

    def worker() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                started[i] = clock()
            try:
                finished.put((i, Outcome(items[i], result=job(items[i]))))
            except MetalseedError as exc:
                finished.put((i, Outcome(items[i], error=exc)))
            except BaseException as exc:  # a bug: re-raised in the caller's thread
                finished.put((i, exc))
            with lock:
                if started.pop(i, None) is None:
                    return  # abandoned: a replacement worker has taken this one's place

    def spawn() -> None:
        threading.Thread(target=worker, name="bmc", daemon=True).start()

    for _ in range(max(1, min(concurrency, len(items)))):
        spawn()
    outcomes: dict[int, Outcome[T, R]] = {}

    def settle(i: int, outcome: Outcome[T, R]) -> None:
        outcomes[i] = outcome
        if on_done:
            on_done(outcome)

    while len(outcomes) < len(items):
        try:
            i, got = finished.get(timeout=0.05 if deadline is not None else None)
        except queue.Empty:
            pass
        else:
            if isinstance(got, BaseException):
                raise got
            if i not in outcomes:  # else it finished after it was abandoned: too late
                settle(i, got)
            continue
        now = clock()
        with lock:
            late = [i for i, t in started.items() if now - t > deadline]
            for i in late:
                del started[i]
        for i in late:
            settle(
                i,
                Outcome(
                    items[i],
                    error=JobTimeout(f"{describe(items[i])}: no result in {deadline:g} s; gave up"),
                ),
            )
            spawn()  # the stuck thread keeps its job; a fresh one takes the next item
    return [outcomes[i] for i in range(len(items))]

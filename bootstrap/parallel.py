"""Run one blocking job per item on a bounded thread pool, keeping every outcome.

Used wherever metalseed talks to many BMCs at once. A job's metalseed error is
its result, not a crash of the batch; anything else is a bug and propagates.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .errors import MetalseedError

T = TypeVar("T")
R = TypeVar("R")


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
) -> list[Outcome[T, R]]:
    """``job(item)`` for every item, ``concurrency`` at a time; outcomes in input order."""
    items = list(items)
    outcomes: dict[int, Outcome[T, R]] = {}
    workers = max(1, min(concurrency, len(items)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bmc") as pool:
        futures = {pool.submit(job, item): i for i, item in enumerate(items)}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            try:
                outcome = Outcome(items[i], result=future.result())
            except MetalseedError as exc:
                outcome = Outcome(items[i], error=exc)
            outcomes[i] = outcome
            if on_done:
                on_done(outcome)
    return [outcomes[i] for i in range(len(items))]

"""run_all: every outcome kept, errors as results, stuck jobs abandoned at their deadline."""

from __future__ import annotations

import threading
import time

import pytest

from bootstrap.errors import BmcTimeout
from bootstrap.parallel import JobTimeout, run_all


def test_outcomes_come_back_in_input_order_with_errors_as_results():
    def job(n: int) -> int:
        if n == 3:
            raise BmcTimeout("BMC 3: no answer")
        time.sleep(0.01 * (5 - n))
        return n * n

    outcomes = run_all(job, range(6), concurrency=3)
    assert [o.item for o in outcomes] == list(range(6))
    assert [o.result for o in outcomes if o.ok] == [0, 1, 4, 16, 25]
    assert isinstance(outcomes[3].error, BmcTimeout)


def test_a_bug_in_a_job_propagates():
    def job(n: int) -> int:
        raise KeyError(n)

    with pytest.raises(KeyError):
        run_all(job, [1, 2], concurrency=2)


def test_a_stuck_job_is_abandoned_at_its_deadline_and_the_rest_still_run():
    release = threading.Event()
    done_order: list[int] = []

    def job(n: int) -> int:
        if n == 0:
            release.wait(30)  # wedged, as a pyghmi session can be
        return n

    started = time.monotonic()
    outcomes = run_all(
        job,
        range(5),
        concurrency=1,  # one place only: the others run only if the stuck one is replaced
        deadline=0.3,
        describe=lambda n: f"BMC {n}",
        on_done=lambda o: done_order.append(o.item),
    )
    elapsed = time.monotonic() - started
    release.set()
    assert elapsed < 5
    assert isinstance(outcomes[0].error, JobTimeout)
    assert "BMC 0: no result in 0.3 s" in str(outcomes[0].error)
    assert [o.result for o in outcomes[1:]] == [1, 2, 3, 4]
    assert sorted(done_order) == list(range(5)) and len(done_order) == 5


def test_a_job_finishing_after_its_deadline_does_not_overwrite_the_timeout():
    def job(n: int) -> int:
        if n == 0:
            time.sleep(0.5)
        return n

    outcomes = run_all(job, range(2), concurrency=2, deadline=0.2)
    time.sleep(0.5)
    assert isinstance(outcomes[0].error, JobTimeout) and outcomes[1].result == 1


def test_no_items_no_threads():
    assert run_all(lambda n: n, [], concurrency=4, deadline=1) == []

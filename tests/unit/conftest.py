"""Shared unit-test fixtures: a settable clock, and a real SQLite store stamped by it."""

from __future__ import annotations

import pytest

from bootstrap.secretbox import SecretBox
from bootstrap.store.sqlite import SqliteStore


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"), clock=clock)
    yield s
    s.close()

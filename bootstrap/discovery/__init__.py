"""Discovery: sweep ranges for BMCs, then enroll the ones that answer."""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import UsageError
from ..models import BmcAddress, Credential
from ..parallel import Outcome, run_all
from .enroll import Enroller, EnrollResult
from .sweep import Progress, SweepResult, sweep

__all__ = ["DiscoveryReport", "Enroller", "EnrollResult", "discover", "load_credentials"]


#: what a credentials line may hold (Redfish); the IPMI driver skips longer than 16/20 bytes
MAX_USERNAME, MAX_PASSWORD = 64, 128


def load_credentials(path: Path) -> list[Credential]:
    """``username:password`` per line; blank lines and ``#`` comments skipped.

    Errors name the line number, never the line: it holds a password.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"credentials file {path} does not exist") from None
    except (PermissionError, IsADirectoryError):
        raise UsageError(f"credentials file {path} is not readable") from None
    except UnicodeDecodeError:
        raise UsageError(f"credentials file {path} is not text") from None
    if (
        mode & (stat.S_IRWXG | stat.S_IRWXO)
        and os.environ.get("METALSEED_ALLOW_OPEN_CREDENTIALS") != "1"
    ):
        raise UsageError(f"credentials file {path} is readable by others; chmod 600 it")
    creds: list[Credential] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, password = line.partition(":")
        if not sep or not username or not password:
            raise UsageError(f"{path}, line {number}: expected username:password")
        if len(username.encode()) > MAX_USERNAME or len(password.encode()) > MAX_PASSWORD:
            raise UsageError(
                f"{path}, line {number}: at most {MAX_USERNAME}-byte users and "
                f"{MAX_PASSWORD}-byte passwords (IPMI itself takes 16 and 20: longer ones "
                "are tried on Redfish services only)"
            )
        creds.append(Credential(username, password))
    if not creds:
        raise UsageError(f"credentials file {path} has no username:password lines")
    return creds


@dataclasses.dataclass(frozen=True)
class DiscoveryReport:
    sweep: SweepResult
    results: list[EnrollResult]
    seconds: float


def discover(
    targets: Sequence[BmcAddress],
    enroller: Enroller,
    *,
    probe_timeout: float,
    probe_rounds: int,
    probe_window: int,
    concurrency: int,
    deadline: float | None = None,
    skip: Callable[[BmcAddress], bool] | None = None,
    on_probe: Progress | None = None,
    on_enrolled: Callable[[EnrollResult], None] | None = None,
) -> DiscoveryReport:
    import time

    started = time.monotonic()
    swept = sweep(
        targets,
        timeout=probe_timeout,
        rounds=probe_rounds,
        window=probe_window,
        progress=on_probe,
    )

    def done(outcome: Outcome[BmcAddress, list[EnrollResult]]) -> None:
        if on_enrolled is not None:
            for result in _results_of(outcome):
                on_enrolled(result)

    found = [a for a in swept.found if skip is None or not skip(a)]
    outcomes = run_all(
        enroller.enroll,
        found,
        concurrency=concurrency,
        on_done=done,
        deadline=deadline,
        describe=lambda address: f"BMC {address}",
    )
    results = [r for o in outcomes for r in _results_of(o)]
    return DiscoveryReport(swept, results, time.monotonic() - started)


def _results_of(outcome: Outcome[BmcAddress, list[EnrollResult]]) -> list[EnrollResult]:
    if outcome.result is not None:
        return outcome.result
    return [EnrollResult(outcome.item, None, None, "unknown", error=str(outcome.error))]

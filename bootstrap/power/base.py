"""The power driver base class: it owns timeouts, retries, backoff and waits.

A driver implements only primitives (read power, ask for a power change, set
the boot device, read identity, manage a user). Everything an operator relies
on (retrying a flaky BMC with backoff, failing fast on a wrong password,
waiting until the machine really is on) lives here once, for every driver.
The clock and sleep are injected so tests of the timing logic run instantly.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from ..errors import BmcAuthError, BmcError, BmcLoginTimeout, PowerStateNotReached, RetryableError
from ..models import BmcAddress, BmcIdentity, Credential

log = logging.getLogger(__name__)

T = TypeVar("T")

POWER_STATES = ("on", "off")
BOOT_DEVICES = ("pxe", "disk")


@dataclasses.dataclass(frozen=True)
class BmcTarget:
    """Who to talk to and how to log in; ``node`` names it in errors."""

    address: BmcAddress
    credential: Credential
    node: str | None = None

    @property
    def label(self) -> str:
        return self.node or str(self.address)


@dataclasses.dataclass(frozen=True)
class Machine:
    """One machine behind a BMC endpoint: its own address there and what it says."""

    address: BmcAddress
    identity: BmcIdentity


@dataclasses.dataclass(frozen=True)
class PowerResult:
    power: str  # the state reached (or observed)
    changed: bool  # False when the machine was already there
    attempts: int = 1
    seconds: float = 0.0


class PowerDriver(abc.ABC):
    """Base of every power driver. Subclasses implement the ``_primitives``."""

    name = "abstract"
    #: the longest username and password (bytes) this kind of BMC takes; None: no limit
    credential_limits: tuple[int, int] | None = None

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        login_timeout: float = 3.0,
        attempts: int = 3,
        backoff: float = 0.5,
        power_wait: float = 30.0,
        poll: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.timeout = timeout
        self.login_timeout = login_timeout
        self.attempts = attempts
        self.backoff = backoff
        self.power_wait = power_wait
        self.poll = poll
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()

    @classmethod
    def options_from(cls, config) -> dict:
        """Driver-specific constructor options from ``BmcConfig`` (none by default)."""
        return {}

    # -- primitives: one exchange each, translated into our error tree ------------
    # ``conn`` is whatever ``_connect`` returned: a logged-in session.

    @abc.abstractmethod
    def _connect(self, target: BmcTarget) -> object:
        """Log in within ``login_timeout``; ``BmcAuthError`` if refused,
        ``BmcLoginTimeout`` if unanswered, ``BmcBusy`` if the BMC has no room."""

    @abc.abstractmethod
    def _disconnect(self, conn: object) -> None:
        """Log out; must not raise."""

    @abc.abstractmethod
    def _get_power(self, conn: object) -> str:
        """'on' or 'off'."""

    @abc.abstractmethod
    def _set_power(self, conn: object, action: str) -> None:
        """Ask for 'on', 'off' or 'cycle'; do not wait for it."""

    @abc.abstractmethod
    def _set_boot_device(self, conn: object, device: str, persistent: bool) -> None:
        """'pxe' or 'disk', for the next boot only or for every boot."""

    @abc.abstractmethod
    def _identify(self, conn: object) -> BmcIdentity:
        """GUID, device id, MAC, power state, FRU."""

    @abc.abstractmethod
    def _ensure_user(self, conn: object, credential: Credential) -> None:
        """Create or update a BMC user with admin rights and this password, enabled."""

    def _machines(self, target: BmcTarget, conn: object) -> list[Machine]:
        """Every machine behind this endpoint. An IPMI BMC has one: itself."""
        return [Machine(target.address, self._identify(conn))]

    # -- sessions and retries ---------------------------------------------------------

    @contextlib.contextmanager
    def session(self, target: BmcTarget, *, quick_login: bool = False) -> Iterator[_Session]:
        """One logged-in session for a whole operation; always logged out after.

        ``quick_login``: a login that gets no answer (``BmcLoginTimeout``) is not
        retried, so a caller holding several candidate credentials moves on after
        one ``login_timeout`` instead of ``attempts`` of them.
        """
        sess = _Session(self, target, quick_login=quick_login)
        try:
            yield sess
        finally:
            sess.reset()

    def _retrying(self, sess: _Session, what: str, fn: Callable[[object], T]) -> tuple[T, int]:
        """Call ``fn(conn)`` until it succeeds, a fatal error occurs, or attempts run out.

        A retryable failure drops the session, so the next attempt logs in afresh.
        """
        target = sess.target
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(sess.conn()), attempt
            except RetryableError as exc:
                sess.reset()
                if sess.quick_login and isinstance(exc, BmcLoginTimeout):
                    exc.node = exc.node or target.label
                    raise
                if attempt == self.attempts:
                    raise type(exc)(
                        f"{what} failed after {attempt} attempts: {exc}", node=target.label
                    ) from None
                log.info("%s: %s failed (%s), retrying in %.2fs", target.label, what, exc, delay)
                self._sleep(delay * (0.5 + self._rng.random()))
                delay *= 2
            except BmcError as exc:
                if exc.node is None:
                    exc.node = target.label
                raise
        raise AssertionError("unreachable")

    # -- the operations callers use -----------------------------------------------

    def power_state(self, target: BmcTarget) -> str:
        with self.session(target) as sess:
            return self._retrying(sess, "power status", self._get_power)[0]

    def identify(self, target: BmcTarget) -> BmcIdentity:
        with self.session(target) as sess:
            return self._retrying(sess, "identify", self._identify)[0]

    def list_machines(self, target: BmcTarget, *, quick_login: bool = False) -> list[Machine]:
        """Log in to an endpoint and list the machines behind it (discovery)."""
        with self.session(target, quick_login=quick_login) as sess:
            return self._retrying(sess, "identify", lambda conn: self._machines(target, conn))[0]

    def check_login(self, target: BmcTarget) -> None:
        """Log in and out once: ``BmcAuthError`` if the credential is refused."""
        with self.session(target) as sess:
            self._retrying(sess, "login", lambda conn: None)

    def ensure_user(self, target: BmcTarget, credential: Credential) -> None:
        with self.session(target) as sess:
            self._retrying(sess, "user setup", lambda conn: self._ensure_user(conn, credential))

    def set_boot_device(self, target: BmcTarget, device: str, persistent: bool = False) -> None:
        if device not in BOOT_DEVICES:
            raise ValueError(f"boot device must be one of {BOOT_DEVICES}")
        with self.session(target) as sess:
            self._retrying(
                sess,
                f"boot device {device}",
                lambda conn: self._set_boot_device(conn, device, persistent),
            )

    def set_power(self, target: BmcTarget, action: str) -> PowerResult:
        """Bring the machine to ``action`` ('on', 'off', 'cycle') and wait until it is there."""
        if action not in (*POWER_STATES, "cycle"):
            raise ValueError("power action must be on, off or cycle")
        started = self._clock()
        with self.session(target) as sess:
            before = self._retrying(sess, "power status", self._get_power)[0]
            want = "on" if action == "cycle" else action
            if action != "cycle" and before == want:
                return PowerResult(before, changed=False, seconds=self._clock() - started)
            ask = "on" if action == "cycle" and before == "off" else action
            _, attempts = self._retrying(
                sess, f"power {ask}", lambda conn: self._set_power(conn, ask)
            )
            if ask == "cycle":
                # The state reads 'on' before and after a cycle; give the BMC a poll to act.
                self._sleep(self.poll)
            self._wait_for(sess, want, started)
        return PowerResult(want, changed=True, attempts=attempts, seconds=self._clock() - started)

    def _wait_for(self, sess: _Session, want: str, started: float) -> None:
        target = sess.target
        deadline = started + self.power_wait
        interval = self.poll
        while True:
            if self._retrying(sess, "power status", self._get_power)[0] == want:
                return
            if self._clock() >= deadline:
                raise PowerStateNotReached(
                    f"machine did not reach power {want} within {self.power_wait:.0f} s",
                    node=target.label,
                )
            self._sleep(min(interval, max(deadline - self._clock(), 0.0)))
            interval = min(interval * 1.5, 2.0)


class _Session:
    """A lazily opened, resettable login for one operation."""

    def __init__(self, driver: PowerDriver, target: BmcTarget, *, quick_login: bool = False):
        self.driver = driver
        self.target = target
        self.quick_login = quick_login
        self._conn: object | None = None

    def conn(self) -> object:
        if self._conn is None:
            limits = self.driver.credential_limits
            cred = self.target.credential
            if limits and (
                len(cred.username.encode()) > limits[0]
                or len(cred.password.reveal().encode()) > limits[1]
            ):
                raise BmcAuthError(
                    f"user {cred.username!r}: longer than a {self.driver.name} BMC takes "
                    f"({limits[0]}-byte users, {limits[1]}-byte passwords); not tried",
                    node=self.target.label,
                )
            self._conn = self.driver._connect(self.target)
        return self._conn

    def reset(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self.driver._disconnect(conn)

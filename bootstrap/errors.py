"""One error tree for metalseed.

Every error the product raises on purpose is a ``MetalseedError``. The split
that matters to callers is *retryable* (a flaky BMC, a timeout: try again
later) versus *fatal* (a wrong password, bad input: retrying will not help).
The CLI exit code lives on the class, so ``cli.py`` maps errors to exit codes
without a table of its own.

Library exceptions (pyghmi, sqlite3, cryptography, ...) are translated into
this tree at the module boundary where they are caught; they never escape to
the CLI. Messages never contain secrets.
"""

from __future__ import annotations


class MetalseedError(Exception):
    """Base of every deliberate metalseed error."""

    exit_code = 1
    retryable = False

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node

    def __str__(self) -> str:
        message = super().__str__()
        return f"{self.node}: {message}" if self.node else message


class FatalError(MetalseedError):
    """Retrying will not help; an operator has to act."""


class RetryableError(MetalseedError):
    """A transient condition; the same call may succeed later."""

    retryable = True
    exit_code = 75  # EX_TEMPFAIL


# -- input and configuration -------------------------------------------------


class UsageError(FatalError):
    """Bad arguments or input the operator gave us."""

    exit_code = 2


class ConfigError(FatalError):
    exit_code = 78  # EX_CONFIG


class NotFoundError(FatalError):
    exit_code = 4


# -- state ----------------------------------------------------------------


class StoreError(FatalError):
    exit_code = 74  # EX_IOERR


class IllegalTransition(FatalError):
    """A node was asked to move along an edge the state machine does not have."""

    exit_code = 3


class ConcurrentUpdate(RetryableError):
    """The node changed under us between read and write (compare-and-swap lost)."""


class SecretError(FatalError):
    """The secrets key is missing, unreadable or does not match the store."""

    exit_code = 77  # EX_NOPERM


# -- BMCs and power -------------------------------------------------------


class BmcError(MetalseedError):
    """Something went wrong talking to a BMC."""


class BmcAuthError(BmcError, FatalError):
    """The BMC refused our credentials. Retrying with the same ones is pointless."""

    exit_code = 77


class BmcTimeout(BmcError, RetryableError):
    """The BMC did not answer in time."""


class BmcUnreachable(BmcError, RetryableError):
    """Nothing answers at the BMC's address."""


class BmcCommandError(BmcError, FatalError):
    """The BMC answered a command with an error completion code."""

    def __init__(self, message: str, *, node: str | None = None, code: int | None = None):
        super().__init__(message, node=node)
        self.code = code


class PowerStateNotReached(BmcError, RetryableError):
    """The BMC accepted the command but the machine never reached the state."""


class BmcLoginTimeout(BmcTimeout):
    """A BMC that answered the presence probe gave no answer to a login within
    ``bmc.login_timeout``. Many BMCs stay silent for a username they do not know
    instead of refusing it, so discovery tries the next credential."""


class BmcBusy(BmcError, RetryableError):
    """The BMC is up but has no room for us now (a full session table, 503)."""


class BmcGone(BmcError, FatalError):
    """The BMC answers but the machine is no longer behind it (a Redfish System vanished)."""

    exit_code = 4

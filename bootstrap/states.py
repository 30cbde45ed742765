"""The per-node state machine, as data.

    discovered -> enrolled -> booting -> enlisted -> joining -> active
    plus failed(reason) and retired

Two ways in besides a BMC sweep: a machine nobody knew that netboots and
enlists (discovery by DHCP: no BMC) starts in ``booting``; and a discovered
node whose BMC login does not work yet may be powered on by hand, so
``discovered -> booting`` is an edge too.

Transitions are the only way a node's state changes. Each state may have a
timeout: a node that stays longer than that is overdue, and the orchestrator
moves it to ``failed`` with the reason. The functions here are pure; the store
applies a transition atomically with its event.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from .errors import IllegalTransition


class NodeState(enum.StrEnum):
    DISCOVERED = "discovered"  # a BMC answered; we may not have working credentials yet
    ENROLLED = "enrolled"  # credentials verified (and rotated when asked)
    BOOTING = "booting"  # set to PXE and powered on; firmware is on its way
    ENLISTED = "enlisted"  # the agent in the image called home with its inventory
    JOINING = "joining"  # the join roles are running against it
    ACTIVE = "active"  # part of the cluster
    FAILED = "failed"  # stopped, with a reason; can be retried
    RETIRED = "retired"  # taken out of service on purpose


S = NodeState

#: Allowed edges. A state may also "transition" to itself to record a new
#: reason (e.g. a repeated enroll) without changing state.
TRANSITIONS: Mapping[NodeState, frozenset[NodeState]] = {
    S.DISCOVERED: frozenset({S.ENROLLED, S.BOOTING, S.FAILED, S.RETIRED}),
    S.ENROLLED: frozenset({S.BOOTING, S.FAILED, S.RETIRED}),
    S.BOOTING: frozenset({S.ENLISTED, S.ENROLLED, S.FAILED, S.RETIRED}),
    S.ENLISTED: frozenset({S.JOINING, S.BOOTING, S.FAILED, S.RETIRED}),
    S.JOINING: frozenset({S.ACTIVE, S.FAILED, S.RETIRED}),
    S.ACTIVE: frozenset({S.JOINING, S.FAILED, S.RETIRED}),
    S.FAILED: frozenset({S.DISCOVERED, S.ENROLLED, S.BOOTING, S.JOINING, S.RETIRED}),
    S.RETIRED: frozenset({S.DISCOVERED}),
}

#: The states a new node may start in: found by its BMC (discovered, enrolled), or by
#: netbooting as an unknown machine (booting, on its way to enlisted).
INITIAL: frozenset[NodeState] = frozenset({S.DISCOVERED, S.ENROLLED, S.BOOTING})

#: Seconds a node may stay in a state before it is overdue. ``None``: no limit.
DEFAULT_TIMEOUTS: Mapping[NodeState, float | None] = {
    S.DISCOVERED: 600.0,
    S.ENROLLED: None,
    S.BOOTING: 900.0,
    S.ENLISTED: 1800.0,
    S.JOINING: 3600.0,
    S.ACTIVE: None,
    S.FAILED: None,
    S.RETIRED: None,
}


def check_transition(current: NodeState | None, target: NodeState) -> None:
    """Raise ``IllegalTransition`` unless ``current -> target`` is an edge.

    ``current`` is ``None`` for a node that does not exist yet.
    """
    if current is None:
        if target not in INITIAL:
            raise IllegalTransition(f"a new node cannot start in state {target}")
        return
    if target == current:
        return
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(f"illegal transition {current} -> {target}")


def overdue(
    state: NodeState,
    since: float,
    now: float,
    timeouts: Mapping[NodeState, float | None] = DEFAULT_TIMEOUTS,
) -> str | None:
    """The failure reason if a node in ``state`` since ``since`` is overdue at ``now``."""
    limit = timeouts.get(state)
    if limit is None or now - since <= limit:
        return None
    return f"timed out in {state} after {limit:.0f} s"

import pytest

from bootstrap.errors import IllegalTransition
from bootstrap.states import (
    DEFAULT_TIMEOUTS,
    INITIAL,
    TRANSITIONS,
    NodeState,
    check_transition,
    overdue,
)

S = NodeState


def test_happy_path_is_a_chain_of_legal_edges():
    chain = [S.DISCOVERED, S.ENROLLED, S.BOOTING, S.ENLISTED, S.JOINING, S.ACTIVE]
    for current, target in zip(chain, chain[1:], strict=False):
        check_transition(current, target)


@pytest.mark.parametrize(
    "current,target",
    [
        (S.DISCOVERED, S.ACTIVE),
        (S.ENROLLED, S.ACTIVE),
        (S.RETIRED, S.ACTIVE),
        (S.ACTIVE, S.BOOTING),
    ],
)
def test_skipping_states_is_illegal(current, target):
    with pytest.raises(IllegalTransition, match=f"{current} -> {target}"):
        check_transition(current, target)


def test_every_live_state_can_fail_and_be_retired():
    for state in S:
        if state in (S.FAILED, S.RETIRED):
            continue
        assert S.FAILED in TRANSITIONS[state]
        assert S.RETIRED in TRANSITIONS[state]


def test_new_nodes_start_only_in_initial_states():
    check_transition(None, S.DISCOVERED)
    with pytest.raises(IllegalTransition):
        check_transition(None, S.ACTIVE)
    assert S.ACTIVE not in INITIAL


def test_same_state_is_allowed_to_record_a_new_reason():
    check_transition(S.DISCOVERED, S.DISCOVERED)


def test_every_state_has_edges_and_a_timeout_entry():
    assert set(TRANSITIONS) == set(S)
    assert set(DEFAULT_TIMEOUTS) == set(S)


def test_overdue_only_after_the_state_timeout():
    limit = DEFAULT_TIMEOUTS[S.BOOTING]
    assert overdue(S.BOOTING, since=100.0, now=100.0 + limit) is None
    reason = overdue(S.BOOTING, since=100.0, now=100.0 + limit + 1)
    assert reason == f"timed out in booting after {limit:.0f} s"
    assert overdue(S.ACTIVE, since=0.0, now=1e12) is None

"""PowerDriver owns retries, backoff and waits; checked with the fake driver and a fake clock."""

import pytest

from bootstrap.errors import BmcAuthError, BmcTimeout, PowerStateNotReached
from bootstrap.models import BmcAddress, Credential
from bootstrap.power.base import BmcTarget
from bootstrap.power.fake import FakeMachine, FakePowerDriver

ADDR = BmcAddress("10.0.0.9")
TARGET = BmcTarget(ADDR, Credential("admin", "password"), node="node-1")


class Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


def driver(clock, machine, **kwargs):
    kwargs = {"attempts": 3, "backoff": 1.0, "power_wait": 10.0, "poll": 0.5, **kwargs}
    return FakePowerDriver({ADDR: machine}, clock=clock, sleep=clock.sleep, **kwargs)


def test_power_on_waits_until_the_state_is_reached(clock):
    machine = FakeMachine(settle_reads=3)
    result = driver(clock, machine).set_power(TARGET, "on")
    assert result.power == "on" and result.changed
    assert machine.calls.count("status") == 5  # before, then until settled
    assert result.seconds == pytest.approx(sum(clock.sleeps))


def test_already_on_is_not_a_change_and_sends_no_command(clock):
    machine = FakeMachine(power="on")
    result = driver(clock, machine).set_power(TARGET, "on")
    assert not result.changed
    assert "power on" not in machine.calls


def test_one_session_per_operation(clock):
    machine = FakeMachine(settle_reads=2)
    driver(clock, machine).set_power(TARGET, "on")
    assert machine.calls.count("login") == 1


def test_timeouts_are_retried_with_growing_backoff_and_relogin(clock):
    machine = FakeMachine()
    machine.errors.extend([BmcTimeout("no answer"), BmcTimeout("no answer")])
    assert driver(clock, machine).power_state(TARGET) == "off"
    assert len(clock.sleeps) == 2
    # the base delay doubles (1 s, then 2 s); jitter scales each by 0.5x-1.5x
    assert 0.5 <= clock.sleeps[0] <= 1.5
    assert 1.0 <= clock.sleeps[1] <= 3.0
    assert machine.calls.count("login") == 3  # each retry logs in afresh


def test_retries_run_out_with_a_clear_message(clock):
    machine = FakeMachine()
    machine.errors.extend([BmcTimeout("no answer")] * 3)
    with pytest.raises(BmcTimeout, match="node-1: power status failed after 3 attempts"):
        driver(clock, machine).power_state(TARGET)


def test_wrong_password_is_fatal_at_once(clock):
    machine = FakeMachine(password="other")
    with pytest.raises(BmcAuthError) as info:
        driver(clock, machine).set_power(TARGET, "on")
    assert clock.sleeps == []
    assert info.value.node == "node-1"
    assert info.value.exit_code == 77 and not info.value.retryable


def test_machine_that_never_reaches_the_state_fails_after_power_wait(clock):
    machine = FakeMachine(settle_reads=10**6)
    with pytest.raises(PowerStateNotReached, match="within 10 s"):
        driver(clock, machine).set_power(TARGET, "on")
    assert clock.now == pytest.approx(10.0, abs=0.01)


def test_cycle_of_an_off_machine_powers_it_on(clock):
    machine = FakeMachine(power="off")
    result = driver(clock, machine).set_power(TARGET, "cycle")
    assert result.power == "on" and "power on" in machine.calls


def test_cycle_of_an_on_machine_cycles(clock):
    machine = FakeMachine(power="on")
    driver(clock, machine).set_power(TARGET, "cycle")
    assert "power cycle" in machine.calls


def test_boot_device_validated_and_set(clock):
    machine = FakeMachine()
    drv = driver(clock, machine)
    drv.set_boot_device(TARGET, "pxe", persistent=True)
    assert (machine.bootdev, machine.persistent) == ("pxe", True)
    with pytest.raises(ValueError):
        drv.set_boot_device(TARGET, "floppy")


def test_unknown_bmc_times_out_after_retries(clock):
    drv = FakePowerDriver({}, clock=clock, sleep=clock.sleep, attempts=2, backoff=0.1)
    with pytest.raises(BmcTimeout):
        drv.power_state(TARGET)


def test_backoff_doubles_without_jitter(clock):
    class Midpoint:  # random() == 0.5 makes the jitter factor exactly 1
        def random(self):
            return 0.5

    machine = FakeMachine()
    machine.errors.extend([BmcTimeout("no answer"), BmcTimeout("no answer")])
    assert driver(clock, machine, rng=Midpoint()).power_state(TARGET) == "off"
    assert clock.sleeps == [1.0, 2.0]


def test_a_credential_too_long_for_the_kind_of_bmc_is_refused_without_a_login(clock):
    machine = FakeMachine(password="p" * 30)
    drv = driver(clock, machine)
    drv.credential_limits = (16, 20)
    with pytest.raises(BmcAuthError, match="longer than"):
        drv.power_state(BmcTarget(ADDR, Credential("admin", "p" * 30)))
    assert machine.calls == []

"""A fake power driver that ships in the product, for unit tests and dry runs.

Machines live in a dict keyed by BMC address. Faults are scripted: a queue of
errors to raise on the next calls, a number of polls before a power change
takes effect, a password the "BMC" checks. No network, no threads.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import deque

from ..errors import BmcAuthError, BmcError, BmcLoginTimeout, BmcTimeout
from ..models import IPMI, BmcAddress, BmcIdentity, Credential
from .base import BmcTarget, Machine, PowerDriver


@dataclasses.dataclass
class FakeMachine:
    password: str = "password"
    username: str = "admin"
    power: str = "off"
    bootdev: str = "disk"
    persistent: bool = False
    guid: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    #: give no answer to a login as an unknown user (many real BMCs do), instead of refusing
    silent_unknown_user: bool = False
    macs: tuple[str, ...] = ()
    #: power changes take effect after this many further status reads
    settle_reads: int = 0
    #: errors raised, one per call, before calls start to succeed
    errors: deque[BmcError] = dataclasses.field(default_factory=deque)
    users: dict[str, str] = dataclasses.field(default_factory=dict)
    pending: str | None = None
    _countdown: int = 0
    calls: list[str] = dataclasses.field(default_factory=list)


class FakePowerDriver(PowerDriver):
    name = "fake"

    def __init__(self, machines: dict[BmcAddress, FakeMachine] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.machines = machines if machines is not None else {}

    def _machine(self, target: BmcTarget, call: str) -> FakeMachine:
        machine = self.machines.get(target.address)
        if machine is None and target.address.driver != IPMI and not target.address.path:
            # a service: it answers (and checks logins) as its first machine
            machine = next(
                (m for a, m in sorted(self.machines.items(), key=lambda kv: str(kv[0]))
                 if a.service == target.address),
                None,
            )  # fmt: skip
        if machine is None:
            raise BmcTimeout(f"BMC {target.address}: no answer", node=target.label)
        machine.calls.append(call)
        if machine.errors:
            raise machine.errors.popleft()
        return machine

    def _connect(self, target: BmcTarget) -> BmcTarget:
        machine = self._machine(target, "login")
        cred = target.credential
        valid = {machine.username: machine.password, **machine.users}
        if cred.username not in valid and machine.silent_unknown_user:
            raise BmcLoginTimeout(
                f"BMC {target.address}: no answer to the login", node=target.label
            )
        if valid.get(cred.username) != cred.password.reveal():
            raise BmcAuthError(f"BMC {target.address} refused the login", node=target.label)
        return target

    def _disconnect(self, conn: BmcTarget) -> None:
        pass

    def _get_power(self, conn: BmcTarget) -> str:
        machine = self._machine(conn, "status")
        if machine.pending is not None:
            if machine._countdown <= 0:
                machine.power, machine.pending = machine.pending, None
            else:
                machine._countdown -= 1
        return machine.power

    def _set_power(self, conn: BmcTarget, action: str) -> None:
        machine = self._machine(conn, f"power {action}")
        machine.pending = "on" if action == "cycle" else action
        machine._countdown = machine.settle_reads

    def _set_boot_device(self, conn: BmcTarget, device: str, persistent: bool) -> None:
        machine = self._machine(conn, f"bootdev {device}")
        machine.bootdev, machine.persistent = device, persistent

    def _identify(self, conn: BmcTarget) -> BmcIdentity:
        machine = self._machine(conn, "identify")
        return BmcIdentity(guid=machine.guid, power=machine.power, macs=machine.macs)

    def _machines(self, target: BmcTarget, conn: BmcTarget) -> list[Machine]:
        """A Redfish-like service address (no path) lists the machines at paths under it."""
        address = target.address
        if address.driver == IPMI or address.path:
            return super()._machines(target, conn)
        self._machine(target, "list")
        return [
            Machine(a, self._identify(dataclasses.replace(target, address=a)))
            for a in sorted(self.machines, key=str)
            if a.service == address and a.path
        ]

    def _ensure_user(self, conn: BmcTarget, credential: Credential) -> None:
        machine = self._machine(conn, f"user {credential.username}")
        machine.users[credential.username] = credential.password.reveal()

"""Enroll a BMC that answered the sweep: log in, read identity, record the node.

Idempotent: the same GUID is the same node; a changed BMC address is updated,
not duplicated. Credentials are tried in order: the node's stored login, a
pending (half-rotated) one, then the operator's list.

Rotation is crash-safe. The new password is persisted (encrypted, as
*pending*) before the BMC is touched, and promoted to the node's login only
after a fresh login with it succeeded. The factory login is never changed, so
whatever point a crash interrupts, one of the stored logins works.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Sequence

from ..errors import BmcAuthError, ConcurrentUpdate, MetalseedError
from ..guid import uuid_candidates
from ..models import BmcAddress, BmcIdentity, Credential, Node, Secret
from ..power.base import BmcTarget, PowerDriver
from ..states import NodeState
from ..store import StateStore

log = logging.getLogger(__name__)


def new_bmc_password() -> Secret:
    """16 characters from a 64-symbol alphabet: 96 bits, fits every IPMI BMC."""
    return Secret(secrets.token_urlsafe(12))


@dataclasses.dataclass(frozen=True)
class EnrollResult:
    bmc: BmcAddress
    node: str | None
    guid: str | None
    state: str
    power: str = "unknown"
    username: str | None = None
    rotated: bool = False
    error: str | None = None

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "bmc": str(self.bmc),
            "guid": self.guid,
            "state": self.state,
            "power": self.power,
            "username": self.username,
            "rotated": self.rotated,
            "error": self.error,
        }


class Enroller:
    def __init__(
        self,
        store: StateStore,
        driver: PowerDriver,
        candidates: Sequence[Credential],
        *,
        rotate: bool = False,
        rotate_username: str = "metalseed",
        new_password: Callable[[], Secret] = new_bmc_password,
    ) -> None:
        self.store = store
        self.driver = driver
        self.candidates = list(candidates)
        self.rotate = rotate
        self.rotate_username = rotate_username
        self.new_password = new_password

    def _logins(self, known: Node | None) -> list[Credential]:
        logins: list[Credential] = []
        if known is not None:
            for cred in (
                self.store.get_credential(known.id),
                self.store.get_pending_credential(known.id),
            ):
                if cred is not None:
                    logins.append(cred)
        for cred in self.candidates:
            if cred not in logins:
                logins.append(cred)
        return logins

    def enroll(self, bmc: BmcAddress) -> EnrollResult:
        known = self.store.node_by_bmc(bmc)
        label = known.id if known else None
        refused: list[str] = []
        for cred in self._logins(known):
            target = BmcTarget(bmc, cred, node=label)
            try:
                identity = self.driver.identify(target)
            except BmcAuthError:
                refused.append(cred.username)
                continue
            except MetalseedError as exc:
                if known is not None:
                    self.store.add_event(known.id, "discovery", f"BMC {bmc} unusable: {exc}")
                return EnrollResult(
                    bmc,
                    label,
                    known.guid if known else None,
                    str(known.state) if known else "unknown",
                    error=str(exc),
                )
            return self._enrolled(bmc, known, cred, identity)
        return self._refused(bmc, known, refused)

    # -- outcomes ---------------------------------------------------------------------

    def _refused(self, bmc: BmcAddress, known: Node | None, refused: list[str]) -> EnrollResult:
        users = ", ".join(dict.fromkeys(refused)) or "none given"
        reason = f"BMC refused every login tried (users: {users})"
        if known is None:
            node = self.store.create_node(
                guid=None,
                bmc=bmc,
                state=NodeState.DISCOVERED,
                reason=reason,
                message=f"found BMC at {bmc}; {reason}",
            )
        elif known.state in (NodeState.DISCOVERED,):
            node = self.store.transition(known.id, NodeState.DISCOVERED, reason)
        elif known.state in (NodeState.RETIRED, NodeState.FAILED):
            self.store.add_event(known.id, "discovery", reason)
            node = known
        else:
            node = self.store.transition(known.id, NodeState.FAILED, reason)
        return EnrollResult(bmc, node.id, node.guid, str(node.state), error=reason)

    def _facts(self, identity: BmcIdentity) -> dict:
        return {
            "bmc_mac": identity.mac,
            "manufacturer_id": identity.manufacturer_id,
            "product_id": identity.product_id,
            "firmware": identity.firmware,
            "power": identity.power,
            "fru": dict(identity.fru),
            "last_seen": time.time(),
        }

    def _upsert(self, bmc: BmcAddress, identity: BmcIdentity, known: Node | None) -> Node:
        facts = self._facts(identity)
        # the same machine may be known under the other byte order of its UUID (it
        # enlisted by netbooting first, and its firmware sent the UUID the other way)
        node = next(
            (n for g in uuid_candidates(identity.guid) if (n := self.store.node_by_guid(g))),
            None,
        )
        if node is None and known is not None and known.guid is None:
            return self.store.update_node(
                known.id,
                guid=identity.guid,
                facts=facts,
                event=("discovery", f"identified as machine {identity.guid}"),
            )
        if node is None:
            try:
                return self.store.create_node(
                    guid=identity.guid,
                    bmc=bmc,
                    state=NodeState.DISCOVERED,
                    facts=facts,
                    message=f"found machine {identity.guid} behind BMC {bmc}",
                )
            except ConcurrentUpdate:  # a concurrent discover created it first
                node = self.store.node_by_guid(identity.guid)
                assert node is not None
        if known is not None and known.guid is None and known.id != node.id:
            self.store.transition(known.id, NodeState.RETIRED, f"BMC {bmc} belongs to {node.id}")
        moved = node.bmc != bmc
        event = ("discovery", f"BMC address changed {node.bmc} -> {bmc}") if moved else None
        return self.store.update_node(node.id, bmc=bmc if moved else None, facts=facts, event=event)

    def _enrolled(
        self, bmc: BmcAddress, known: Node | None, cred: Credential, identity: BmcIdentity
    ) -> EnrollResult:
        node = self._upsert(bmc, identity, known)
        stored = self.store.get_credential(node.id)
        if stored != cred:
            self.store.set_credential(
                node.id, cred, message=f"BMC login works for user {cred.username}"
            )
        if node.state in (NodeState.DISCOVERED, NodeState.FAILED):
            node = self.store.transition(
                node.id, NodeState.ENROLLED, f"logged in as {cred.username}"
            )
        rotated, error = False, None
        if self.rotate and cred.username != self.rotate_username:
            try:
                cred = self._rotate(node, bmc, cred)
                rotated = True
            except MetalseedError as exc:
                error = f"credential rotation failed: {exc}"
                self.store.add_event(node.id, "credentials", error)
        return EnrollResult(
            bmc,
            node.id,
            node.guid,
            str(node.state),
            power=identity.power,
            username=cred.username,
            rotated=rotated,
            error=error,
        )

    def _rotate(self, node: Node, bmc: BmcAddress, working: Credential) -> Credential:
        pending = self.store.get_pending_credential(node.id)
        if pending is not None and pending.username == self.rotate_username:
            new = pending  # resume an interrupted rotation with the password already stored
        else:
            new = Credential(self.rotate_username, self.new_password())
            self.store.set_pending_credential(node.id, new)
        self.driver.ensure_user(BmcTarget(bmc, working, node.id), new)
        self.driver.check_login(BmcTarget(bmc, new, node.id))
        self.store.set_credential(
            node.id, new, message=f"rotated BMC login to dedicated user {self.rotate_username}"
        )
        return new

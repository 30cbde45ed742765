"""Enroll a BMC endpoint that answered the sweep: log in, list its machines, record them.

An IPMI BMC has one machine behind it; a Redfish service lists its Systems,
each its own node (the same code, ``PowerDriver.machines``). Idempotent: the
same GUID is the same node; a changed BMC address is updated, not
duplicated. Credentials are tried in order: the nodes' stored login, a
pending (half-rotated) one, then the operator's list.

Many BMCs stay silent for a username they do not know instead of refusing
it. A first pass therefore tries every credential with one quick login
(``bmc.login_timeout`` each, no retry): a silent wrong credential costs one
login timeout, then the next is tried. Only if none worked does a second
pass retry the silent ones with the driver's full retries (a lossy BMC may
have dropped the right login).

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

from ..errors import BmcAuthError, BmcLoginTimeout, ConcurrentUpdate, MetalseedError
from ..guid import uuid_candidates
from ..models import IPMI, BmcAddress, BmcIdentity, Credential, Node, Secret
from ..power.base import BmcTarget, Machine, PowerDriver
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
            "driver": self.bmc.driver,
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
        self.driver = driver  # a PowerDriver or the Drivers registry: both list machines
        self.candidates = list(candidates)
        self.rotate = rotate
        self.rotate_username = rotate_username
        self.new_password = new_password

    def _known(self, endpoint: BmcAddress) -> list[Node]:
        """The nodes already recorded behind this endpoint."""
        if endpoint.driver == IPMI:
            node = self.store.node_by_bmc(endpoint)
            return [node] if node is not None else []
        return [n for n in self.store.list_nodes() if n.bmc and n.bmc.service == endpoint.service]

    def _logins(self, known: Sequence[Node]) -> list[Credential]:
        logins: list[Credential] = []
        for node in known:
            for cred in (
                self.store.get_credential(node.id),
                self.store.get_pending_credential(node.id),
            ):
                if cred is not None and cred not in logins:
                    logins.append(cred)
        for cred in self.candidates:
            if cred not in logins:
                logins.append(cred)
        return logins

    def enroll(self, endpoint: BmcAddress) -> list[EnrollResult]:
        """Log in to ``endpoint`` and record every machine behind it; one result each."""
        known = self._known(endpoint)
        label = known[0].id if len(known) == 1 else None
        refused: list[str] = []
        silent: list[Credential] = []
        logins = self._logins(known)
        for quick, creds in ((True, logins), (False, silent)):
            still_silent: list[Credential] = []
            for cred in list(creds):
                target = BmcTarget(endpoint, cred, node=label)
                try:
                    machines = self.driver.list_machines(target, quick_login=quick)
                except BmcAuthError:
                    refused.append(cred.username)
                    continue
                except BmcLoginTimeout:
                    (silent if quick else still_silent).append(cred)
                    continue
                except MetalseedError as exc:
                    return self._unusable(endpoint, known, exc)
                return self._enrolled(endpoint, known, cred, machines)
            if not quick:
                silent = still_silent
        return [self._refused(endpoint, known, refused, [c.username for c in silent])]

    # -- outcomes ---------------------------------------------------------------------

    def _unusable(
        self, endpoint: BmcAddress, known: Sequence[Node], exc: MetalseedError
    ) -> list[EnrollResult]:
        for node in known:
            self.store.add_event(node.id, "discovery", f"BMC {endpoint} unusable: {exc}")
        if not known:
            return [EnrollResult(endpoint, None, None, "unknown", error=str(exc))]
        return [
            EnrollResult(n.bmc or endpoint, n.id, n.guid, str(n.state), error=str(exc))
            for n in known
        ]

    def _refused(
        self, bmc: BmcAddress, known: Sequence[Node], refused: list[str], silent: list[str]
    ) -> EnrollResult:
        users = ", ".join(dict.fromkeys(refused)) or "none given"
        reason = f"BMC refused every login tried (users: {users})"
        if silent:
            quiet = ", ".join(dict.fromkeys(silent))
            reason = (
                f"BMC refused every login tried (users refused: {users}; "
                f"no answer to a login as: {quiet})"
            )
        if not known:
            node = self.store.create_node(
                guid=None,
                bmc=bmc,
                state=NodeState.DISCOVERED,
                reason=reason,
                message=f"found BMC at {bmc}; {reason}",
            )
            return EnrollResult(bmc, node.id, node.guid, str(node.state), error=reason)
        for node in known:
            if node.state in (NodeState.DISCOVERED,):
                self.store.transition(node.id, NodeState.DISCOVERED, reason)
            elif node.state in (NodeState.RETIRED, NodeState.FAILED):
                self.store.add_event(node.id, "discovery", reason)
            else:
                self.store.transition(node.id, NodeState.FAILED, reason)
        node = self.store.get_node(known[0].id)
        return EnrollResult(node.bmc or bmc, node.id, node.guid, str(node.state), error=reason)

    def _facts(self, identity: BmcIdentity) -> dict:
        facts = {
            "bmc_mac": identity.mac,
            "manufacturer_id": identity.manufacturer_id,
            "product_id": identity.product_id,
            "firmware": identity.firmware,
            "power": identity.power,
            "fru": dict(identity.fru),
            "last_seen": time.time(),
        }
        if identity.macs:
            facts["macs"] = list(identity.macs)
        return facts

    def _upsert(self, machine: Machine, placeholder: Node | None) -> tuple[Node, bool]:
        """The node for ``machine``, created or updated; True if this endpoint drives it.

        A machine already driven through another kind of BMC (its IPMI side was
        enrolled first, now its Redfish service is swept too) keeps its driver: the
        other endpoint is recorded as a fact, and nothing flips back and forth.
        """
        bmc, identity = machine.address, machine.identity
        facts = self._facts(identity)
        # the same machine may be known under the other byte order of its UUID (it
        # enlisted by netbooting first, and its firmware sent the UUID the other way)
        node = next(
            (n for g in uuid_candidates(identity.guid) if (n := self.store.node_by_guid(g))),
            None,
        )
        if node is None and placeholder is not None:
            return self.store.update_node(
                placeholder.id,
                guid=identity.guid,
                bmc=bmc if placeholder.bmc != bmc else None,
                facts=facts,
                event=("discovery", f"identified as machine {identity.guid}"),
            ), True
        if node is None:
            try:
                return self.store.create_node(
                    guid=identity.guid,
                    bmc=bmc,
                    state=NodeState.DISCOVERED,
                    facts=facts,
                    message=f"found machine {identity.guid} behind BMC {bmc}",
                ), True
            except ConcurrentUpdate:  # a concurrent discover created it first
                node = self.store.node_by_guid(identity.guid)
                assert node is not None
        if placeholder is not None and placeholder.id != node.id:
            self.store.transition(
                placeholder.id, NodeState.RETIRED, f"BMC {placeholder.bmc} belongs to {node.id}"
            )
        if (
            node.bmc is not None
            and node.bmc.driver != bmc.driver
            and self.store.get_credential(node.id) is not None
        ):
            other = dict(node.facts.get("other_bmcs") or {})
            event = None
            if other.get(bmc.driver) != str(bmc):
                other[bmc.driver] = str(bmc)
                event = ("discovery", f"also reachable over {bmc.driver} at {bmc}")
            del facts["power"]
            return self.store.update_node(
                node.id, facts={**facts, "other_bmcs": other}, event=event
            ), False
        moved = node.bmc != bmc
        event = ("discovery", f"BMC address changed {node.bmc} -> {bmc}") if moved else None
        return self.store.update_node(
            node.id, bmc=bmc if moved else None, facts=facts, event=event
        ), True

    def _enrolled(
        self,
        endpoint: BmcAddress,
        known: Sequence[Node],
        cred: Credential,
        machines: Sequence[Machine],
    ) -> list[EnrollResult]:
        placeholders = [n for n in known if n.guid is None]
        results: list[EnrollResult] = self._gone(known, machines)
        driven: list[Node] = []
        for machine in machines:
            placeholder = placeholders.pop(0) if placeholders else None
            node, ours = self._upsert(machine, placeholder)
            if not ours:
                results.append(
                    EnrollResult(
                        machine.address,
                        node.id,
                        node.guid,
                        str(node.state),
                        power=machine.identity.power,
                        error=f"already driven over {node.bmc.driver} at {node.bmc}",
                    )
                )
                continue
            if node.facts.get("bmc_gone"):
                node = self.store.update_node(
                    node.id,
                    facts={"bmc_gone": False},
                    event=("discovery", f"its Redfish System {node.bmc.path} is back"),
                )
            if self.store.get_credential(node.id) != cred:
                self.store.set_credential(
                    node.id, cred, message=f"BMC login works for user {cred.username}"
                )
            if node.state in (NodeState.DISCOVERED, NodeState.FAILED):
                node = self.store.transition(
                    node.id, NodeState.ENROLLED, f"logged in as {cred.username}"
                )
            driven.append(node)
            results.append(
                EnrollResult(
                    machine.address,
                    node.id,
                    node.guid,
                    str(node.state),
                    power=machine.identity.power,
                    username=cred.username,
                )
            )
        if self.rotate and driven and cred.username != self.rotate_username:
            try:
                cred = self._rotate(endpoint, driven, cred)
            except MetalseedError as exc:
                error = f"credential rotation failed: {exc}"
                for node in driven:
                    self.store.add_event(node.id, "credentials", error)
                ids = {n.id for n in driven}
                results = [
                    dataclasses.replace(r, error=error) if r.node in ids else r for r in results
                ]
            else:
                ids = {n.id for n in driven}
                results = [
                    dataclasses.replace(r, username=cred.username, rotated=True)
                    if r.node in ids
                    else r
                    for r in results
                ]
        return results

    def _gone(self, known: Sequence[Node], machines: Sequence[Machine]) -> list[EnrollResult]:
        """Known Systems their service no longer lists: say so; a node being provisioned fails.

        A running member is left as it is (the machine may well be running; only its
        BMC side went away), with the event on it.
        """
        listed = {m.address for m in machines}
        results = []
        for node in known:
            if node.bmc is None or not node.bmc.path or node.bmc in listed or node.guid is None:
                continue
            reason = f"its Redfish System {node.bmc.path} is gone from the service"
            if node.state in (NodeState.ENROLLED, NodeState.BOOTING):
                node = self.store.transition(node.id, NodeState.FAILED, reason)
            elif not node.facts.get("bmc_gone"):
                self.store.add_event(node.id, "discovery", reason)
            self.store.update_node(node.id, facts={"bmc_gone": True})
            results.append(
                EnrollResult(node.bmc, node.id, node.guid, str(node.state), error=reason)
            )
        return results

    def _rotate(self, endpoint: BmcAddress, nodes: Sequence[Node], working: Credential):
        """One dedicated account per BMC endpoint (a Redfish service's Systems share it)."""
        pending = next(
            (
                p
                for n in nodes
                if (p := self.store.get_pending_credential(n.id)) is not None
                and p.username == self.rotate_username
            ),
            None,
        )
        new = pending or Credential(self.rotate_username, self.new_password())
        for node in nodes:  # resume an interrupted rotation with the password already stored
            if self.store.get_pending_credential(node.id) != new:
                self.store.set_pending_credential(node.id, new)
        label = nodes[0].id if len(nodes) == 1 else None
        self.driver.ensure_user(BmcTarget(endpoint, working, label), new)
        self.driver.check_login(BmcTarget(nodes[0].bmc or endpoint, new, nodes[0].id))
        for node in nodes:
            self.store.set_credential(
                node.id, new, message=f"rotated BMC login to dedicated user {self.rotate_username}"
            )
        return new

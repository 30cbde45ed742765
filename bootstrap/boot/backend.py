"""The one narrow interface between the boot protocols and node data.

DHCP, TFTP and HTTP handlers ask the backend two things -- *who is this MAC*
and *what should it boot* -- and tell it one: *this step happened*. They
never touch the store or the state machine themselves. (The shape follows
tinkerbell/smee's handler backend.)

``StoreBackend`` answers from the state store: a MAC is tied to its node by
the machine UUID the firmware sends (DHCP option 97, iPXE ``${uuid}``), which
is the BMC's system GUID. The first boot step of a known node moves it to
``booting``.

Enlist (issue 4) is the node agent calling home: ``enlist`` applies the token
rules of ``enlist.judge`` to the stored token, picks the node (the token's;
for a discovery token the node whose GUID is the machine's DMI UUID, else the
MAC's, else a new one) and has the store apply it all in one transaction.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..errors import ConcurrentUpdate, IllegalTransition, NotFoundError
from ..guid import uuid_candidates
from ..models import EnlistWrite, Node, Secret, TokenRecord
from ..sshkeys import SeedKeyPair, SshKeyError, for_state_dir
from ..states import NodeState
from ..store import StateStore
from .enlist import (
    DISCOVERY,
    JOIN,
    EnlistOutcome,
    EnlistRequest,
    Verdict,
    judge,
    path_to_enlisted,
    summary,
)

log = logging.getLogger(__name__)


class BootProfile(enum.StrEnum):
    """What a machine is told to boot."""

    ENLIST = "enlist"  # unknown machine: the image in enlist-only mode
    PROVISION = "provision"  # a known node: the node image with its join token
    RETIRED = "retired"  # taken out of service: stop cleanly, boot nothing


@dataclasses.dataclass(frozen=True)
class Machine:
    """The backend's answer to "who is this MAC"."""

    mac: str  # lower-case, colon-separated
    node_id: str | None  # None: an unknown machine
    state: NodeState | None
    profile: BootProfile
    hostname: str | None = None


class BootBackend(Protocol):
    def identify(self, mac: str, uuid: str | None = None) -> Machine:
        """Who is this MAC and what should it boot.

        ``uuid`` is the machine UUID the client sent (canonical text), if any.
        An unbound MAC whose UUID matches a node's system GUID (in either byte
        order) is bound to that node, and the binding is remembered.
        """

    def record(
        self, mac: str, kind: str, message: str, data: Mapping[str, Any] | None = None
    ) -> None:
        """A boot step (``dhcp.offer``, ``tftp.sent``, ``http.script``, ...).

        An event on the MAC's node; the first step of a node that is
        ``enrolled`` (or ``failed``/``enlisted``) moves it to ``booting``.
        Steps of unknown machines are logged.
        """

    def mint_token(self, node_id: str, mac: str) -> Secret:
        """A one-time join token for this node and MAC; the store keeps only its hash."""

    def mint_discovery_token(self, mac: str, ttl: float | None = None) -> Secret:
        """A short-lived one-time token for an unknown machine: it may enlist as a new node."""

    def check_token(self, token: str, mac: str | None = None) -> str | None:
        """The node id a live (unexpired, unused) join token was minted for, or None."""

    def enlist(self, token: str, request: EnlistRequest, peer: str) -> EnlistOutcome:
        """A node agent's enlist: 200 with the node, or a 401/403 (an event on the node)."""

    def refuse_enlist(self, mac: str | None, reason: str, peer: str) -> None:
        """An enlist refused before it got here (no token): an event on the MAC's node."""


def normalise_mac(mac: str) -> str:
    """``AA-BB-CC-DD-EE-FF`` / ``aabb.ccdd.eeff`` / ``aa:bb:..`` -> ``aa:bb:cc:dd:ee:ff``."""
    digits = mac.lower().replace(":", "").replace("-", "").replace(".", "")
    if len(digits) != 12 or any(ch not in "0123456789abcdef" for ch in digits):
        raise ValueError(f"not a MAC address: {mac!r}")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


#: states from which the first boot step moves a node to ``booting``
_STARTS_BOOTING = frozenset({NodeState.ENROLLED, NodeState.FAILED})
#: the boot clients whose DHCPDISCOVER means a machine is netbooting again
_FIRMWARE_CLIENTS = frozenset({"pxe", "ipxe", "http"})


def starts_a_boot(state: NodeState, kind: str, data: Mapping[str, Any]) -> bool:
    """Whether boot step ``kind`` of a node in ``state`` moves it to ``booting``.

    Any step does for a node not booting yet. An ``enlisted`` node goes back to
    ``booting`` only when its firmware DHCPs again (a new netboot): not on a
    late step of the boot that enlisted it -- TFTP and HTTP events are recorded
    off the request path and may land after the enlist -- nor on the booted
    OS's own DHCP client renewing its address.
    """
    if state in _STARTS_BOOTING:
        return True
    return (
        state is NodeState.ENLISTED
        and kind == "dhcp.discover"
        and data.get("client") in _FIRMWARE_CLIENTS
    )


def _member_conf(node: Node) -> str | None:
    """The ceph.conf of an active cluster member (recorded by its join), else None."""
    conf = node.facts.get("ceph_conf")
    return conf if node.state is NodeState.ACTIVE and isinstance(conf, str) and conf else None


class StoreBackend:
    """``BootBackend`` over the state store."""

    def __init__(
        self,
        store: StateStore,
        *,
        token_ttl: float = 3600.0,
        discovery_ttl: float = 900.0,
        ssh_keys: SeedKeyPair | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``ssh_keys``: the control plane's pair; by default ``ssh/`` in the store's dir."""
        self._store = store
        self._token_ttl = token_ttl
        self._discovery_ttl = discovery_ttl
        self._ssh_keys = ssh_keys
        self._clock = clock

    def identify(self, mac: str, uuid: str | None = None) -> Machine:
        mac = normalise_mac(mac)
        node_id = self._store.mac_node(mac)
        if node_id is None and uuid:
            for candidate in uuid_candidates(uuid):
                node = self._store.node_by_guid(candidate)
                if node is not None:
                    node_id = node.id
                    self._store.bind_mac(mac, node.id, uuid=candidate)
                    break
            else:
                self._store.bind_mac(mac, None, uuid=uuid)
        if node_id is None:
            return Machine(mac, None, None, BootProfile.ENLIST)
        node = self._store.get_node(node_id)
        profile = BootProfile.RETIRED if node.state is NodeState.RETIRED else BootProfile.PROVISION
        return Machine(mac, node.id, node.state, profile, hostname=node.id)

    def record(
        self, mac: str, kind: str, message: str, data: Mapping[str, Any] | None = None
    ) -> None:
        mac = normalise_mac(mac)
        node_id = self._store.mac_node(mac)
        if node_id is None:
            log.info("unknown machine %s: %s", mac, message)
            return
        data = {"mac": mac, **(data or {})}
        node = self._store.get_node(node_id)
        if starts_a_boot(node.state, kind, data):
            try:
                self._store.transition(
                    node_id, NodeState.BOOTING, f"{kind}: {message}", expect=node.state, data=data
                )
                return
            except (IllegalTransition, ConcurrentUpdate):
                pass  # someone moved it meanwhile; the step is still an event
        self._store.add_event(node_id, kind, message, data)

    def mint_token(self, node_id: str, mac: str) -> Secret:
        token = secrets.token_urlsafe(32)
        now = self._clock()
        self._store.add_token(
            token_hash(token),
            node_id=node_id,
            mac=normalise_mac(mac),
            purpose="join",
            expires=now + self._token_ttl,
        )
        return Secret(token)

    def mint_discovery_token(self, mac: str, ttl: float | None = None) -> Secret:
        token = secrets.token_urlsafe(32)
        self._store.add_token(
            token_hash(token),
            node_id="",
            mac=normalise_mac(mac),
            purpose=DISCOVERY,
            expires=self._clock() + (self._discovery_ttl if ttl is None else ttl),
        )
        return Secret(token)

    def check_token(self, token: str, mac: str | None = None) -> str | None:
        record = self._store.get_token(token_hash(token))
        if record is None or record.used is not None or record.expires < self._clock():
            return None
        if record.purpose != JOIN or not record.node_id:
            return None
        if mac is not None and record.mac != normalise_mac(mac):
            return None
        return record.node_id

    # -- enlist ------------------------------------------------------------------------

    def enlist(self, token: str, request: EnlistRequest, peer: str) -> EnlistOutcome:
        digest = token_hash(token)
        for _ in range(3):  # a lost compare-and-swap (token or node changed): judge again
            record = self._store.get_token(digest)
            verdict = judge(record, request, self._clock())
            if verdict.refused or record is None:
                return self._refuse(record, request.mac, verdict, peer)
            keys = self._public_keys()  # before anything is written
            if verdict.repeat:
                node = self._store.get_node(record.node_id)
                log.info("enlist of %s repeated by the same boot from %s", node.id, peer)
                return EnlistOutcome(
                    200, node=node.id, state=node.state, repeat=True, ssh_authorized_keys=keys,
                    ceph_conf=_member_conf(node),
                )  # fmt: skip
            plan = self._plan(digest, record, request, peer)
            if isinstance(plan, EnlistOutcome):
                return plan
            try:
                node, fresh = self._store.apply_enlist(plan)
            except ConcurrentUpdate:
                continue
            if fresh:
                log.info("%s enlisted from %s (%s)", node.id, peer, plan.reason)
            return EnlistOutcome(
                200, node=node.id, state=node.state, repeat=not fresh, ssh_authorized_keys=keys,
                ceph_conf=_member_conf(node),
            )  # fmt: skip
        return EnlistOutcome(503, "the node kept changing under the enlist; try again")

    def _plan(
        self, digest: str, record: TokenRecord, request: EnlistRequest, peer: str
    ) -> EnlistWrite | EnlistOutcome:
        """What to write for an accepted token, or the refusal when the node may not enlist."""
        try:
            target = self._target(record, request)
        except NotFoundError:
            verdict = Verdict(403, "the token's node no longer exists", "no_node")
            return self._refuse(record, request.mac, verdict, peer)
        path = path_to_enlisted(target.state if target else None)
        if path is None and target is not None:
            verdict = Verdict(403, f"{target.id} is {target.state}", "not_enlistable")
            return self._refuse(record, request.mac, verdict, peer, also=target.id)
        dmi = request.inventory.system.uuid
        data: dict[str, Any] = {"peer": peer, "via": f"{record.purpose} token"}
        if target is not None and target.guid and dmi and target.guid not in uuid_candidates(dmi):
            data["uuid_mismatch"] = True
            log.warning("%s enlisted with DMI UUID %s, its GUID is %s", target.id, dmi, target.guid)
        return EnlistWrite(
            token_hash=digest,
            boot_id=request.boot_id,
            mac=request.mac,
            node_id=target.id if target else None,
            guid=dmi if target is None else None,
            expect=target.state if target else None,
            path=path or (),
            inventory=request.inventory,
            reason=f"enlisted: {summary(request.inventory)}",
            data=data,
        )

    def refuse_enlist(self, mac: str | None, reason: str, peer: str) -> None:
        self._refuse(None, mac, Verdict(401, reason, "no_token"), peer)

    def _target(self, record: TokenRecord, request: EnlistRequest) -> Node | None:
        """The node this enlist is for; None: a new one (discovery of an unknown machine)."""
        if record.purpose == JOIN:
            return self._store.get_node(record.node_id)
        dmi = request.inventory.system.uuid
        for candidate in uuid_candidates(dmi) if dmi else ():
            node = self._store.node_by_guid(candidate)
            if node is not None:
                return node
        node_id = self._store.mac_node(request.mac)
        return self._store.get_node(node_id) if node_id else None

    def _refuse(
        self,
        record: TokenRecord | None,
        mac: str | None,
        verdict: Verdict,
        peer: str,
        also: str | None = None,
    ) -> EnlistOutcome:
        """Log it, and put it on the token's node and the MAC's node when they are known."""
        nodes = [record.node_id] if record is not None and record.node_id else []
        if also and also not in nodes:
            nodes.append(also)
        if mac is not None:
            bound = self._store.mac_node(mac)
            if bound and bound not in nodes:
                nodes.append(bound)
        data = {"mac": mac, "peer": peer, "code": verdict.code, "status": verdict.status}
        for node_id in nodes:
            self._store.add_event(
                node_id, "enlist.refused", f"enlist from {peer} refused: {verdict.reason}", data
            )
        log.warning("enlist from %s (MAC %s) refused: %s", peer, mac or "?", verdict.reason)
        return EnlistOutcome(verdict.status, verdict.reason)

    def _public_keys(self) -> tuple[str, ...]:
        if self._ssh_keys is None:
            state_dir = getattr(self._store, "state_dir", None)
            if state_dir is None:
                raise SshKeyError("no place for the control plane's SSH key pair: pass ssh_keys")
            self._ssh_keys = for_state_dir(state_dir)
        return (self._ssh_keys.public_line(),)

"""``POST /api/v1/enlist``: the node agent calls home with its token and inventory.

The HTTP side only; the rules are in ``enlist.py`` and the backend. In order:

1. the body, read up to ``boot.enlist_max_body`` bytes (Content-Length or
   not, within ``READ_TIMEOUT``): larger -> 400;
2. ``Authorization: Bearer TOKEN`` missing -> 401 (an event on the body's MAC's node);
3. the body validated (``enlist.parse_request``): malformed -> 400, nothing changes;
4. the backend's verdict: 401 (unknown, expired or replayed token), 403 (another
   MAC's or node's token, a retired node), or 200 with what the node needs next::

    {"node": ID, "state": "enlisted", "ssh_authorized_keys": ["ssh-ed25519 ..."],
     "time_servers": ["10.20.0.1"], "provisioning_cidr": "10.20.0.0/24", "hostname": ID}

The time servers are ``boot.time_servers``, else the seed's own address; the
provisioning network is the serving interface's (``boot.interface``), looked
up on first use. Tokens are never logged: access logging is off and nothing
here prints a header or a body.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse

from aiohttp import web

from ..config import BootConfig
from ..errors import MetalseedError
from .backend import BootBackend
from .enlist import InvalidEnlist, answer, bearer_token, mac_hint, parse_request
from .netif import ipv4_interface

log = logging.getLogger(__name__)

#: seconds a client has to send its whole body
READ_TIMEOUT = 30.0
PATH = "/api/v1/enlist"


def _json(status: int, body: dict, **headers: str) -> web.Response:
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store", **headers})


def _refused(status: int, error: str) -> web.Response:
    if status == 401:
        return _json(status, {"error": error}, **{"WWW-Authenticate": 'Bearer realm="metalseed"'})
    return _json(status, {"error": error})


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None when it is larger than ``limit`` (read no further)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    data = bytearray()
    while chunk := await request.content.read(64 * 1024):
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


class EnlistApi:
    """The enlist handler. ``provisioning_cidr`` overrides the interface's network."""

    def __init__(
        self,
        backend: BootBackend,
        config: BootConfig,
        *,
        seed_url: str,
        provisioning_cidr: str | None = None,
    ) -> None:
        self._backend = backend
        self._max_body = config.enlist_max_body
        self._interface = config.interface
        seed_host = urllib.parse.urlsplit(seed_url).hostname
        self._time_servers = tuple(config.time_servers) or ((seed_host,) if seed_host else ())
        self._cidr = provisioning_cidr
        self._cidr_known = provisioning_cidr is not None

    def _network(self) -> str | None:
        """The provisioning network, from the interface on first use (blocking: a thread)."""
        if not self._cidr_known:
            try:
                cidr = str(ipv4_interface(self._interface).network) if self._interface else None
            except MetalseedError as exc:
                log.error("the provisioning network is unknown: %s", exc)
                return None  # asked again next time
            self._cidr, self._cidr_known = cidr, True
        return self._cidr

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.remote or ""
        try:
            raw = await asyncio.wait_for(read_body(request, self._max_body), READ_TIMEOUT)
        except TimeoutError:
            log.warning("enlist from %s: the body did not arrive in %.0f s", peer, READ_TIMEOUT)
            return _json(400, {"error": f"the body did not arrive in {READ_TIMEOUT:.0f} s"})
        if raw is None:
            log.warning("enlist from %s refused: body over %d bytes", peer, self._max_body)
            return _json(400, {"error": f"the body is larger than {self._max_body} bytes"})

        token = bearer_token(request.headers.get("Authorization"))
        try:
            if token is None:
                mac = mac_hint(raw)  # recorded, never trusted: the MAC is the caller's word
                await asyncio.to_thread(self._backend.refuse_enlist, mac, "no token", peer)
                return _refused(401, "missing or malformed Bearer token")
            try:
                enlist = parse_request(raw, self._max_body)
            except InvalidEnlist as exc:
                log.warning("enlist from %s: bad request: %s", peer, exc)
                return _json(400, {"error": str(exc)})
            outcome = await asyncio.to_thread(self._backend.enlist, token, enlist, peer)
            if outcome.status != 200:
                return _refused(outcome.status, outcome.error)
            cidr = await asyncio.to_thread(self._network)
        except MetalseedError as exc:
            log.error("enlist from %s: the seed cannot answer: %s", peer, exc)
            return _json(503, {"error": "the seed cannot enlist right now; try again"})
        body = answer(outcome, time_servers=self._time_servers, provisioning_cidr=cidr)
        return _json(200, body)

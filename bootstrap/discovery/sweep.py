"""Sweep address ranges for BMCs: concurrent presence probes over one UDP socket.

Every address gets a probe; unanswered ones are probed again for a few rounds
(UDP and busy BMCs drop packets). Retries go out early, spaced within one
timeout, so a sweep costs about two timeouts however many addresses are dead.
Probes are paced in windows so a /16 does not flood the segment. Only responders
go on to the (expensive) authenticated stage.

Redfish services are probed over HTTP(S) at the same time: an unauthenticated
GET of the service root ``/redfish/v1/`` (which the standard requires to be
open), a bounded number at once, each within the probe timeout (TCP connects
to live hosts get a few seconds more than UDP: a TLS handshake is slower).
No credential is sent, so the certificate is not checked here; the login
that follows checks it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence

from ..models import IPMI, BmcAddress
from .probe import ProbeError, ProbeReply, build_probe, parse_reply

log = logging.getLogger(__name__)

Progress = Callable[[int, int, int], None]  # (probed, found, total)


@dataclasses.dataclass(frozen=True)
class RedfishReply:
    """What a Redfish service root says without a login."""

    version: str
    uuid: str | None = None
    product: str | None = None


@dataclasses.dataclass(frozen=True)
class SweepResult:
    found: dict[BmcAddress, ProbeReply | RedfishReply]
    probed: int
    seconds: float
    malformed: int


class _Prober(asyncio.DatagramProtocol):
    def __init__(self, wanted: set[tuple[str, int]]) -> None:
        self.wanted = wanted
        self.found: dict[BmcAddress, ProbeReply] = {}
        self.malformed = 0
        self.all_found = asyncio.Event()

    def datagram_received(self, data: bytes, addr) -> None:
        key = (addr[0], addr[1])
        if key not in self.wanted:
            return  # not one of ours: a stray or spoofed datagram
        try:
            reply = parse_reply(data)
        except ProbeError as exc:
            self.malformed += 1
            log.debug("ignoring malformed answer from %s:%s: %s", addr[0], addr[1], exc)
            return
        self.found[BmcAddress(addr[0], addr[1])] = reply
        if len(self.found) == len(self.wanted):
            self.all_found.set()

    def error_received(self, exc: Exception) -> None:
        log.debug("probe socket error: %s", exc)


async def _sweep(
    targets: Sequence[BmcAddress],
    timeout: float,
    rounds: int,
    window: int,
    progress: Progress | None,
) -> SweepResult:
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    prober = _Prober({(t.host, t.port) for t in targets})
    transport, _ = await loop.create_datagram_endpoint(lambda: prober, sock=sock)
    probe = build_probe()
    probed = 0
    try:
        for round_no in range(rounds):
            pending = [t for t in targets if t not in prober.found]
            if not pending:
                break
            for i in range(0, len(pending), window):
                for target in pending[i : i + window]:
                    transport.sendto(probe, (target.host, target.port))
                if round_no == 0:
                    probed += len(pending[i : i + window])
                # let answers in between windows; pace large sweeps
                await asyncio.sleep(0.002 if len(pending) > window else 0)
                if progress:
                    progress(probed, len(prober.found), len(targets))
            # Re-probe the silent ones early, within one timeout; only after the
            # last round wait the full timeout for slow answers.
            last = round_no == rounds - 1
            try:
                await asyncio.wait_for(
                    prober.all_found.wait(), timeout if last else timeout / rounds
                )
            except TimeoutError:
                pass
            if progress:
                progress(probed, len(prober.found), len(targets))
    finally:
        transport.close()
    return SweepResult(
        found=dict(sorted(prober.found.items(), key=lambda kv: (kv[0].host, kv[0].port))),
        probed=probed,
        seconds=time.monotonic() - started,
        malformed=prober.malformed,
    )


#: Redfish service roots fetched at once, and the extra seconds a TCP/TLS probe gets
REDFISH_PROBES_AT_ONCE = 64
REDFISH_PROBE_GRACE = 2.0
_MAX_ROOT_BYTES = 256 * 1024


def parse_service_root(body: bytes) -> RedfishReply:
    """A Redfish service root document; ``ValueError`` if it is not one. Pure."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("RedfishVersion"), str):
        raise ValueError("no RedfishVersion: not a Redfish service root")
    uuid, product = doc.get("UUID"), doc.get("Product")
    return RedfishReply(
        doc["RedfishVersion"][:32],
        uuid.lower()[:64] if isinstance(uuid, str) else None,
        product[:128] if isinstance(product, str) else None,
    )


async def _probe_redfish(
    targets: Sequence[BmcAddress], timeout: float, progress: Progress | None, total: int
) -> tuple[dict[BmcAddress, RedfishReply], int]:
    import aiohttp  # only when a Redfish range is swept

    found: dict[BmcAddress, RedfishReply] = {}
    malformed = 0
    limit = asyncio.Semaphore(REDFISH_PROBES_AT_ONCE)
    budget = aiohttp.ClientTimeout(total=timeout + REDFISH_PROBE_GRACE)
    connector = aiohttp.TCPConnector(ssl=False, limit=REDFISH_PROBES_AT_ONCE, force_close=True)
    done = 0

    async def probe(session: aiohttp.ClientSession, target: BmcAddress) -> None:
        nonlocal malformed, done
        async with limit:
            try:
                async with session.get(
                    f"{target.base_url}/redfish/v1/", allow_redirects=False
                ) as response:
                    body = await response.content.read(_MAX_ROOT_BYTES)
                    if response.status != 200:
                        raise ValueError(f"HTTP {response.status}")
                    found[target] = parse_service_root(body)
            except ValueError as exc:
                malformed += 1
                log.info("%s answers, but not as a Redfish service: %s", target, exc)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.debug("%s: no Redfish service (%s)", target, type(exc).__name__)
            finally:
                done += 1
                if progress:
                    progress(done, len(found), total)

    async with aiohttp.ClientSession(connector=connector, timeout=budget) as session:
        await asyncio.gather(*(probe(session, t) for t in targets))
    return found, malformed


async def _sweep_all(
    targets: Sequence[BmcAddress],
    timeout: float,
    rounds: int,
    window: int,
    progress: Progress | None,
) -> SweepResult:
    started = time.monotonic()
    ipmi = [t for t in targets if t.driver == IPMI]
    redfish = [t for t in targets if t.driver != IPMI]
    found: dict[BmcAddress, ProbeReply | RedfishReply] = {}
    probed = malformed = 0
    jobs = []
    if ipmi:
        jobs.append(_sweep(ipmi, timeout, rounds, window, progress if not redfish else None))
    if redfish:
        jobs.append(_probe_redfish(redfish, timeout, progress, len(targets)))
    for got in await asyncio.gather(*jobs):
        if isinstance(got, SweepResult):
            found.update(got.found)
            probed += got.probed
            malformed += got.malformed
        else:
            found.update(got[0])
            probed += len(redfish)
            malformed += got[1]
    ordered = sorted(found.items(), key=lambda kv: (kv[0].driver, kv[0].host, kv[0].port))
    return SweepResult(dict(ordered), probed, time.monotonic() - started, malformed)


def sweep(
    targets: Sequence[BmcAddress],
    *,
    timeout: float = 0.6,
    rounds: int = 3,
    window: int = 512,
    progress: Progress | None = None,
) -> SweepResult:
    """Probe every target (IPMI over UDP, Redfish over HTTP); the BMCs that answered."""
    if not targets:
        return SweepResult({}, 0, 0.0, 0)
    return asyncio.run(_sweep_all(list(targets), timeout, rounds, window, progress))

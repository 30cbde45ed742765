"""Sweep address ranges for BMCs: concurrent presence probes over one UDP socket.

Every address gets a probe; unanswered ones are probed again for a few rounds
(UDP and busy BMCs drop packets). Retries go out early, spaced within one
timeout, so a sweep costs about two timeouts however many addresses are dead.
Probes are paced in windows so a /16 does not flood the segment. Only responders
go on to the (expensive) authenticated stage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Sequence

from ..models import BmcAddress
from .probe import ProbeError, ProbeReply, build_probe, parse_reply

log = logging.getLogger(__name__)

Progress = Callable[[int, int, int], None]  # (probed, found, total)


@dataclasses.dataclass(frozen=True)
class SweepResult:
    found: dict[BmcAddress, ProbeReply]
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


def sweep(
    targets: Sequence[BmcAddress],
    *,
    timeout: float = 0.6,
    rounds: int = 3,
    window: int = 512,
    progress: Progress | None = None,
) -> SweepResult:
    """Probe every target; returns the BMCs that answered."""
    if not targets:
        return SweepResult({}, 0, 0.0, 0)
    return asyncio.run(_sweep(list(targets), timeout, rounds, window, progress))

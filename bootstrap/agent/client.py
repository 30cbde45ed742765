"""The enlist POST: JSON to the seed with the Bearer token, retried with backoff.

Connection errors, timeouts, 5xx and 429 are retried (a seed that restarts,
a network that comes up late) a bounded number of times with exponential
backoff and jitter; any other 4xx is final: the token is refused or the body
is wrong, and asking again will not change that. Redirects are not followed
and proxies are not used, so the token goes to the seed's URL and nowhere
else. Nothing here logs the token or puts it in an exception.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from .cmdline import Token

log = logging.getLogger(__name__)

#: the most of an answer the agent reads
MAX_ANSWER = 256 * 1024
USER_AGENT = "metalseed-agent/1"


class EnlistFailed(Exception):
    """The seed did not enlist us. ``final``: do not try again (a 4xx)."""

    def __init__(self, message: str, *, status: int | None = None, final: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.final = final


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 30x becomes an HTTPError: never carry the token elsewhere


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


Send = Callable[[urllib.request.Request, float], tuple[int, bytes]]


def send(request: urllib.request.Request, timeout: float) -> tuple[int, bytes]:
    """One HTTP exchange: (status, body). Raises OSError / HTTPException on transport trouble."""
    try:
        with _opener().open(request, timeout=timeout) as response:
            return response.status, response.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(MAX_ANSWER + 1)


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"][:300]
    return body[:200].decode("utf-8", "replace").strip() or "no explanation"


def post_json(
    url: str,
    token: Token,
    body: Mapping[str, Any],
    *,
    attempts: int = 6,
    backoff: float = 1.0,
    max_delay: float = 30.0,
    timeout: float = 30.0,
    send: Send = send,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> dict[str, Any]:
    """POST ``body``; the answer's JSON object on 200, else ``EnlistFailed``."""
    data = json.dumps(body, separators=(",", ":")).encode()
    last = "not tried"
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
                "Authorization": f"Bearer {token.reveal()}",
            },
        )
        try:
            status, answer = send(request, timeout)
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            if isinstance(exc, socket.timeout | TimeoutError):
                reason = f"no answer in {timeout:.0f} s"
            last = f"cannot reach the seed at {url}: {reason}"
        else:
            if status == 200:
                return _answer(answer)
            message = f"the seed answered {status}: {_error_text(answer)}"
            if 300 <= status < 500 and status != 429:
                raise EnlistFailed(message, status=status, final=True)
            last = message
        if attempt == attempts:
            break
        delay = min(max_delay, backoff * 2 ** (attempt - 1)) * (0.5 + 0.5 * jitter())
        log.warning(
            "enlist attempt %d of %d failed: %s; again in %.1f s", attempt, attempts, last, delay
        )
        sleep(delay)
    raise EnlistFailed(f"gave up after {attempts} attempts: {last}")


def _answer(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_ANSWER:
        raise EnlistFailed("the seed's answer is too large", status=200, final=True)
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise EnlistFailed("the seed's answer is not a JSON object", status=200, final=True)
    return data

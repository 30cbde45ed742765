"""The agent's enlist POST: retries with backoff, final 4xx, no redirects, no token in logs."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import urllib.error
from collections.abc import Iterator

import pytest

from bootstrap.agent.client import EnlistFailed, post_json
from bootstrap.agent.cmdline import Token

TOKEN = Token("tok3n_Example-0123456789abcdefghijklmnopqrstu")
URL = "http://10.20.0.1/api/v1/enlist"
BODY = {"mac": "52:54:00:12:34:56", "node": None, "boot_id": "x", "inventory": {}}


class FakeSeed:
    """Plays back answers: an int status (with a JSON body) or an exception to raise."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests = []

    def __call__(self, request, timeout):
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        status, body = answer if isinstance(answer, tuple) else (answer, {"error": "nope"})
        return status, json.dumps(body).encode()


def post(seed: FakeSeed, **kw):
    sleeps: list[float] = []
    kw.setdefault("attempts", 5)
    result = post_json(
        URL, TOKEN, BODY, send=seed, sleep=sleeps.append, jitter=lambda: 1.0, backoff=1.0, **kw
    )
    return result, sleeps


def test_the_request_is_json_with_the_bearer_token():
    seed = FakeSeed((200, {"node": "node-1"}))
    result, sleeps = post(seed)
    assert result == {"node": "node-1"} and sleeps == []
    [request] = seed.requests
    assert request.get_method() == "POST" and request.full_url == URL
    assert request.get_header("Authorization") == f"Bearer {TOKEN.reveal()}"
    assert request.get_header("Content-type") == "application/json"
    assert json.loads(request.data) == BODY


def test_connection_errors_and_5xx_are_retried_with_backoff(caplog):
    caplog.set_level(logging.DEBUG)
    refused = urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    seed = FakeSeed(refused, TimeoutError("timed out"), 503, 429, (200, {"node": "n"}))
    result, sleeps = post(seed, max_delay=4.0)
    assert result == {"node": "n"}
    assert sleeps == [1.0, 2.0, 4.0, 4.0]  # doubling, capped
    assert "Connection refused" in caplog.text and "answered 503" in caplog.text
    assert TOKEN.reveal() not in caplog.text


def test_jitter_shortens_the_wait_by_at_most_half():
    seed = FakeSeed(500, (200, {}))
    sleeps: list[float] = []
    post_json(URL, TOKEN, BODY, send=seed, sleep=sleeps.append, jitter=lambda: 0.0, backoff=2)
    assert sleeps == [1.0]


def test_giving_up_after_the_last_attempt_says_why():
    seed = FakeSeed(*[urllib.error.URLError("no route to host")] * 3)
    with pytest.raises(EnlistFailed) as info:
        post(seed, attempts=3)
    assert not info.value.final and "after 3 attempts" in str(info.value)
    assert "no route to host" in str(info.value) and TOKEN.reveal() not in str(info.value)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 302])
def test_other_4xx_and_redirects_are_final(status):
    seed = FakeSeed((status, {"error": "the token has expired"}), (200, {}))
    with pytest.raises(EnlistFailed) as info:
        post(seed)
    assert info.value.final and info.value.status == status
    assert "the token has expired" in str(info.value)
    assert len(seed.requests) == 1


@pytest.mark.parametrize("body", [b"not json", b"[1]"])
def test_an_answer_that_is_not_a_json_object_is_an_error(body):
    with pytest.raises(EnlistFailed, match="not a JSON object"):
        post_json(URL, TOKEN, BODY, send=lambda r, t: (200, body))


# -- against a real HTTP server on loopback ------------------------------------------------


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.seen.append((self.path, self.headers.get("Authorization"), self.rfile.read(length)))
        if self.path == "/redirect":
            self.send_response(307)
            self.send_header("Location", "/elsewhere")
            self.end_headers()
            return
        payload = json.dumps({"node": "node-1"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server() -> Iterator[str]:
    Recorder.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_real_exchange(server):
    assert post_json(f"{server}/api/v1/enlist", TOKEN, BODY) == {"node": "node-1"}
    [(path, auth, body)] = Recorder.seen
    assert path == "/api/v1/enlist" and auth == f"Bearer {TOKEN.reveal()}"
    assert json.loads(body) == BODY


def test_redirects_are_not_followed(server):
    with pytest.raises(EnlistFailed) as info:
        post_json(f"{server}/redirect", TOKEN, BODY)
    assert info.value.status == 307 and info.value.final
    assert [path for path, _, _ in Recorder.seen] == ["/redirect"]  # nothing went elsewhere


def test_proxies_in_the_environment_are_ignored(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    assert post_json(f"{server}/api/v1/enlist", TOKEN, BODY, attempts=1) == {"node": "node-1"}

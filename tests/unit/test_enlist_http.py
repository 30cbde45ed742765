"""The enlist handler inside the boot app, through aiohttp's test client on loopback."""

from __future__ import annotations

import asyncio
import json
import uuid

from aiohttp.test_utils import TestClient, TestServer

from bootstrap.boot.enlist import EnlistOutcome
from bootstrap.boot.http import make_app
from bootstrap.config import BootConfig
from bootstrap.errors import StoreError
from bootstrap.image.catalogue import Catalogue
from bootstrap.states import NodeState

MAC = "52:54:00:12:34:56"
BODY = {
    "mac": MAC,
    "node": None,
    "boot_id": str(uuid.uuid4()),
    "inventory": {"cpus": {"count": 1}, "memory": {"bytes": 1}},
}


class Backend:
    """Stands in for StoreBackend: answers what it is told, records what it is asked."""

    def __init__(self, outcome=None, error=None) -> None:
        self.outcome = outcome or EnlistOutcome(
            200, node="node-1", state=NodeState.ENLISTED, ssh_authorized_keys=("ssh-ed25519 A",)
        )
        self.error = error
        self.calls: list = []

    def enlist(self, token, request, peer):
        self.calls.append(("enlist", token, request.mac, peer))
        if self.error:
            raise self.error
        return self.outcome

    def refuse_enlist(self, mac, reason, peer):
        self.calls.append(("refuse", mac, reason))


def exchange(tmp_path, backend, *, data, headers=None, config=None, **app_kw):
    async def go():
        app = make_app(
            backend,
            Catalogue(tmp_path / "images"),
            config or BootConfig(),
            seed_url="http://10.20.0.1:8080",
            **app_kw,
        )
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.post("/api/v1/enlist", data=data, headers=headers or {})
            return response.status, dict(response.headers), await response.json()

    return asyncio.run(go())


AUTH = {"Authorization": "Bearer tok3n", "Content-Type": "application/json"}


def test_the_answer_carries_what_the_node_needs(tmp_path):
    backend = Backend()
    status, headers, body = exchange(
        tmp_path, backend, data=json.dumps(BODY), headers=AUTH, provisioning_cidr="10.20.0.0/24"
    )
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert body == {
        "node": "node-1",
        "state": "enlisted",
        "ssh_authorized_keys": ["ssh-ed25519 A"],
        "time_servers": ["10.20.0.1"],  # the seed itself by default
        "provisioning_cidr": "10.20.0.0/24",
        "hostname": "node-1",
    }
    assert backend.calls == [("enlist", "tok3n", MAC, "127.0.0.1")]


def test_configured_time_servers_and_no_interface(tmp_path):
    config = BootConfig(time_servers=("ntp1.example", "10.0.0.5"))
    _, _, body = exchange(tmp_path, Backend(), data=json.dumps(BODY), headers=AUTH, config=config)
    assert body["time_servers"] == ["ntp1.example", "10.0.0.5"]
    assert body["provisioning_cidr"] is None  # no interface to read it from


def test_no_token_is_a_401_before_the_body_is_judged(tmp_path):
    backend = Backend()
    status, headers, body = exchange(tmp_path, backend, data=b"{not json")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = exchange(tmp_path, backend, data=json.dumps(BODY))
    assert status == 401
    assert backend.calls == [("refuse", None, "no token"), ("refuse", MAC, "no token")]


def test_refusals_pass_through(tmp_path):
    for code in (401, 403):
        backend = Backend(EnlistOutcome(code, "the token has expired"))
        status, _, body = exchange(tmp_path, backend, data=json.dumps(BODY), headers=AUTH)
        assert (status, body) == (code, {"error": "the token has expired"})


def test_a_malformed_body_never_reaches_the_backend(tmp_path):
    backend = Backend()
    status, _, body = exchange(tmp_path, backend, data=json.dumps({**BODY, "mac": 1}), headers=AUTH)
    assert status == 400 and "mac" in body["error"] and backend.calls == []


def test_the_size_limit_holds_without_a_content_length(tmp_path):
    async def chunks():
        for _ in range(10):
            yield b" " * 1000

    config = BootConfig(enlist_max_body=4096)
    status, _, body = exchange(tmp_path, Backend(), data=chunks(), headers=AUTH, config=config)
    assert status == 400 and "larger than 4096" in body["error"]


def test_a_seed_that_cannot_answer_says_503(tmp_path):
    backend = Backend(error=StoreError("disk full"))
    status, _, body = exchange(tmp_path, backend, data=json.dumps(BODY), headers=AUTH)
    assert status == 503 and "disk full" not in body["error"]

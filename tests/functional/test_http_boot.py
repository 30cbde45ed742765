"""HTTP boot against curl: iPXE scripts per MAC, image files with Range/ETag, the call-back.

The server (``make_app`` + ``HttpService``) runs in a thread with its own
event loop on a loopback address of its own; nodes live in the real SQLite
store behind ``StoreBackend``; images are small files added with
``Catalogue.add``. Every request is made by curl, as a machine or an
operator would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.boot.backend import StoreBackend
from bootstrap.boot.http import (
    CALLBACK_MAX,
    HttpService,
    RangeNotSatisfiable,
    make_app,
    parse_range,
)
from bootstrap.config import BootConfig
from bootstrap.image.catalogue import Catalogue
from bootstrap.models import BmcAddress
from bootstrap.secretbox import SecretBox
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore

GUID = "6f1c3e2a-58d4-4b7e-9a15-2c7d0e8b4f93"
KNOWN_MAC, UNKNOWN_MAC, RETIRED_MAC = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"
KERNEL = os.urandom(300_000)

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(not shutil.which("curl"), reason="needs curl"),
]


class Seed:
    """The HTTP boot server in a thread; ``url`` is where curl reaches it."""

    def __init__(self, tmp_path: Path, address: str, *, with_image: bool = True) -> None:
        self.store = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"))
        self.backend = StoreBackend(self.store)
        self.catalogue = Catalogue(tmp_path / "images")
        self.address = address
        self.macs: dict[str, str] = {}
        if with_image:
            src = tmp_path / "src"
            src.mkdir()
            (src / "vmlinuz").write_bytes(KERNEL)
            (src / "initrd").write_bytes(os.urandom(100_000))
            (src / "rootfs.squashfs").write_bytes(os.urandom(64_000))
            files = {name: src / name for name in ("vmlinuz", "initrd", "rootfs.squashfs")}
            self.image = self.catalogue.add(
                "test-1", files, cmdline="console=ttyS0", make_current=True
            )
        self.node = self.store.create_node(
            guid=GUID, bmc=BmcAddress("127.0.0.9"), state=NodeState.ENROLLED
        ).id
        retired = self.store.create_node(
            guid=None, bmc=BmcAddress("127.0.0.10"), state=NodeState.DISCOVERED
        )
        self.store.transition(retired.id, NodeState.RETIRED, "test")
        self.store.bind_mac(RETIRED_MAC, retired.id)
        self.retired = retired.id
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = ""
        self.service: HttpService | None = None

    def start(self) -> None:
        with socket.socket() as probe:  # a free port on our own address, for the seed URL
            probe.bind((self.address, 0))
            port = probe.getsockname()[1]
        self.url = f"http://{self.address}:{port}"
        app = make_app(
            self.backend,
            self.catalogue,
            BootConfig(kernel_args="quiet"),
            seed_url=self.url,
            mac_for=self.macs.get,
            retry_seconds=5,
        )
        self.service = HttpService(app)
        self._run(self.service.start(self.address, port))

    def stop(self) -> None:
        if self.service is not None:
            self._run(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.store.close()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def steps(self, node: str, kind: str) -> list:
        """``kind`` steps of a node (the first of an enrolled node is its move to booting)."""
        return [
            e
            for e in self.store.events(node)
            if e.kind == kind or (e.kind == "state" and f": {kind}: " in e.message)
        ]


@pytest.fixture
def seed(tmp_path: Path, addr_block: str) -> Iterator[Seed]:
    seed = Seed(tmp_path, f"{addr_block}.1")
    seed.start()
    yield seed
    seed.stop()


def curl(*args: str) -> subprocess.CompletedProcess:
    """curl, printing headers then body; ``-w`` adds the status on its own last line."""
    return subprocess.run(
        ["curl", "-sS", "-D", "-", *args], capture_output=True, timeout=30, check=False
    )


def status_headers_body(proc: subprocess.CompletedProcess) -> tuple[int, dict[str, str], bytes]:
    head, _, body = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def get(url: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    return status_headers_body(curl(*args, url))


def hyphen(mac: str) -> str:
    return mac.replace(":", "-")


# -- iPXE scripts ---------------------------------------------------------------------------


def test_an_unknown_machine_gets_the_enlist_script(seed):
    status, headers, body = get(f"{seed.url}/boot/{hyphen(UNKNOWN_MAC)}.ipxe")
    script = body.decode()
    assert status == 200 and headers["cache-control"] == "no-store"
    assert script.startswith("#!ipxe\n")
    assert "metalseed.mode=enlist" in script and "metalseed.node=" not in script
    token = script.split("metalseed.token=")[1].split()[0]  # a discovery token (issue 4)
    assert seed.backend.check_token(token) is None  # not a join token
    assert f"{seed.url}/images/test-1/vmlinuz?mac={hyphen(UNKNOWN_MAC)}" in script


def test_a_known_node_gets_its_script_with_a_live_token(seed, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"{seed.url}/boot/{hyphen(KNOWN_MAC).upper()}.ipxe?uuid={GUID}"
    status, _, body = get(url)
    script = body.decode()
    assert status == 200 and f"metalseed.node={seed.node}" in script
    token = script.split("metalseed.token=")[1].split()[0]
    assert seed.backend.check_token(token, KNOWN_MAC) == seed.node
    assert f"metalseed.rootfs={seed.url}/images/test-1/rootfs.squashfs" in script
    assert f"metalseed.rootfs_sha256={seed.image.files['rootfs.squashfs'].sha256}" in script
    assert f"BOOTIF=01-{hyphen(KNOWN_MAC)}" in script
    [step] = seed.steps(seed.node, "http.script")
    assert step.data["profile"] == "provision" and step.data["uuid"] == GUID
    assert seed.store.get_node(seed.node).state is NodeState.BOOTING
    assert token not in caplog.text
    assert all(token not in json.dumps(e.to_json()) for e in seed.store.events(seed.node))


def test_the_mac_stays_bound_and_colons_work_too(seed):
    get(f"{seed.url}/boot/{hyphen(KNOWN_MAC)}.ipxe?uuid={GUID}")
    _, _, body = get(f"{seed.url}/boot/{KNOWN_MAC}.ipxe")  # no uuid this time
    assert f"metalseed.node={seed.node}" in body.decode()


def test_a_retired_node_is_told_to_stop(seed):
    status, _, body = get(f"{seed.url}/boot/{hyphen(RETIRED_MAC)}.ipxe")
    assert status == 200 and "is retired" in body.decode() and "kernel" not in body.decode()
    assert seed.steps(seed.retired, "http.script")[0].data["profile"] == "retired"


def test_without_an_image_the_machine_waits_and_retries(tmp_path, addr_block, caplog):
    seed = Seed(tmp_path, f"{addr_block}.2", with_image=False)
    seed.start()
    try:
        _, _, body = get(f"{seed.url}/boot/{hyphen(KNOWN_MAC)}.ipxe?uuid={GUID}")
    finally:
        seed.stop()
    script = body.decode()
    assert "no current boot image" in script and "sleep 5\n" in script
    assert f"chain --replace --autofree {seed.url}/boot/{hyphen(KNOWN_MAC)}.ipxe" in script
    assert "metalseed.token" not in script
    assert "no current boot image" in caplog.text


def test_the_fixed_entry_script_chains_to_the_per_mac_one(seed):
    _, _, body = get(f"{seed.url}/boot.ipxe")
    assert f"{seed.url}/boot/${{netX/mac:hexhyp}}.ipxe?uuid=${{uuid}}" in body.decode()


@pytest.mark.parametrize("name", ["525400000001", "not-a-mac", "52-54-00-00-00-0g"])
def test_a_bad_mac_is_a_bad_request(seed, name):
    assert get(f"{seed.url}/boot/{name}.ipxe")[0] == 400


def test_a_bad_uuid_is_ignored(seed):
    status, _, body = get(f"{seed.url}/boot/{hyphen(KNOWN_MAC)}.ipxe?uuid=xyz")
    assert status == 200 and "metalseed.mode=enlist" in body.decode()


# -- image files --------------------------------------------------------------------------


def file_url(seed: Seed, name: str = "vmlinuz", image: str = "test-1") -> str:
    return f"{seed.url}/images/{image}/{name}"


def test_head_tells_size_checksum_and_etag(seed):
    sha = hashlib.sha256(KERNEL).hexdigest()
    status, headers, body = get(file_url(seed), "-I")
    assert status == 200 and body.strip() == b""  # no body, only the header block
    assert headers["content-length"] == str(len(KERNEL))
    assert headers["etag"] == f'"{sha}"'
    assert headers["x-checksum-sha256"] == sha
    assert headers["repr-digest"] == f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:"
    assert headers["accept-ranges"] == "bytes"


def test_a_full_download_matches_the_manifest(seed, tmp_path):
    for image in ("test-1", "current"):
        out = tmp_path / f"{image}.bin"
        subprocess.run(["curl", "-sS", "-o", str(out), file_url(seed, image=image)], check=True)
        digest = subprocess.run(["sha256sum", str(out)], capture_output=True, text=True)
        assert digest.stdout.split()[0] == seed.image.files["vmlinuz"].sha256


def test_ranges(seed):
    status, headers, body = get(file_url(seed), "-r", "0-99")
    assert (status, body) == (206, KERNEL[:100])
    assert headers["content-range"] == f"bytes 0-99/{len(KERNEL)}"
    status, headers, body = get(file_url(seed), "-r", "100-")
    assert (status, body) == (206, KERNEL[100:])
    status, _, body = get(file_url(seed), "-r", "-100")
    assert (status, body) == (206, KERNEL[-100:])
    status, headers, _ = get(file_url(seed), "-r", f"{len(KERNEL)}-")
    assert status == 416 and headers["content-range"] == f"bytes */{len(KERNEL)}"
    status, _, body = get(file_url(seed), "-H", "Range: bytes=5-1")  # invalid: ignored
    assert (status, body) == (200, KERNEL)
    status, _, body = get(file_url(seed), "-r", "0-1,5-6")  # multipart: not done, whole file
    assert (status, body) == (200, KERNEL)


def test_conditional_requests(seed):
    etag = f'"{seed.image.files["vmlinuz"].sha256}"'
    status, headers, body = get(file_url(seed), "-H", f"If-None-Match: {etag}")
    assert (status, body, headers["etag"]) == (304, b"", etag)
    assert get(file_url(seed), "-H", 'If-None-Match: "other"')[0] == 200
    assert get(file_url(seed), "-H", 'If-Match: "other"')[0] == 412
    status, _, body = get(file_url(seed), "-r", "0-9", "-H", f"If-Range: {etag}")
    assert (status, body) == (206, KERNEL[:10])
    status, _, body = get(file_url(seed), "-r", "0-9", "-H", 'If-Range: "stale"')
    assert (status, body) == (200, KERNEL)


def test_a_download_is_a_step_of_the_node(seed):
    get(f"{seed.url}/boot/{hyphen(KNOWN_MAC)}.ipxe?uuid={GUID}")
    get(file_url(seed) + f"?mac={hyphen(KNOWN_MAC)}")
    get(file_url(seed, "initrd"), "-r", "100-")  # a resumed download is not a new step
    seed.macs["127.0.0.1"] = KNOWN_MAC  # no ?mac=: the client address names it
    get(file_url(seed, "rootfs.squashfs"))
    steps = seed.steps(seed.node, "http.file")
    assert [s.data["file"] for s in steps] == ["vmlinuz", "rootfs.squashfs"]


@pytest.mark.parametrize(
    "path",
    [
        "/images/../../etc/passwd",
        "/images/test-1/../../../etc/passwd",
        "/images/%2e%2e/%2e%2e/etc/passwd",
        "/images/test-1/..%2f..%2fstate.db",
        "/images/test-1/manifest.json",
        "/images/test-1/",
        "/images/",
        "/images/..%5c..%5cetc%5cpasswd/x",
        "/images/test-1/vmlinuz%00",
    ],
)
def test_only_manifest_files_are_served(seed, path):
    status, _, body = get(seed.url + path, "--path-as-is")
    assert status in (400, 404), (path, status)
    assert b"root:" not in body


# -- the call-back -------------------------------------------------------------------------


def callback(seed: Seed, body: bytes | dict, *headers: str) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    args = ["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", "@-"]
    for header in headers:
        args += ["-H", header]
    proc = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args, f"{seed.url}/api/v1/callback"],
        input=data,
        capture_output=True,
        timeout=30,
    )
    reply, _, code = proc.stdout.rpartition(b"\n")
    return int(code), json.loads(reply) if reply else {}


def minted(seed: Seed) -> str:
    _, _, body = get(f"{seed.url}/boot/{hyphen(KNOWN_MAC)}.ipxe?uuid={GUID}")
    return body.decode().split("metalseed.token=")[1].split()[0]


def test_a_callback_with_the_token_is_recorded(seed, caplog):
    caplog.set_level(logging.DEBUG)
    token = minted(seed)
    body = {
        "node": seed.node,
        "mac": KNOWN_MAC,
        "uptime": 3.1,
        "kernel": "6.1",
        "ip": "10.0.0.5",
        "token": token,
        "nested": {"a": 1},
        "note": "x" * 5000,
    }
    code, reply = callback(seed, body, f"Authorization: Bearer {token}")
    assert (code, reply) == (200, {"status": "ok", "node": seed.node})
    [event] = seed.steps(seed.node, "boot.callback")
    assert event.data["uptime"] == 3.1 and event.data["kernel"] == "6.1"
    assert "token" not in event.data and event.data["nested"] == "<dict>"
    assert len(event.data["note"]) <= 200
    assert token not in caplog.text


def test_callbacks_without_a_valid_token_are_refused(seed):
    token = minted(seed)
    body = {"node": seed.node, "mac": KNOWN_MAC}
    assert callback(seed, body)[0] == 401
    assert callback(seed, body, "Authorization: Bearer wrong")[0] == 401
    assert callback(seed, body, f"Authorization: Basic {token}")[0] == 401
    other = {"node": seed.node, "mac": UNKNOWN_MAC}  # a token is bound to its MAC
    assert callback(seed, other, f"Authorization: Bearer {token}")[0] == 401
    rejected = seed.steps(seed.node, "boot.callback_rejected")
    assert len(rejected) == 3 and all("token" not in e.data for e in rejected)
    assert not seed.steps(seed.node, "boot.callback")


def test_malformed_or_oversized_callbacks_are_bad_requests(seed):
    auth = f"Authorization: Bearer {minted(seed)}"
    assert callback(seed, b"{not json", auth)[0] == 400
    assert callback(seed, b"[1, 2]", auth)[0] == 400
    assert callback(seed, {"node": seed.node}, auth)[0] == 400  # no MAC
    big = {"mac": KNOWN_MAC, "pad": "x" * CALLBACK_MAX}
    code, reply = callback(seed, big, auth)
    assert code == 400 and "larger" in reply["error"]
    assert callback(seed, big, auth, "Transfer-Encoding: chunked")[0] == 400  # no length given
    assert callback(seed, {"node": "node-other", "mac": KNOWN_MAC}, auth)[0] == 403
    assert callback(seed, {"node": seed.node, "mac": KNOWN_MAC}, auth)[0] == 200


# -- bad input keeps the server serving -----------------------------------------------------


def test_garbage_and_huge_headers_do_not_stop_the_server(seed, caplog):
    caplog.set_level(logging.INFO)
    status, _, _ = get(file_url(seed), "-H", "X-Big: " + "a" * 100_000)
    assert status in (400, 431)
    host, port = seed.url.removeprefix("http://").split(":")
    for junk in (
        b"\x00\xff" * 500 + b"\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET /images/test-1/vmlinuz HTTP/1.1\r\nRange: bytes=zz\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(junk)
            sock.recv(4096)
    status, _, body = get(file_url(seed))
    assert (status, body) == (200, KERNEL)
    assert "bad HTTP request from" in caplog.text  # one line each, not an error with traceback
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_parallel_downloads(seed, tmp_path):
    procs = [
        subprocess.Popen(["curl", "-sS", "-o", str(tmp_path / f"k{i}"), file_url(seed)])
        for i in range(20)
    ]
    assert all(p.wait(30) == 0 for p in procs)
    assert all((tmp_path / f"k{i}").read_bytes() == KERNEL for i in range(20))


@pytest.mark.parametrize(
    "header, size, expected",
    [
        (None, 10, None),
        ("bytes=0-4", 10, (0, 5)),
        ("bytes=5-", 10, (5, 10)),
        ("bytes=-3", 10, (7, 10)),
        ("bytes=-30", 10, (0, 10)),
        ("bytes=8-100", 10, (8, 10)),
        ("bytes=4-2", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("items=0-4", 10, None),
        ("bytes=10-", 10, "416"),
        ("bytes=-0", 10, "416"),
        ("bytes=0-", 0, "416"),
    ],
)
def test_parse_range(header, size, expected):
    if expected == "416":
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, size)
    else:
        assert parse_range(header, size) == expected

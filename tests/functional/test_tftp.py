"""TFTP boot against clients nobody here wrote: tftp-hpa's ``tftp`` and curl.

The server runs in-process (``TftpService`` in its thread) on a loopback
address of its own, with the real SQLite store behind the backend, so the
events each transfer leaves on a node are checked too. Raw sockets play the
misbehaving clients: garbage, a client that stalls, one that vanishes.
"""

from __future__ import annotations

import logging
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.boot.backend import StoreBackend
from bootstrap.boot.tftp import MAX_BLKSIZE, TftpError, TftpService
from bootstrap.models import BmcAddress
from bootstrap.secretbox import SecretBox
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore

IPXE = Path("/usr/lib/ipxe")
MAC = "52:54:00:aa:bb:01"

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(
        not (shutil.which("tftp") and shutil.which("curl") and (IPXE / "undionly.kpxe").exists()),
        reason="needs tftp-hpa, curl and Debian's ipxe package",
    ),
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"))
    yield store
    store.close()


@pytest.fixture
def node(store: SqliteStore) -> str:
    node = store.create_node(guid=None, bmc=BmcAddress("127.0.0.9"), state=NodeState.ENROLLED)
    store.bind_mac(MAC, node.id)
    return node.id


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A boot directory with the shapes a real one has, and some it must not serve."""
    root = tmp_path / "tftp"
    root.mkdir()
    shutil.copyfile(IPXE / "undionly.kpxe", root / "undionly.kpxe")
    (root / "ipxe.efi").symlink_to(IPXE / "ipxe.efi")  # a boot file linked out, as Debian does
    (root / "alias.kpxe").symlink_to("undionly.kpxe")  # a link that stays inside
    (root / "passwd").symlink_to("/etc/passwd")  # a link that escapes
    (root / "sub").mkdir()
    (root / "sub" / "inner.bin").write_bytes(b"not served")
    (root / ".hidden").write_bytes(b"not served")
    return root


@pytest.fixture
def server(root: Path, store: SqliteStore, node: str, addr_block: str) -> Iterator[TftpService]:
    seen: list[str] = []

    def mac_for(ip: str) -> str:
        seen.append(ip)
        return MAC

    service = TftpService(
        root, StoreBackend(store), address=f"{addr_block}.1", port=0, mac_for=mac_for
    )
    service.start()
    service.seen_ips = seen  # type: ignore[attr-defined]
    yield service
    service.stop()


def tftp_argv(service: TftpService, command: str, mode: str = "binary") -> list[str]:
    return ["tftp", "-m", mode, service.address, str(service.port), "-c", *command.split()]


def tftp(service: TftpService, command: str, mode: str = "binary") -> str:
    argv = tftp_argv(service, command, mode)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return proc.stdout + proc.stderr  # tftp-hpa exits 0 even on errors


def events(store: SqliteStore, node: str, kind: str, count: int = 1) -> list:
    """The node's ``kind`` steps, waiting for the recorder thread to write them.

    The first boot step of an enrolled node is recorded as its move to
    booting: a ``state`` event whose message starts with the step's kind.
    """
    deadline = time.monotonic() + 5
    while True:
        found = [
            e
            for e in store.events(node)
            if e.kind == kind or (e.kind == "state" and f": {kind}: " in e.message)
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


# -- fetching ----------------------------------------------------------------------------


def test_tftp_hpa_fetches_undionly_byte_identical(server, store, node, tmp_path):
    out = tmp_path / "undionly.kpxe"
    assert tftp(server, f"get undionly.kpxe {out}") == ""
    assert out.read_bytes() == (IPXE / "undionly.kpxe").read_bytes()
    [sent] = events(store, node, "tftp.sent")
    assert sent.data["bytes"] == out.stat().st_size and sent.data["file"] == "undionly.kpxe"
    [start] = events(store, node, "tftp.start")
    assert start.message.startswith("enrolled -> booting: tftp.start: TFTP undionly.kpxe")
    assert store.get_node(node).state is NodeState.BOOTING  # the first boot step


def test_curl_fetches_ipxe_efi_with_the_blksize_ipxe_asks_for(server, store, node, tmp_path):
    out = tmp_path / "ipxe.efi"
    url = f"tftp://{server.address}:{server.port}/ipxe.efi"
    subprocess.run(["curl", "-sS", "--tftp-blksize", "1432", url, "-o", str(out)], check=True)
    assert out.read_bytes() == (IPXE / "ipxe.efi").read_bytes()
    [start] = events(store, node, "tftp.start")
    assert start.data["blksize"] == 1432


def test_curl_fetches_through_a_link_that_stays_inside(server, tmp_path):
    out = tmp_path / "alias"
    url = f"tftp://{server.address}:{server.port}/alias.kpxe"
    subprocess.run(["curl", "-sS", url, "-o", str(out)], check=True)
    assert out.read_bytes() == (IPXE / "undionly.kpxe").read_bytes()


def test_the_default_ipxe_directory_is_served_as_packaged(store, node, addr_block, tmp_path):
    service = TftpService(IPXE, StoreBackend(store), address=f"{addr_block}.2", port=0)
    service.start()
    try:
        for name in ("undionly.kpxe", "ipxe.efi", "snponly.efi"):
            out = tmp_path / name
            assert tftp(service, f"get {name} {out}") == ""
            assert out.read_bytes() == (IPXE / name).read_bytes()
    finally:
        service.stop()


def test_twenty_clients_at_once_all_get_identical_files(server, tmp_path):
    procs = [
        subprocess.Popen(tftp_argv(server, f"get undionly.kpxe {tmp_path / f'u{i}'}"))
        for i in range(20)
    ]
    for proc in procs:
        proc.wait(30)
    want = (IPXE / "undionly.kpxe").read_bytes()
    assert all((tmp_path / f"u{i}").read_bytes() == want for i in range(20))


# -- options, on the wire ------------------------------------------------------------------


def rrq(name: str, **options: str) -> bytes:
    fields = [name, "octet"] + [x for kv in options.items() for x in kv]
    return struct.pack("!H", 1) + b"".join(f.encode() + b"\0" for f in fields)


def oack_options(packet: bytes) -> dict[str, str]:
    assert packet[:2] == b"\x00\x06", packet[:40]
    fields = packet[2:-1].decode().split("\0")
    return dict(zip(fields[::2], fields[1::2], strict=True))


@pytest.fixture
def client() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    yield sock
    sock.close()


def test_tsize_and_blksize_are_negotiated(server, client):
    client.sendto(rrq("undionly.kpxe", tsize="0", blksize="1432"), (server.address, server.port))
    packet, _ = client.recvfrom(65536)
    size = (IPXE / "undionly.kpxe").stat().st_size
    assert oack_options(packet) == {"tsize": str(size), "blksize": "1432"}


def test_blksize_is_clamped_to_what_fits_in_a_datagram(server, client):
    client.sendto(rrq("undionly.kpxe", blksize="70000"), (server.address, server.port))
    packet, _ = client.recvfrom(65536)
    assert oack_options(packet) == {"blksize": str(MAX_BLKSIZE)}


def test_a_lost_ack_gets_the_block_sent_again(server, client):
    client.sendto(rrq("undionly.kpxe"), (server.address, server.port))
    first, peer = client.recvfrom(65536)
    assert first[:4] == b"\x00\x03\x00\x01" and peer[0] == server.address
    again, _ = client.recvfrom(65536)  # no ACK: the server retransmits after ~1 s
    assert again == first
    client.sendto(b"\x00\x04\x00\x01", peer)
    second, _ = client.recvfrom(65536)
    assert second[:4] == b"\x00\x03\x00\x02"


def test_a_client_that_vanishes_ends_its_transfer(server, store, node, client):
    client.sendto(rrq("undionly.kpxe"), (server.address, server.port))
    client.recvfrom(65536)
    client.close()  # the retransmission meets ICMP port unreachable
    [error] = events(store, node, "tftp.error")
    assert "failed" in error.message or "timed out" in error.message


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/inner.bin", ".hidden"])
def test_paths_out_of_the_directory_are_refused(server, tmp_path, caplog, name):
    caplog.set_level(logging.WARNING, "bootstrap.boot.tftp")
    out = tftp(server, f"get {name} {tmp_path / 'out'}")
    assert "Error code 2" in out
    assert f"refused RRQ {name!r}" in caplog.text


def test_a_link_escaping_the_directory_is_refused(server, tmp_path, store, node):
    assert "Error code 2: link out of the boot directory" in tftp(
        server, f"get passwd {tmp_path / 'out'}"
    )
    [error] = events(store, node, "tftp.error")
    assert error.data["file"] == "passwd"


def test_unknown_files_and_directories_are_not_found(server, tmp_path):
    assert "Error code 1" in tftp(server, f"get nothing.efi {tmp_path / 'a'}")
    assert "Error code 1" in tftp(server, f"get sub {tmp_path / 'b'}")


def test_curl_sees_the_refusal_too(server, tmp_path):
    url = f"tftp://{server.address}:{server.port}/passwd"
    proc = subprocess.run(["curl", "-sS", url, "-o", str(tmp_path / "x")], capture_output=True)
    assert proc.returncode != 0


def test_writes_are_refused_and_nothing_is_written(server, root, tmp_path):
    local = tmp_path / "upload.bin"
    local.write_bytes(b"x" * 1000)
    out = tftp(server, f"put {local} upload.bin")
    assert "Error code 2: read-only server" in out
    assert not (root / "upload.bin").exists()


def test_netascii_is_refused(server, tmp_path):
    assert "Error code 0: only octet" in tftp(
        server, f"get undionly.kpxe {tmp_path / 'x'}", mode="ascii"
    )


def test_garbage_is_dropped_and_the_server_keeps_serving(server, client, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "bootstrap.boot.tftp")
    garbage = [
        b"",
        b"\x00",
        b"\x00\x09hello\x00octet\x00",  # opcode 9
        b"\x00\x04\x00\x01",  # an ACK to the server port
        b"\x00\x03\x00\x01data",  # a DATA to the server port
        b"\x00\x05\x00\x01oops\x00",  # an ERROR to the server port
        b"\x00\x01\xff\xfe\x00octet\x00",  # non-ASCII name
        b"\x00\x01undionly.kpxe\x00octet",  # not NUL-terminated
        b"\x00\x01undionly.kpxe\x00octet\x00blksize\x00",  # odd option fields
        b"\xff" * 1400,
    ]
    for datagram in garbage:
        client.sendto(datagram, (server.address, server.port))
    client.sendto(rrq("undionly.kpxe", blksize="x"), (server.address, server.port))
    first, _ = client.recvfrom(65536)  # a bad option value is ignored, not fatal
    assert first[:4] == b"\x00\x03\x00\x01" and len(first) == 4 + 512
    assert caplog.text.count("dropped a bad datagram") == len(garbage)
    out = tmp_path / "after"
    assert tftp(server, f"get undionly.kpxe {out}") == ""
    assert out.read_bytes() == (IPXE / "undionly.kpxe").read_bytes()


# -- the service -----------------------------------------------------------------------------


def test_stop_is_prompt_and_frees_the_port(root, store, addr_block):
    service = TftpService(root, StoreBackend(store), address=f"{addr_block}.3", port=0)
    service.start()
    port = service.port
    started = time.monotonic()
    service.stop()
    assert time.monotonic() - started < 1.0
    again = TftpService(root, StoreBackend(store), address=f"{addr_block}.3", port=port)
    again.start()
    again.stop()


def test_start_errors_are_metalseed_errors(root, store, server, tmp_path):
    with pytest.raises(TftpError, match="does not exist"):
        TftpService(tmp_path / "nope", StoreBackend(store), address="127.0.0.1", port=0).start()
    with pytest.raises(TftpError, match="cannot serve TFTP"):
        TftpService(root, StoreBackend(store), address=server.address, port=server.port).start()


def test_without_a_mac_events_are_logged(root, store, addr_block, tmp_path, caplog):
    caplog.set_level(logging.INFO, "bootstrap.boot.tftp")
    service = TftpService(root, StoreBackend(store), address=f"{addr_block}.4", port=0)
    service.start()
    try:
        tftp(service, f"get undionly.kpxe {tmp_path / 'x'}")
        deadline = time.monotonic() + 5  # the client may exit before its last ACK is read
        while "sent (" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        service.stop()
    size = (IPXE / "undionly.kpxe").stat().st_size
    assert f"TFTP undionly.kpxe sent ({size} bytes) from 127.0.0.1 (MAC unknown)" in caplog.text

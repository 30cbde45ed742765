"""The firmware emulator's pure parts: its DHCP client against a scripted server, frame
filtering, the options it sends, ETags, and the fake kind's inventory against the seed's
own validator.
"""

from __future__ import annotations

import contextlib
import queue
import random
import uuid

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bootstrap.boot.dhcp import decide
from bootstrap.boot.dhcp.packets import (
    MessageType,
    Opt,
    build_reply,
    build_request,
    ip_bytes,
    parse,
    u32,
)
from bootstrap.boot.enlist import parse_inventory
from bootstrap.lab.fakemachine import FakeSpec, fake_inventory
from bootstrap.lab.firmware import FirmwareResult, etag_sha256
from bootstrap.lab.firmware_dhcp import (
    Cancelled,
    DhcpFailed,
    Exchange,
    Timing,
    frame,
    ipxe_options,
    pxe_options,
    reply_key,
)

MAC = "52:54:00:12:34:56"
UUID = "6f1c3e2a-58d4-4b7e-9a15-2c7d0e8b4f93"
SEED = "10.20.0.1"


def request_bytes(options) -> bytes:
    return build_request(MessageType.DISCOVER, mac=MAC, xid=7, options=options)


FAST = Timing((0.05, 0.05, 0.05), jitter=0.0, proxy_wait=0.05, restarts=1)


class ScriptedServer:
    """A ``DhcpPort`` stand-in: each request sent is answered by ``answer(msg)``."""

    interface = "eth0"

    def __init__(self, answer) -> None:
        self.answer = answer
        self.inboxes: dict[int, queue.SimpleQueue] = {}
        self.seen: list = []

    @contextlib.contextmanager
    def subscribe(self, xid: int, mac: str):
        self.inboxes[xid] = queue.SimpleQueue()
        yield self.inboxes[xid]
        del self.inboxes[xid]

    def send(self, mac: str, payload: bytes) -> None:
        msg = parse(payload)
        self.seen.append(msg)
        for reply in self.answer(msg, len(self.seen)):
            self.inboxes[msg.xid].put(reply)


def offer_or_ack(msg, kind: MessageType, *, ip="10.20.0.100", boot=True, server=SEED):
    options = [(Opt.MESSAGE_TYPE, bytes([kind])), (Opt.SERVER_ID, ip_bytes(server))]
    options += [(Opt.SUBNET_MASK, ip_bytes("255.255.255.0")), (Opt.LEASE_TIME, u32(600))]
    options += [(Opt.ROUTER, ip_bytes(SEED))]
    if boot:
        options += [(Opt.TFTP_SERVER, b"10.20.0.2"), (Opt.BOOTFILE, b"undionly.kpxe")]
    return build_reply(msg, options=tuple(options), yiaddr=ip, siaddr=server)


def full_mode(msg, n):
    kind = MessageType.OFFER if msg.message_type is MessageType.DISCOVER else MessageType.ACK
    return [offer_or_ack(msg, kind)]


def exchange(server, timing=FAST, **kw) -> Exchange:
    options = pxe_options(UUID, 0)
    return Exchange(server, MAC, options, timing, rng=random.Random(1), **kw)


def test_a_full_mode_exchange_gives_the_lease_and_the_boot_file():
    server = ScriptedServer(full_mode)
    lease = exchange(server).run()
    assert (lease.ip, lease.prefix, lease.server_id) == ("10.20.0.100", 24, SEED)
    assert (lease.bootfile, lease.next_server) == ("undionly.kpxe", "10.20.0.2")  # option 66
    assert (lease.router, lease.lease_time, lease.proxy) == (SEED, 600, False)
    discover, request = server.seen
    assert discover.message_type is MessageType.DISCOVER and discover.broadcast
    assert request.requested_ip == "10.20.0.100" and request.server_id == SEED
    assert request.xid == discover.xid


def test_the_boot_file_of_a_proxy_offer_goes_with_the_other_servers_address():
    def answer(msg, n):
        if msg.message_type is MessageType.DISCOVER:
            proxy = offer_or_ack(msg, MessageType.OFFER, ip="0.0.0.0", server="10.20.0.5")
            return [offer_or_ack(msg, MessageType.OFFER, boot=False, server="10.20.0.9"), proxy]
        return [offer_or_ack(msg, MessageType.ACK, boot=False, server="10.20.0.9")]

    lease = exchange(ScriptedServer(answer)).run()
    assert lease.ip == "10.20.0.100" and lease.server_id == "10.20.0.9"
    assert lease.bootfile == "undionly.kpxe" and lease.proxy


def test_a_nak_starts_the_exchange_over():
    def answer(msg, n):
        if msg.message_type is MessageType.REQUEST and n == 2:
            return [build_reply(msg, options=((Opt.MESSAGE_TYPE, bytes([6])),))]
        return full_mode(msg, n)

    server = ScriptedServer(answer)
    assert exchange(server).run().ip == "10.20.0.100"
    kinds = [m.message_type.name for m in server.seen]
    assert kinds == ["DISCOVER", "REQUEST", "DISCOVER", "REQUEST"]
    assert server.seen[0].xid != server.seen[2].xid  # a new exchange, a new xid


def test_a_silent_segment_is_retransmitted_to_then_given_up():
    server = ScriptedServer(lambda msg, n: [])
    with pytest.raises(DhcpFailed, match="no DHCPOFFER after 3 DHCPDISCOVERs"):
        exchange(server).run()
    assert len(server.seen) == 3


def test_power_off_ends_the_wait():
    with pytest.raises(Cancelled):
        exchange(ScriptedServer(lambda msg, n: []), cancelled=lambda: True).run()


def test_other_replies_and_junk_are_ignored():
    def answer(msg, n):
        if msg.message_type is MessageType.DISCOVER:
            return [b"junk" * 80, *full_mode(msg, n)]
        late = offer_or_ack(msg, MessageType.ACK, ip="10.20.0.200", server="10.20.0.9")
        return [late, *full_mode(msg, n)]

    assert exchange(ScriptedServer(answer)).run().ip == "10.20.0.100"


def test_pxe_and_ipxe_options_read_as_the_seed_classifies_them():
    pxe = parse(request_bytes(pxe_options(UUID, 0)))
    assert decide.classify(pxe) == decide.Client(decide.ClientKind.PXE, decide.Arch.BIOS, 0)
    assert pxe.uuid == UUID  # option 97 in SMBIOS byte order, as the seed reads it
    assert pxe.vendor_class == "PXEClient:Arch:00000:UNDI:002001"
    ipxe = parse(request_bytes(ipxe_options(UUID, 7, MAC)))
    assert decide.classify(ipxe).kind is decide.ClientKind.IPXE
    assert decide.classify(ipxe).arch is decide.Arch.EFI_X64
    assert ipxe.options[Opt.CLIENT_ID] == b"\x01" + bytes.fromhex(MAC.replace(":", ""))


def test_reply_key_picks_replies_to_port_68_only():
    request = parse(request_bytes(pxe_options(UUID, 0)))
    reply = offer_or_ack(request, MessageType.OFFER)
    wire = bytes(
        Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
        / IP(src=SEED, dst="255.255.255.255")
        / UDP(sport=67, dport=68)
        / reply
    )
    key, payload = reply_key(wire)
    assert key == (7, bytes.fromhex(MAC.replace(":", ""))) and payload == reply
    assert reply_key(frame(MAC, request_bytes(()))) is None  # a request, to 67
    assert reply_key(wire[:100]) is None
    assert reply_key(b"\xff" * 12 + b"\x86\xdd" + wire[14:]) is None  # not IPv4


def test_frames_come_from_the_machines_own_mac():
    packet = Ether(frame(MAC, request_bytes(())))
    assert packet.src == MAC and packet.dst == "ff:ff:ff:ff:ff:ff"
    assert (packet[IP].src, packet[IP].dst) == ("0.0.0.0", "255.255.255.255")
    assert (packet[UDP].sport, packet[UDP].dport) == (68, 67)


@pytest.mark.parametrize(
    "etag, digest",
    [
        ('"' + "ab" * 32 + '"', "ab" * 32),
        ('W/"' + "AB" * 32 + '"', "ab" * 32),
        ('"1234-5678"', None),
        (None, None),
    ],
)
def test_etags_give_the_sha256_only_when_they_are_one(etag, digest):
    assert etag_sha256(etag) == digest


def test_printed_results_mask_the_token():
    result = FirmwareResult(MAC, UUID, "eth0")
    result.cmdline = "quiet metalseed.token=s3cret-token-value metalseed.mac=" + MAC
    result.params = {"metalseed.token": "s3cret-token-value", "quiet": ""}
    data = result.to_json()
    assert "s3cret" not in str(data) and data["params"]["metalseed.token"] == "********"
    assert result.to_json(reveal=True)["params"]["metalseed.token"] == "s3cret-token-value"


# -- the fake kind's inventory --------------------------------------------------------------


def test_the_fake_inventory_passes_the_seeds_validator_and_is_stable():
    inventory = fake_inventory(UUID, MAC)
    parsed = parse_inventory(inventory)
    assert parsed.system.uuid == UUID and parsed.nics[0].mac == MAC
    assert 1 <= len(parsed.disks) <= 4 and all(d.empty for d in parsed.disks)
    assert parsed.cpus.count >= 4 and parsed.memory_bytes >= 16 * 2**30
    assert fake_inventory(UUID, MAC) == inventory  # same UUID, same machine
    other = fake_inventory(str(uuid.uuid4()), MAC)
    assert other["system"]["serial"] != inventory["system"]["serial"]
    assert len(fake_inventory(UUID, MAC, disks=6)["disks"]) == 6


def test_fake_specs_round_trip():
    spec = FakeSpec("f1", UUID, MAC, "eth0", "ns-rack", arch=7, disks=2)
    assert FakeSpec.from_json(spec.to_json()) == spec
    assert (
        FakeSpec.from_json({"name": "f", "uuid": UUID, "mac": MAC, "interface": "e"}).netns is None
    )

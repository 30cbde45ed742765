"""Boot decisions: who is asking, what it boots, what the reply says -- and the handler's glue."""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from bootstrap.boot.backend import BootProfile, Machine, StoreBackend
from bootstrap.boot.dhcp import decide
from bootstrap.boot.dhcp.decide import (
    Arch,
    BootFiles,
    BootSettings,
    ClientKind,
    Destination,
    NetworkSettings,
    RequestState,
    boot_for,
    classify,
    script_url,
)
from bootstrap.boot.dhcp.handler import DhcpHandler
from bootstrap.boot.dhcp.leases import LeasePool
from bootstrap.boot.dhcp.packets import (
    MalformedPacket,
    MessageType,
    Opt,
    build_request,
    ip_bytes,
    parse,
)
from bootstrap.models import BmcAddress
from bootstrap.secretbox import SecretBox
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore

MAC = "52:54:00:12:34:56"
SEED = "10.20.0.1"
SETTINGS = BootSettings(SEED, "http://10.20.0.1:80", SEED)
NET = NetworkSettings(ipaddress.IPv4Interface("10.20.0.1/24"), 600, SEED, ("10.20.0.53",))
UNKNOWN = Machine(MAC, None, None, BootProfile.ENLIST)
PXE_BIOS = "PXEClient:Arch:00000:UNDI:002001"


def msg(kind=MessageType.DISCOVER, *, vendor=None, arch=None, user=None, ipxe=None, **kw):
    options = []
    if vendor is not None:
        options.append((Opt.VENDOR_CLASS, vendor.encode()))
    if arch is not None:
        options.append((Opt.CLIENT_ARCH, arch.to_bytes(2, "big")))
    if user is not None:
        options.append((Opt.USER_CLASS, user))
    if ipxe is not None:
        options.append((Opt.IPXE, ipxe))
    options += kw.pop("options", [])
    return parse(build_request(kind, mac=kw.pop("mac", MAC), xid=42, options=options, **kw))


def opts(reply) -> dict[int, bytes]:
    return dict(reply.options)


# -- classify -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vendor, arch, user, kind, expected_arch",
    [
        (PXE_BIOS, 0, None, ClientKind.PXE, Arch.BIOS),
        ("PXEClient:Arch:00007:UNDI:003016", 7, None, ClientKind.PXE, Arch.EFI_X64),
        ("PXEClient:Arch:00009:UNDI:003016", 9, None, ClientKind.PXE, Arch.EFI_X64),
        ("PXEClient:Arch:00006:UNDI:003016", 6, None, ClientKind.PXE, Arch.EFI_IA32),
        ("PXEClient:Arch:00011:UNDI:003016", 11, None, ClientKind.PXE, Arch.EFI_ARM64),
        ("PXEClient:Arch:00007:UNDI:003016", None, None, ClientKind.PXE, Arch.EFI_X64),
        ("HTTPClient:Arch:00016:UNDI:003001", 16, None, ClientKind.HTTP, Arch.EFI_X64),
        ("HTTPClient:Arch:00019:UNDI:003001", 19, None, ClientKind.HTTP, Arch.EFI_ARM64),
        (None, 16, None, ClientKind.HTTP, Arch.EFI_X64),
        (PXE_BIOS, 0, b"iPXE", ClientKind.IPXE, Arch.BIOS),
        (PXE_BIOS, 7, b"\x04iPXE", ClientKind.IPXE, Arch.EFI_X64),  # RFC 3004 form
        (None, None, None, ClientKind.OTHER, Arch.UNKNOWN),
        ("udhcp 1.35.0", None, None, ClientKind.OTHER, Arch.UNKNOWN),
    ],
)
def test_classify(vendor, arch, user, kind, expected_arch):
    client = classify(msg(vendor=vendor, arch=arch, user=user))
    assert (client.kind, client.arch) == (kind, expected_arch)


def test_ipxe_is_recognised_by_its_encapsulated_options_alone():
    assert classify(msg(vendor=PXE_BIOS, arch=0, ipxe=b"\xb1\x01\x01")).kind is ClientKind.IPXE


# -- boot_for -----------------------------------------------------------------------------------


def test_script_url_is_the_agreed_format():
    url = script_url("http://10.20.0.1:80", "52:54:00:12:34:56")
    assert url == "http://10.20.0.1:80/boot/52-54-00-12-34-56.ipxe"
    assert script_url("http://10.20.0.1/", "AA:BB:CC:DD:EE:FF").endswith("/aa-bb-cc-dd-ee-ff.ipxe")


@pytest.mark.parametrize(
    "arch, vendor, expected",
    [
        (0, PXE_BIOS, "undionly.kpxe"),
        (7, "PXEClient:Arch:00007:UNDI:003016", "ipxe.efi"),
        (9, "PXEClient:Arch:00009:UNDI:003016", "ipxe.efi"),
        (6, "PXEClient:Arch:00006:UNDI:003016", "ipxe.efi"),
    ],
)
def test_firmware_pxe_chainloads_ipxe_over_tftp(arch, vendor, expected):
    m = msg(vendor=vendor, arch=arch, options=[(Opt.CLIENT_UUID, b"\x00" + bytes(range(16)))])
    boot = boot_for(m, classify(m), UNKNOWN, SETTINGS, proxy=False)
    assert boot is not None and boot.filename == expected
    assert boot.next_server == SEED
    options = dict(boot.options)
    assert options[Opt.BOOTFILE] == expected.encode()
    assert options[Opt.TFTP_SERVER] == SEED.encode()
    assert options[Opt.VENDOR_CLASS] == b"PXEClient"
    assert options[Opt.VENDOR_SPECIFIC] == decide.PXE_DISCOVERY_CONTROL
    assert options[Opt.CLIENT_UUID] == b"\x00" + bytes(range(16))
    assert Opt.IPXE not in options


def test_ipxe_gets_its_script_url_and_no_pxedhcp_without_option_60():
    m = msg(vendor=PXE_BIOS, arch=7, user=b"iPXE")
    boot = boot_for(m, classify(m), UNKNOWN, SETTINGS, proxy=False)
    url = "http://10.20.0.1:80/boot/52-54-00-12-34-56.ipxe"
    assert boot is not None and boot.filename == url
    options = dict(boot.options)
    assert options[Opt.BOOTFILE] == url.encode()
    assert options[Opt.IPXE] == bytes([176, 1, 1])
    assert Opt.VENDOR_CLASS not in options


def test_ipxe_in_proxy_mode_gets_pxeclient_so_it_takes_the_proxy_offer():
    m = msg(vendor=PXE_BIOS, arch=0, user=b"iPXE")
    boot = boot_for(m, classify(m), UNKNOWN, SETTINGS, proxy=True)
    options = dict(boot.options)
    assert options[Opt.VENDOR_CLASS] == b"PXEClient"
    assert Opt.IPXE not in options


def test_http_boot_clients_get_the_binary_over_http_and_httpclient():
    m = msg(vendor="HTTPClient:Arch:00016:UNDI:003001", arch=16)
    boot = boot_for(m, classify(m), UNKNOWN, SETTINGS, proxy=False)
    assert boot.filename == "http://10.20.0.1:80/ipxe/ipxe.efi"
    assert dict(boot.options)[Opt.VENDOR_CLASS] == b"HTTPClient"


def test_arm64_has_no_boot_file_unless_configured():
    m = msg(vendor="PXEClient:Arch:00011:UNDI:003016", arch=11)
    assert boot_for(m, classify(m), UNKNOWN, SETTINGS, proxy=False) is None
    custom = BootSettings(SEED, "http://x", SEED, BootFiles(efi_arm64="ipxe-arm64.efi"))
    assert boot_for(m, classify(m), UNKNOWN, custom, proxy=False).filename == "ipxe-arm64.efi"


def test_snponly_can_replace_ipxe_efi():
    m = msg(vendor="PXEClient:Arch:00007:UNDI:003016", arch=7)
    custom = BootSettings(SEED, "http://x", SEED, BootFiles(efi_x64="snponly.efi"))
    assert boot_for(m, classify(m), UNKNOWN, custom, proxy=False).filename == "snponly.efi"


def test_retired_machines_and_plain_clients_boot_nothing():
    m = msg(vendor=PXE_BIOS, arch=0)
    retired = Machine(MAC, "node-1", NodeState.RETIRED, BootProfile.RETIRED)
    assert boot_for(m, classify(m), retired, SETTINGS, proxy=False) is None
    plain = msg()
    assert boot_for(plain, classify(plain), UNKNOWN, SETTINGS, proxy=False) is None


def test_a_known_node_boots_like_an_unknown_one_at_the_dhcp_level():
    m = msg(vendor=PXE_BIOS, arch=0)
    known = Machine(MAC, "node-1", NodeState.ENROLLED, BootProfile.PROVISION, hostname="node-1")
    a = boot_for(m, classify(m), known, SETTINGS, proxy=False)
    b = boot_for(m, classify(m), UNKNOWN, SETTINGS, proxy=False)
    assert a == b


# -- replies ------------------------------------------------------------------------------------


def test_request_states():
    assert decide.request_state(msg(MessageType.REQUEST)) is RequestState.INVALID
    selecting = msg(
        MessageType.REQUEST,
        options=[(Opt.SERVER_ID, ip_bytes(SEED)), (Opt.REQUESTED_IP, ip_bytes("10.20.0.9"))],
    )
    assert decide.request_state(selecting) is RequestState.SELECTING
    reboot = msg(MessageType.REQUEST, options=[(Opt.REQUESTED_IP, ip_bytes("10.20.0.9"))])
    assert decide.request_state(reboot) is RequestState.INIT_REBOOT
    renew = msg(MessageType.REQUEST, ciaddr="10.20.0.9", broadcast=False)
    assert decide.request_state(renew) is RequestState.RENEWING


def test_an_offer_carries_the_network_and_the_boot():
    m = msg(vendor=PXE_BIOS, arch=0)
    client = classify(m)
    boot = boot_for(m, client, UNKNOWN, SETTINGS, proxy=False)
    reply = decide.lease_reply(MessageType.OFFER, m, client, UNKNOWN, boot, NET, "10.20.0.100")
    o = opts(reply)
    assert reply.options[0] == (Opt.MESSAGE_TYPE, bytes([MessageType.OFFER]))
    assert o[Opt.SERVER_ID] == ip_bytes(SEED)
    assert o[Opt.SUBNET_MASK] == ip_bytes("255.255.255.0")
    assert o[Opt.ROUTER] == ip_bytes(SEED)
    assert o[Opt.DNS] == ip_bytes("10.20.0.53")
    assert o[Opt.LEASE_TIME] == (600).to_bytes(4, "big")
    assert reply.yiaddr == "10.20.0.100" and reply.siaddr == SEED
    assert reply.file == "undionly.kpxe"
    assert reply.destination is Destination.BROADCAST
    assert reply.event == "dhcp.offer"
    assert reply.data == {
        "client": "pxe",
        "arch": "bios",
        "ip": "10.20.0.100",
        "boot": "undionly.kpxe",
    }


def test_a_renewal_ack_is_unicast_to_the_client():
    m = msg(MessageType.REQUEST, ciaddr="10.20.0.100", broadcast=False)
    reply = decide.lease_reply(MessageType.ACK, m, classify(m), UNKNOWN, None, NET, "10.20.0.100")
    assert reply.destination is Destination.CLIENT
    assert reply.file == "" and Opt.BOOTFILE not in opts(reply)


def test_a_nak_is_broadcast_with_its_reason():
    m = msg(MessageType.REQUEST, options=[(Opt.REQUESTED_IP, ip_bytes("10.9.9.9"))])
    reply = decide.nak_reply(m, classify(m), SEED, "10.9.9.9 is not on 10.20.0.0/24")
    assert reply.destination is Destination.BROADCAST
    assert opts(reply)[Opt.MESSAGE].startswith(b"10.9.9.9")
    assert reply.yiaddr == "0.0.0.0" and reply.event == "dhcp.nak"


def test_proxy_offer_and_ack():
    uuid_opt = b"\x00" + bytes(range(16))
    m = msg(vendor=PXE_BIOS, arch=0, options=[(Opt.CLIENT_UUID, uuid_opt)])
    boot = boot_for(m, classify(m), UNKNOWN, SETTINGS, proxy=True)
    offer = decide.proxy_reply(m, boot, SEED, port=67)
    assert offer.message_type is MessageType.OFFER and offer.yiaddr == "0.0.0.0"
    assert offer.destination is Destination.BROADCAST and offer.event == "dhcp.proxy-offer"
    assert opts(offer)[Opt.CLIENT_UUID] == uuid_opt
    assert opts(offer)[Opt.VENDOR_CLASS] == b"PXEClient"
    ack = decide.proxy_reply(m, boot, SEED, port=4011)
    assert ack.message_type is MessageType.ACK and ack.destination is Destination.SOURCE
    assert ack.file == "undionly.kpxe"


# -- the handler, end to end on a real store ----------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"))
    yield s
    s.close()


def full_handler(store):
    iface = ipaddress.IPv4Interface("10.20.0.1/24")
    pool = LeasePool(
        store,
        iface,
        ipaddress.IPv4Address("10.20.0.100"),
        ipaddress.IPv4Address("10.20.0.110"),
        lease_time=600,
    )
    pool.load()
    return DhcpHandler(StoreBackend(store), SETTINGS, mode="full", pool=pool, network=NET)


def dora(handler, mac=MAC, options=()):
    discover = build_request(MessageType.DISCOVER, mac=mac, xid=1, options=options)
    [offer] = handler.handle(discover, ("0.0.0.0", 68), 67)
    assert offer.address == ("255.255.255.255", 68)
    ip = parse(offer.data).yiaddr
    request = build_request(
        MessageType.REQUEST,
        mac=mac,
        xid=2,
        options=[*options, (Opt.REQUESTED_IP, ip_bytes(ip)), (Opt.SERVER_ID, ip_bytes(SEED))],
    )
    [ack] = handler.handle(request, ("0.0.0.0", 68), 67)
    return parse(offer.data), parse(ack.data)


def test_a_known_node_is_tied_by_uuid_moves_to_booting_and_gets_a_reservation(store):
    guid = uuid.UUID("4c4c4544-0042-3510-8052-b4c04f4d3232")
    node = store.create_node(guid=str(guid), bmc=BmcAddress("127.0.0.9"), state=NodeState.ENROLLED)
    handler = full_handler(store)
    options = [
        (Opt.VENDOR_CLASS, PXE_BIOS.encode()),
        (Opt.CLIENT_ARCH, b"\0\0"),
        (Opt.CLIENT_UUID, b"\x00" + guid.bytes_le),
    ]
    offer, ack = dora(handler, options=options)
    assert ack.message_type is MessageType.ACK and ack.yiaddr == offer.yiaddr
    assert store.get_node(node.id).state is NodeState.BOOTING
    kinds = [e.kind for e in store.events(node.id)]
    assert {"dhcp.offer", "dhcp.request", "dhcp.ack"} <= set(kinds)
    assert store.reservations() == {MAC: ack.yiaddr}
    [lease] = store.leases()
    assert (lease.ip, lease.mac, lease.state, lease.node_id) == (ack.yiaddr, MAC, "bound", node.id)
    assert ack.options[Opt.HOSTNAME] == node.id.encode()
    assert handler.mac_for(ack.yiaddr) == MAC


def test_a_request_for_another_server_lets_our_offer_go(store):
    handler = full_handler(store)
    discover = build_request(MessageType.DISCOVER, mac=MAC, xid=1)
    [offer] = handler.handle(discover, ("0.0.0.0", 68), 67)
    ip = parse(offer.data).yiaddr
    other = build_request(
        MessageType.REQUEST,
        mac=MAC,
        xid=1,
        options=[(Opt.REQUESTED_IP, ip_bytes(ip)), (Opt.SERVER_ID, ip_bytes("10.20.0.2"))],
    )
    assert handler.handle(other, ("0.0.0.0", 68), 67) == []
    assert handler.mac_for(ip) is None


def test_a_wrong_address_gets_a_nak(store):
    handler = full_handler(store)
    request = build_request(
        MessageType.REQUEST, mac=MAC, xid=1, options=[(Opt.REQUESTED_IP, ip_bytes("10.9.0.5"))]
    )
    [nak] = handler.handle(request, ("0.0.0.0", 68), 67)
    assert parse(nak.data).message_type is MessageType.NAK
    assert nak.address == ("255.255.255.255", 68)


def relayed(kind, giaddr, **kw):
    data = bytearray(build_request(kind, mac=MAC, xid=1, **kw))
    data[24:28] = ip_bytes(giaddr)
    return bytes(data)


def test_a_relay_on_our_subnet_is_answered_through_it(store):
    handler = full_handler(store)  # perfdhcp poses as such a relay
    [offer] = handler.handle(relayed(MessageType.DISCOVER, "10.20.0.7"), ("10.20.0.7", 67), 67)
    assert offer.address == ("10.20.0.7", 67)
    assert parse(offer.data).giaddr == "10.20.0.7"
    wrong = relayed(MessageType.REQUEST, "10.20.0.7", options=[(50, ip_bytes("10.9.0.9"))])
    [nak] = handler.handle(wrong, ("10.20.0.7", 67), 67)
    assert nak.address == ("10.20.0.7", 67) and parse(nak.data).broadcast


def test_relays_for_other_subnets_and_reply_messages_are_dropped(store):
    handler = full_handler(store)
    assert handler.handle(relayed(MessageType.DISCOVER, "10.99.0.1"), ("10.99.0.1", 67), 67) == []
    reply = bytearray(build_request(MessageType.OFFER, mac=MAC, xid=1))
    reply[0] = 2
    assert handler.handle(bytes(reply), ("10.20.0.2", 67), 67) == []


def test_junk_raises_malformed_packet_for_the_server_to_log(store):
    with pytest.raises(MalformedPacket):
        full_handler(store).handle(b"\x00" * 50, ("10.20.0.5", 68), 67)


def test_proxy_mode_answers_pxe_clients_only(store):
    handler = DhcpHandler(StoreBackend(store), SETTINGS, mode="proxy")
    plain = build_request(MessageType.DISCOVER, mac=MAC, xid=1)
    assert handler.handle(plain, ("0.0.0.0", 68), 67) == []
    pxe = build_request(
        MessageType.DISCOVER,
        mac=MAC,
        xid=1,
        options=[(Opt.VENDOR_CLASS, PXE_BIOS.encode()), (Opt.CLIENT_ARCH, b"\0\0")],
    )
    [offer] = handler.handle(pxe, ("0.0.0.0", 68), 67)
    parsed = parse(offer.data)
    assert parsed.message_type is MessageType.OFFER and parsed.yiaddr == "0.0.0.0"
    request = build_request(
        MessageType.REQUEST,
        mac=MAC,
        xid=2,
        ciaddr="10.20.0.77",
        broadcast=False,
        options=[(Opt.VENDOR_CLASS, PXE_BIOS.encode()), (Opt.CLIENT_ARCH, b"\0\0")],
    )
    [ack] = handler.handle(request, ("10.20.0.77", 68), 4011)
    assert ack.address == ("10.20.0.77", 68)
    assert parse(ack.data).message_type is MessageType.ACK
    assert handler.mac_for("10.20.0.77") == MAC
    # on port 67 a REQUEST is for the address server, not for us
    assert handler.handle(request, ("10.20.0.77", 68), 67) == []


def test_a_renewal_extends_the_lease_without_adding_events(store):
    guid = uuid.UUID("4c4c4544-0042-3510-8052-b4c04f4d3232")
    node = store.create_node(guid=str(guid), bmc=BmcAddress("127.0.0.9"), state=NodeState.ENROLLED)
    handler = full_handler(store)
    _offer, ack = dora(handler, options=[(Opt.CLIENT_UUID, b"\x00" + guid.bytes_le)])
    before = len(store.events(node.id))
    renew = build_request(MessageType.REQUEST, mac=MAC, xid=9, ciaddr=ack.yiaddr, broadcast=False)
    [out] = handler.handle(renew, (ack.yiaddr, 68), 67)
    assert out.address == (ack.yiaddr, 68)
    assert parse(out.data).message_type is MessageType.ACK
    assert len(store.events(node.id)) == before
    assert store.leases()[0].state == "bound"


def test_inform_gets_configuration_without_a_lease(store):
    handler = full_handler(store)
    inform = build_request(MessageType.INFORM, mac=MAC, xid=3, ciaddr="10.20.0.50", broadcast=False)
    [out] = handler.handle(inform, ("10.20.0.50", 68), 67)
    reply = parse(out.data)
    assert out.address == ("10.20.0.50", 68)
    assert reply.message_type is MessageType.ACK and reply.yiaddr == "0.0.0.0"
    assert Opt.LEASE_TIME not in reply.options and Opt.SUBNET_MASK in reply.options
    assert store.leases() == []


def test_an_exhausted_pool_offers_nothing(store):
    handler = full_handler(store)  # 11 addresses
    for i in range(11):
        dora(handler, mac=f"52:54:00:00:02:{i:02x}")
    late = build_request(MessageType.DISCOVER, mac="52:54:00:00:03:00", xid=1)
    assert handler.handle(late, ("0.0.0.0", 68), 67) == []

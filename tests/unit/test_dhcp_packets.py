"""DHCP packets: parsing what clients send, building what we answer, refusing junk."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP

from bootstrap.boot.dhcp.packets import (
    BROADCAST_FLAG,
    DHCP_MAGIC,
    HEADER_LEN,
    MalformedPacket,
    MessageType,
    Op,
    Opt,
    build,
    build_reply,
    build_request,
    encode_options,
    ip_bytes,
    parse,
    u32,
)

MAC = "52:54:00:12:34:56"
GUID = uuid.UUID("4c4c4544-0042-3510-8052-b4c04f4d3232")


def pxe_discover(**extra) -> bytes:
    options = [
        (Opt.VENDOR_CLASS, b"PXEClient:Arch:00007:UNDI:003016"),
        (Opt.CLIENT_ARCH, b"\x00\x07"),
        (Opt.CLIENT_UUID, b"\x00" + GUID.bytes_le),
        (Opt.PARAMETER_LIST, bytes([1, 3, 6, 66, 67])),
        (Opt.HOSTNAME, b"box"),
        *extra.items(),
    ]
    return build_request(MessageType.DISCOVER, mac=MAC, xid=0xDEADBEEF, options=options)


def test_a_pxe_discover_parses_into_its_fields():
    msg = parse(pxe_discover())
    assert msg.op == Op.BOOTREQUEST
    assert msg.xid == 0xDEADBEEF
    assert msg.mac == MAC
    assert msg.message_type is MessageType.DISCOVER
    assert msg.broadcast
    assert msg.vendor_class.startswith("PXEClient")
    assert msg.client_arch == 7
    assert msg.hostname == "box"
    assert msg.options[Opt.PARAMETER_LIST] == bytes([1, 3, 6, 66, 67])
    assert msg.ciaddr == msg.giaddr == "0.0.0.0"


def test_option_97_reads_in_smbios_byte_order():
    assert parse(pxe_discover()).uuid == str(GUID)


@pytest.mark.parametrize("raw", [b"\x01" + GUID.bytes_le, b"\x00" + bytes(15), b""])
def test_a_bad_option_97_is_ignored_not_fatal(raw):
    msg = parse(build_request(MessageType.DISCOVER, mac=MAC, xid=1, options=[(97, raw)]))
    assert msg.uuid is None


def test_requested_address_server_id_and_user_class():
    data = build_request(
        MessageType.REQUEST,
        mac=MAC,
        xid=7,
        options=[
            (Opt.REQUESTED_IP, ip_bytes("10.20.0.100")),
            (Opt.SERVER_ID, ip_bytes("10.20.0.1")),
            (Opt.USER_CLASS, b"iPXE"),
            (Opt.IPXE, bytes([177, 5, 1, 16, 236, 16, 0])),
        ],
    )
    msg = parse(data)
    assert msg.requested_ip == "10.20.0.100"
    assert msg.server_id == "10.20.0.1"
    assert msg.user_class == b"iPXE"
    assert msg.options[Opt.IPXE] == bytes([177, 5, 1, 16, 236, 16, 0])


def test_typed_options_come_back_as_the_raw_bytes_sent():
    sent = {
        Opt.SUBNET_MASK: ip_bytes("255.255.0.0"),
        Opt.DNS: ip_bytes("10.0.0.1") + ip_bytes("10.0.0.2"),
        Opt.LEASE_TIME: u32(86400),
        Opt.MAX_MESSAGE_SIZE: (1500).to_bytes(2, "big"),
        Opt.CLIENT_ID: b"\x01RT\x00\x124V",
    }
    msg = parse(build_request(MessageType.DISCOVER, mac=MAC, xid=1, options=sent.items()))
    for code, raw in sent.items():
        assert msg.options[code] == raw


def test_a_reply_carries_the_requests_identity_and_our_fields():
    request = parse(pxe_discover())
    options = (
        (Opt.MESSAGE_TYPE, bytes([MessageType.OFFER])),
        (Opt.SERVER_ID, ip_bytes("10.9.0.1")),
    )
    data = build_reply(
        request, options=options, yiaddr="10.9.0.100", siaddr="10.9.0.1", file="undionly.kpxe"
    )
    reply = BOOTP(data)
    assert reply.op == 2 and reply.xid == 0xDEADBEEF
    assert reply.chaddr[:6] == bytes.fromhex(MAC.replace(":", ""))
    assert reply.yiaddr == "10.9.0.100" and reply.siaddr == "10.9.0.1"
    assert reply.file.rstrip(b"\0") == b"undionly.kpxe"
    assert int(reply.flags) & BROADCAST_FLAG
    assert ("message-type", 2) in reply[DHCP].options
    back = parse(data)
    assert back.message_type is MessageType.OFFER and back.server_id == "10.9.0.1"


def test_a_url_too_long_for_the_file_field_goes_only_in_option_67():
    url = "http://10.0.0.1/" + "x" * 150
    data = build_reply(
        parse(pxe_discover()),
        options=((Opt.MESSAGE_TYPE, b"\x02"), (Opt.BOOTFILE, url.encode())),
        file=url,
    )
    assert BOOTP(data).file.rstrip(b"\0") == b""
    assert parse(data).options[Opt.BOOTFILE] == url.encode()


def test_long_options_are_split_and_joined_again():
    long = bytes(range(256)) * 2  # 512 bytes: three instances of the option
    block = encode_options(((Opt.MESSAGE_TYPE, b"\x01"), (Opt.VENDOR_SPECIFIC, long)))
    assert block.count(bytes([Opt.VENDOR_SPECIFIC, 255])) >= 2
    data = build(op=Op.BOOTREQUEST, xid=1, chaddr=b"\x01" * 6, options=())[:HEADER_LEN] + block
    assert parse(data).options[Opt.VENDOR_SPECIFIC] == long


# -- junk -------------------------------------------------------------------------------------


def valid() -> bytes:
    return pxe_discover()


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "shorter"),
        (b"\x01" * 100, "shorter"),
        (valid()[:HEADER_LEN] + b"\x00\x00\x00\x00" + valid()[HEADER_LEN + 4 :], "magic"),
        (bytes([3]) + valid()[1:], "op 3"),
        (valid()[:1] + bytes([6]) + valid()[2:], "not Ethernet"),
        (valid()[:2] + bytes([16]) + valid()[3:], "not Ethernet"),
        (valid()[:HEADER_LEN] + DHCP_MAGIC + bytes([53, 1]), "truncated"),
        (valid()[:HEADER_LEN] + DHCP_MAGIC + bytes([53, 1, 1, 60, 40]) + b"short", "truncated"),
        (valid()[:HEADER_LEN] + DHCP_MAGIC + bytes([60, 3]) + b"abc" + b"\xff", "message type"),
        (valid()[:HEADER_LEN] + DHCP_MAGIC + bytes([53, 1, 9, 255]), "message type"),
        (valid()[:HEADER_LEN] + DHCP_MAGIC + bytes([53, 2, 1, 1, 255]), "message type"),
        (valid()[:HEADER_LEN] + DHCP_MAGIC + bytes([53, 1, 1, 50, 3, 1, 2, 3]), "undecodable"),
        (valid() + b"\x00" * 5000, "longer"),
    ],
)
def test_junk_is_a_malformed_packet(data, why):
    with pytest.raises(MalformedPacket, match=why):
        parse(data)


def test_non_bytes_are_refused():
    with pytest.raises(MalformedPacket):
        parse("not bytes")  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=700))
def test_fuzz_arbitrary_bytes_never_raise_anything_else(data):
    try:
        parse(data)
    except MalformedPacket:
        pass


@settings(max_examples=400, deadline=None)
@given(
    header=st.binary(min_size=HEADER_LEN, max_size=HEADER_LEN),
    options=st.binary(max_size=400),
)
def test_fuzz_options_after_a_valid_header_never_raise_anything_else(header, options):
    data = bytes([1, 1, 6]) + header[3:] + DHCP_MAGIC + options
    try:
        parse(data)
    except MalformedPacket:
        pass


option_codes = st.integers(1, 254).filter(lambda c: c not in (Opt.MESSAGE_TYPE, 52))


@settings(max_examples=300, deadline=None)
@given(
    kind=st.integers(1, 8),
    items=st.lists(st.tuples(option_codes, st.binary(max_size=40)), max_size=12),
)
def test_fuzz_well_formed_options_round_trip(kind, items):
    expected: dict[int, bytes] = {}
    for code, raw in items:
        expected[code] = expected.get(code, b"") + raw
    data = build_request(MessageType(kind), mac=MAC, xid=5, options=items)
    try:
        msg = parse(data)
    except MalformedPacket:
        # scapy refuses a typed option whose length does not fit its type (e.g. 3-byte IP)
        return
    assert msg.message_type == kind
    for code, raw in expected.items():
        assert msg.options[code] == raw


# -- IPv6 router advertisements -----------------------------------------------------------------


def test_the_router_advertisement_says_no_router_here():
    from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6NDOptSrcLLAddr

    from bootstrap.boot.dhcp.ra import build_ra

    ra = ICMPv6ND_RA(build_ra("52:54:00:aa:bb:cc"))
    assert ra.type == 134 and ra.routerlifetime == 0
    assert ra.M == 0 and ra.O == 0
    assert ra[ICMPv6NDOptSrcLLAddr].lladdr == "52:54:00:aa:bb:cc"


def rs(*options: bytes) -> bytes:
    return bytes([133, 0, 0, 0, 0, 0, 0, 0]) + b"".join(options)


OWN = "52:54:00:aa:bb:cc"


@pytest.mark.parametrize(
    "data, hop_limit, answered",
    [
        (rs(), 255, True),
        (rs(bytes([1, 1]) + bytes.fromhex("525400112233")), 255, True),
        (rs(bytes([1, 1]) + bytes.fromhex("525400aabbcc")), 255, False),  # our own kernel
        (rs(), 64, False),  # routed from off-link
        (bytes([133, 1, 0, 0, 0, 0, 0, 0]), 255, False),  # code must be 0
        (bytes([134, 0, 0, 0, 0, 0, 0, 0]), 255, False),
        (rs(bytes([1, 0, 0, 0, 0, 0, 0, 0])), 255, False),  # zero-length option
        (b"\x85\x00", 255, False),
    ],
)
def test_which_solicitations_are_answered(data, hop_limit, answered):
    from bootstrap.boot.dhcp.ra import is_solicitation

    assert is_solicitation(data, hop_limit, own_mac=OWN) is answered

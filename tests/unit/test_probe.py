"""The presence probe: pure build/parse, fuzzed with hypothesis."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootstrap.discovery.probe import ProbeError, build_probe, parse_reply


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def answer(
    data: bytes, completion: int = 0, netfn: int = 0x07, cmd: int = 0x38, rmcp_plus: bool = False
) -> bytes:
    head = bytes([0x81, netfn << 2])
    body = bytes([0x20, 0x00, cmd, completion]) + data
    message = head + bytes([_checksum(head)]) + body + bytes([_checksum(body)])
    if rmcp_plus:
        return b"\x06\x00\xff\x07" + struct.pack("<BBIIH", 6, 0, 0, 0, len(message)) + message
    return b"\x06\x00\xff\x07" + bytes([0]) + b"\0" * 8 + bytes([len(message)]) + message


CAPS = bytes([0x01, 0x80, 0x04, 0x02, 0x57, 0x01, 0x00, 0x00])  # ch 1, IPMI 2.0, OEM 0x157


def test_probe_is_a_get_channel_auth_caps_request():
    packet = build_probe()
    assert packet[:4] == b"\x06\x00\xff\x07"
    message = packet[14:]
    assert len(message) == packet[13]
    assert message[1] >> 2 == 0x06 and message[5] == 0x38
    assert message[6] == 0x8E  # IPMI 2.0 extended data, current channel
    assert _checksum(message[:2]) == message[2] and _checksum(message[3:-1]) == message[-1]


@pytest.mark.parametrize("rmcp_plus", [False, True])
def test_parses_a_capabilities_answer(rmcp_plus):
    reply = parse_reply(answer(CAPS, rmcp_plus=rmcp_plus))
    assert reply.channel == 1 and reply.ipmi20 and reply.oem_id == 0x157
    assert not reply.anonymous


@pytest.mark.parametrize(
    "packet,why",
    [
        (b"", "not an RMCP"),
        (b"\x06\x00\xff\x06" + b"\0" * 20, "not an RMCP"),  # ASF class, not IPMI
        (answer(CAPS, completion=0xC1), "completion code"),
        (answer(CAPS, cmd=0x01), "another command"),
        (answer(CAPS[:4]), "truncated"),
        (answer(CAPS)[:-3], "truncated"),
        (answer(CAPS)[:-1] + b"\x00", "checksum"),
    ],
)
def test_rejects_what_is_not_our_answer(packet, why):
    with pytest.raises(ProbeError, match=why):
        parse_reply(packet)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_never_crash_the_parser(data):
    try:
        parse_reply(data)
    except ProbeError:
        pass


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=0, max_value=60), st.binary(min_size=1, max_size=4))
def test_mutated_answers_parse_or_are_rejected_cleanly(pos, junk):
    good = bytearray(answer(CAPS))
    pos = min(pos, len(good) - 1)
    good[pos : pos + len(junk)] = junk
    try:
        parse_reply(bytes(good))
    except ProbeError:
        pass


def test_a_redfish_service_root_is_recognised_and_anything_else_is_not():
    from bootstrap.discovery.sweep import parse_service_root

    reply = parse_service_root(b'{"RedfishVersion": "1.5.0", "UUID": "ABC-1", "Product": "iDRAC"}')
    assert (reply.version, reply.uuid, reply.product) == ("1.5.0", "abc-1", "iDRAC")
    for body in (b"<html>", b"[]", b'{"Name": "router"}', b'{"RedfishVersion": 5}', b"\xff"):
        with pytest.raises(ValueError):
            parse_service_root(body)

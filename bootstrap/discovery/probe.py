"""The cheap, unauthenticated presence probe: Get Channel Authentication Capabilities.

Sent as a sessionless IPMI 1.5 message over RMCP (what ipmitool and pyghmi
send first anyway), so every IPMI BMC answers it, with no credentials and
no session state on the BMC. Building and parsing are pure functions.
"""

from __future__ import annotations

import dataclasses
import enum

RMCP_HEADER = b"\x06\x00\xff\x07"  # version 6, reserved, no RMCP ACK, class IPMI


class NetFn(enum.IntEnum):
    APP_REQUEST = 0x06
    APP_RESPONSE = 0x07


class Cmd(enum.IntEnum):
    GET_CHANNEL_AUTH_CAPABILITIES = 0x38


BMC_ADDRESS = 0x20
REMOTE_CONSOLE = 0x81
CHANNEL_CURRENT = 0x0E
IPMI20_EXTENDED = 0x80
PRIV_ADMIN = 0x04


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_probe(seq: int = 0) -> bytes:
    """One Get Channel Authentication Capabilities request, IPMI 2.0 extended data asked."""
    head = bytes([BMC_ADDRESS, NetFn.APP_REQUEST << 2])
    body = bytes(
        [
            REMOTE_CONSOLE,
            (seq & 0x3F) << 2,
            Cmd.GET_CHANNEL_AUTH_CAPABILITIES,
            IPMI20_EXTENDED | CHANNEL_CURRENT,
            PRIV_ADMIN,
        ]
    )
    message = head + bytes([_checksum(head)]) + body + bytes([_checksum(body)])
    session = bytes([0x00]) + b"\x00" * 4 + b"\x00" * 4 + bytes([len(message)])
    return RMCP_HEADER + session + message


@dataclasses.dataclass(frozen=True)
class ProbeReply:
    channel: int
    ipmi20: bool  # the BMC speaks RMCP+ (IPMI 2.0)
    auth_types: int  # IPMI 1.5 authentication type bits
    anonymous: bool  # anonymous login enabled (null user, null password)
    null_users: bool  # null usernames enabled
    oem_id: int


class ProbeError(ValueError):
    """The datagram is not an answer to our probe."""


def parse_reply(packet: bytes) -> ProbeReply:
    """Parse an answer to ``build_probe``; ``ProbeError`` for anything else."""
    if len(packet) < 14 or packet[:4] != RMCP_HEADER:
        raise ProbeError("not an RMCP IPMI packet")
    auth_type = packet[4]
    if auth_type == 0x06:  # an RMCP+ formatted answer (some BMCs use it even here)
        if len(packet) < 16 or packet[5] & 0x3F != 0:
            raise ProbeError("not an IPMI payload")
        length = int.from_bytes(packet[14:16], "little")
        message = packet[16 : 16 + length]
    elif auth_type == 0x00:
        length = packet[13]
        message = packet[14 : 14 + length]
    else:
        raise ProbeError(f"unexpected authentication type {auth_type}")
    if len(message) < 8 or len(message) != length:
        raise ProbeError("truncated IPMI message")
    if _checksum(message[:2]) != message[2] or _checksum(message[3:-1]) != message[-1]:
        raise ProbeError("bad IPMI checksum")
    netfn, cmd, completion = message[1] >> 2, message[5], message[6]
    if netfn != NetFn.APP_RESPONSE or cmd != Cmd.GET_CHANNEL_AUTH_CAPABILITIES:
        raise ProbeError(f"answer to another command ({netfn:#x}/{cmd:#x})")
    if completion != 0:
        raise ProbeError(f"completion code {completion:#x}")
    data = message[7:-1]
    if len(data) < 8:
        raise ProbeError("truncated capabilities")
    return ProbeReply(
        channel=data[0] & 0x0F,
        ipmi20=bool(data[1] & 0x80) and bool(data[3] & 0x02),
        auth_types=data[1] & 0x3F,
        anonymous=bool(data[2] & 0x01),
        null_users=bool(data[2] & 0x02),
        oem_id=int.from_bytes(data[4:7], "little"),
    )

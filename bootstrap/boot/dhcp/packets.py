"""DHCP on the wire: bytes -> a small frozen ``DhcpMessage``, and replies -> bytes.

scapy does the dissecting and the building; this module keeps it off its slow
paths, because every packet of a 1,000-client boot storm goes through here:

* parsing dissects the fixed BOOTP header with scapy's ``BOOTP`` layer and the
  options with scapy's ``DHCPOptionsField`` directly (no payload guessing, no
  ``show()``), then turns scapy's named values back into raw bytes per option
  code with a table built once from scapy's own option table;
* building marks the packet ``explicit`` (scapy otherwise clones it through
  its fuzzing iterator on every build) and caches the encoded options block:
  a storm's replies differ in their header, rarely in their options.

Anything that is not a well-formed DHCP message -- short, truncated options,
no magic cookie, no message type, not Ethernet -- raises ``MalformedPacket``
and nothing else; the server logs and drops it. Long options split over
several instances are concatenated (RFC 3396); option overload (52) is not
honoured (no client we boot uses it).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import socket
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from scapy.layers.dhcp import BOOTP, DHCPOptions, DHCPOptionsField, dhcpmagic

from ...errors import MetalseedError

DHCP_MAGIC = bytes(dhcpmagic)
HEADER_LEN = 236  # the fixed BOOTP header, before the magic cookie
MIN_LEN = HEADER_LEN + len(DHCP_MAGIC)
MAX_LEN = 4096  # larger than any client's max message size; anything bigger is junk
BROADCAST_FLAG = 0x8000
ZERO = "0.0.0.0"


class MalformedPacket(MetalseedError):
    """Bytes on port 67/4011 that are not a DHCP message we can answer."""


class Op(enum.IntEnum):
    BOOTREQUEST = 1
    BOOTREPLY = 2


class MessageType(enum.IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Opt(enum.IntEnum):
    """The DHCP option codes metalseed reads or writes."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS = 6
    HOSTNAME = 12
    BROADCAST_ADDRESS = 28
    VENDOR_SPECIFIC = 43
    REQUESTED_IP = 50
    LEASE_TIME = 51
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_LIST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER = 66
    BOOTFILE = 67
    USER_CLASS = 77
    CLIENT_ARCH = 93
    CLIENT_NDI = 94
    CLIENT_UUID = 97
    IPXE = 175  # iPXE's encapsulated options
    END = 255


#: scapy option name -> (code, field or None): how to put scapy's decoded values back into bytes
_SCAPY_NAMES = MappingProxyType(
    {
        (value if isinstance(value, str) else value.name): (
            code,
            None if isinstance(value, str) else value,
        )
        for code, value in DHCPOptions.items()
        if value is not None
    }
)
_OPTIONS_FIELD = DHCPOptionsField("options", b"")


@dataclasses.dataclass(frozen=True, slots=True)
class DhcpMessage:
    """One parsed DHCP message (a client's request, or an offer seen by the probe)."""

    op: int
    xid: int
    secs: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    chaddr: bytes  # the 16-byte field as sent
    mac: str  # lower-case, colon-separated
    message_type: MessageType
    options: Mapping[int, bytes]  # option code -> raw value
    requested_ip: str | None = None
    server_id: str | None = None
    vendor_class: str = ""
    user_class: bytes = b""
    client_arch: int | None = None  # first entry of option 93
    uuid: str | None = None  # option 97, read in SMBIOS byte order
    hostname: str = ""

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)


def _ip(raw: bytes | None) -> str | None:
    return socket.inet_ntoa(raw) if raw is not None and len(raw) == 4 else None


def _raw_options(data: bytes) -> dict[int, bytes]:
    """The options block after the magic cookie -> {code: raw bytes}, via scapy."""
    options: dict[int, bytes] = {}
    for item in _OPTIONS_FIELD.m2i(None, data):
        if isinstance(item, str):  # "pad" / "end"
            if item == "end":
                break
            continue
        if not isinstance(item, tuple):  # scapy hands back the undecodable rest as bytes
            raise MalformedPacket(f"truncated or undecodable option at {bytes(item[:2]).hex()}")
        name, *values = item
        if isinstance(name, int):
            code, field = name, None
        else:
            code, field = _SCAPY_NAMES[name]
        if field is None:
            raw = b"".join(bytes(v) for v in values)
        else:
            raw = b"".join(field.addfield(None, b"", v) for v in values)
        # RFC 3396: an option split over several instances is their concatenation
        options[code] = options[code] + raw if code in options else raw
    return options


def parse(data: bytes) -> DhcpMessage:
    """Bytes from the wire -> ``DhcpMessage``; ``MalformedPacket`` for anything else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedPacket(f"not bytes: {type(data).__name__}")
    data = bytes(data)
    if len(data) < MIN_LEN:
        raise MalformedPacket(f"{len(data)} bytes is shorter than a DHCP message ({MIN_LEN})")
    if len(data) > MAX_LEN:
        raise MalformedPacket(f"{len(data)} bytes is longer than any DHCP message we accept")
    if data[HEADER_LEN:MIN_LEN] != DHCP_MAGIC:
        raise MalformedPacket("no DHCP magic cookie (plain BOOTP or not DHCP at all)")
    if data[0] not in (Op.BOOTREQUEST, Op.BOOTREPLY):
        raise MalformedPacket(f"op {data[0]} is neither BOOTREQUEST nor BOOTREPLY")
    if data[1] != 1 or data[2] != 6:
        raise MalformedPacket(f"hardware type {data[1]}/length {data[2]} is not Ethernet")
    try:
        header = BOOTP(data[:HEADER_LEN])
        options = _raw_options(data[MIN_LEN:])
    except MalformedPacket:
        raise
    except Exception as exc:  # scapy's own errors, translated at the boundary
        raise MalformedPacket(f"undecodable: {type(exc).__name__}: {exc}") from None

    kind = options.get(Opt.MESSAGE_TYPE)
    if kind is None or len(kind) != 1 or not 1 <= kind[0] <= 8:
        raise MalformedPacket("no valid DHCP message type (option 53)")
    chaddr = bytes(data[28:44])
    arch = options.get(Opt.CLIENT_ARCH)
    fields = header.fields  # dissected values; plain dict reads beat scapy's __getattr__
    return DhcpMessage(
        op=data[0],
        xid=fields["xid"],
        secs=fields["secs"],
        flags=int(fields["flags"]),
        ciaddr=fields["ciaddr"],
        yiaddr=fields["yiaddr"],
        siaddr=fields["siaddr"],
        giaddr=fields["giaddr"],
        chaddr=chaddr,
        mac=chaddr[:6].hex(":"),
        message_type=MessageType(kind[0]),
        options=MappingProxyType(options),
        requested_ip=_ip(options.get(Opt.REQUESTED_IP)),
        server_id=_ip(options.get(Opt.SERVER_ID)),
        vendor_class=options.get(Opt.VENDOR_CLASS, b"").decode("latin-1"),
        user_class=options.get(Opt.USER_CLASS, b""),
        client_arch=int.from_bytes(arch[:2], "big") if arch and len(arch) >= 2 else None,
        uuid=_uuid(options.get(Opt.CLIENT_UUID)),
        hostname=options.get(Opt.HOSTNAME, b"").decode("latin-1"),
    )


def _uuid(raw: bytes | None) -> str | None:
    """Option 97: type 0 + 16 bytes, in SMBIOS byte order (the backend also tries the other)."""
    if raw is None or len(raw) != 17 or raw[0] != 0:
        return None
    return str(uuidlib.UUID(bytes_le=raw[1:]))


# -- building -------------------------------------------------------------------------------


def ip_bytes(address: str) -> bytes:
    return socket.inet_aton(address)


def u32(value: int) -> bytes:
    return int(value).to_bytes(4, "big")


Options = tuple[tuple[int, bytes], ...]


@functools.lru_cache(maxsize=4096)
def encode_options(options: Options) -> bytes:
    """``((code, raw), ...)`` -> the options block (magic cookie to end), built by scapy once.

    Values longer than 255 bytes are split over several instances (RFC 3396).
    """
    items: list = []
    for code, raw in options:
        if not raw:
            items.append((int(code), b""))
        for start in range(0, len(raw), 255):
            items.append((int(code), raw[start : start + 255]))
    items.append("end")
    return DHCP_MAGIC + _OPTIONS_FIELD.i2m(None, items)


def build(
    *,
    op: Op,
    xid: int,
    chaddr: bytes,
    options: Options,
    flags: int = 0,
    ciaddr: str = ZERO,
    yiaddr: str = ZERO,
    siaddr: str = ZERO,
    giaddr: str = ZERO,
    file: str = "",
    secs: int = 0,
) -> bytes:
    """One DHCP message as bytes: scapy's BOOTP header + the cached options block."""
    packet = BOOTP(
        op=op,
        htype=1,
        hlen=6,
        xid=xid,
        secs=secs,
        flags=flags,
        ciaddr=ciaddr,
        yiaddr=yiaddr,
        siaddr=siaddr,
        giaddr=giaddr,
        chaddr=chaddr.ljust(16, b"\0")[:16],
        file=file.encode() if len(file) < 128 else b"",
        options=encode_options(options),
    )
    packet.explicit = True  # no volatile fields: skip scapy's per-build clone
    return packet.self_build()


def build_reply(
    request: DhcpMessage,
    *,
    options: Options,
    yiaddr: str = ZERO,
    siaddr: str = ZERO,
    ciaddr: str | None = None,
    file: str = "",
    broadcast: bool = False,
) -> bytes:
    """A BOOTREPLY to ``request``: its xid, flags, giaddr and chaddr; our fields and options.

    ``broadcast`` sets the broadcast flag (a DHCPNAK through a relay, RFC 2131 4.3.2).
    """
    return build(
        op=Op.BOOTREPLY,
        xid=request.xid,
        chaddr=request.chaddr,
        flags=(request.flags & BROADCAST_FLAG) | (BROADCAST_FLAG if broadcast else 0),
        ciaddr=request.ciaddr if ciaddr is None else ciaddr,
        yiaddr=yiaddr,
        siaddr=siaddr,
        giaddr=request.giaddr,
        file=file,
        options=options,
    )


def build_request(
    message_type: MessageType,
    *,
    mac: str,
    xid: int,
    options: Iterable[tuple[int, bytes]] = (),
    broadcast: bool = True,
    ciaddr: str = ZERO,
) -> bytes:
    """A client's message (the probe's DHCPDISCOVER, test clients)."""
    return build(
        op=Op.BOOTREQUEST,
        xid=xid,
        chaddr=bytes.fromhex(mac.replace(":", "").replace("-", "")),
        flags=BROADCAST_FLAG if broadcast else 0,
        ciaddr=ciaddr,
        options=((Opt.MESSAGE_TYPE, bytes([message_type])), *options),
    )

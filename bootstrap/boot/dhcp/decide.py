"""What to answer a DHCP client: pure functions of the packet and the backend's answer.

No sockets, no store, no clock. The handler feeds in a parsed ``DhcpMessage``,
the ``Machine`` the backend identified, and (full mode) the address the lease
pool chose; these functions say what the reply carries.

Who is asking (``classify``):

* architecture from option 93 (RFC 4578 / IANA processor architecture types):
  0 x86 BIOS; 6 x86 UEFI (IA32 by the RFC -- the issue treats it as x86-64
  UEFI, and so does the default boot file); 7 and 9 x86-64 UEFI; 10 arm32
  UEFI; 11 arm64 UEFI; 15/16/18/19 the UEFI HTTP-boot variants of those.
  Without option 93, the ``Arch:NNNNN`` field of a PXEClient vendor class.
* kind: **ipxe** when user class (77) is ``iPXE`` or iPXE's encapsulated
  options (175) are present; **http** for a UEFI HTTP-boot client (vendor class
  ``HTTPClient`` or an HTTP arch type); **pxe** for firmware PXE (vendor class
  ``PXEClient...``); **other** for an operating system's DHCP client.

What it boots (``boot_for``):

* firmware PXE gets an iPXE binary over TFTP (``BootFiles``): ``undionly.kpxe``
  for BIOS, ``ipxe.efi`` for x86-64 UEFI. ``ipxe.efi`` carries iPXE's native
  NIC drivers, which are much faster than the firmware's (see lab-facts: UNDI
  vs native); ``snponly.efi`` uses the firmware's SNP driver and is the choice
  for NICs iPXE has no driver for -- pass ``BootFiles(efi_x64="snponly.efi")``.
  Debian's ipxe package has no arm64 build, so arm64 gets no boot file unless
  one is configured (``BootFiles(efi_arm64="ipxe-arm64.efi")``); the handler
  logs that.
* iPXE gets the HTTP URL of its MAC's script (``script_url``), the
  no-pxedhcp flag (175.176 = 1) so it does not wait for a proxyDHCP offer, and
  no option 60 ``PXEClient`` (which would make it wait anyway).
* a UEFI HTTP-boot client gets the iPXE binary's HTTP URL (``binary_url``) and
  option 60 ``HTTPClient`` (UEFI requires the echo).
* a retired machine boots nothing (its firmware moves on to the next device);
  an unknown machine boots like any other -- the HTTP side renders enlistment.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
from collections.abc import Mapping
from typing import Any

from ..backend import BootProfile, Machine
from .packets import ZERO, DhcpMessage, MessageType, Opt, Options, ip_bytes, u32


class Arch(enum.StrEnum):
    BIOS = "bios"
    EFI_IA32 = "efi-ia32"
    EFI_X64 = "efi-x64"
    EFI_ARM32 = "efi-arm32"
    EFI_ARM64 = "efi-arm64"
    UNKNOWN = "unknown"


class ArchType(enum.IntEnum):
    """Option 93 values (RFC 4578, IANA "Processor Architecture Types")."""

    X86_BIOS = 0
    EFI_IA32 = 6
    EFI_BC = 7  # x86-64 in practice
    EFI_X86_64 = 9
    EFI_ARM32 = 10
    EFI_ARM64 = 11
    EFI_IA32_HTTP = 15
    EFI_X86_64_HTTP = 16
    EFI_ARM32_HTTP = 18
    EFI_ARM64_HTTP = 19


_ARCH = {
    ArchType.X86_BIOS: Arch.BIOS,
    ArchType.EFI_IA32: Arch.EFI_IA32,
    ArchType.EFI_BC: Arch.EFI_X64,
    ArchType.EFI_X86_64: Arch.EFI_X64,
    ArchType.EFI_ARM32: Arch.EFI_ARM32,
    ArchType.EFI_ARM64: Arch.EFI_ARM64,
    ArchType.EFI_IA32_HTTP: Arch.EFI_IA32,
    ArchType.EFI_X86_64_HTTP: Arch.EFI_X64,
    ArchType.EFI_ARM32_HTTP: Arch.EFI_ARM32,
    ArchType.EFI_ARM64_HTTP: Arch.EFI_ARM64,
}
_HTTP_ARCH = frozenset(t for t in ArchType if t.name.endswith("_HTTP"))


class ClientKind(enum.StrEnum):
    PXE = "pxe"  # firmware PXE: chainload iPXE over TFTP
    IPXE = "ipxe"  # iPXE itself: its script over HTTP
    HTTP = "http"  # UEFI HTTP boot: iPXE over HTTP
    OTHER = "other"  # an OS's DHCP client: an address, no boot


#: iPXE encapsulated option 175, sub-option 176 (no-pxedhcp) = 1
IPXE_NO_PXEDHCP = bytes([176, 1, 1])
#: PXE vendor option 43: discovery control (6) = 8, "boot the file in this offer"; end
PXE_DISCOVERY_CONTROL = bytes([6, 1, 8, 255])


@dataclasses.dataclass(frozen=True)
class Client:
    kind: ClientKind
    arch: Arch
    arch_type: int | None = None


def _is_ipxe(msg: DhcpMessage) -> bool:
    user = msg.user_class
    if user == b"iPXE":
        return True
    # RFC 3004 form: length-prefixed strings
    while len(user) > 1:
        size = user[0]
        if user[1 : 1 + size] == b"iPXE":
            return True
        user = user[1 + size :]
    return Opt.IPXE in msg.options


def _vendor_arch(vendor: str) -> int | None:
    """``PXEClient:Arch:00007:UNDI:003016`` -> 7."""
    parts = vendor.split(":")
    if len(parts) >= 3 and parts[1] == "Arch" and parts[2].isdigit():
        return int(parts[2])
    return None


def classify(msg: DhcpMessage) -> Client:
    """Which kind of client sent ``msg``, on which architecture."""
    vendor = msg.vendor_class
    arch_type = msg.client_arch if msg.client_arch is not None else _vendor_arch(vendor)
    arch = _ARCH.get(arch_type, Arch.UNKNOWN) if arch_type is not None else Arch.UNKNOWN
    if _is_ipxe(msg):
        kind = ClientKind.IPXE
    elif vendor.startswith("HTTPClient") or arch_type in _HTTP_ARCH:
        kind = ClientKind.HTTP
    elif vendor.startswith("PXEClient"):
        kind = ClientKind.PXE
    else:
        kind = ClientKind.OTHER
    return Client(kind, arch, arch_type)


@dataclasses.dataclass(frozen=True)
class BootFiles:
    """The iPXE binary each firmware architecture chainloads; None: nothing to boot there."""

    bios: str | None = "undionly.kpxe"
    efi_ia32: str | None = "ipxe.efi"  # option 93 type 6, treated as x86-64 UEFI (see above)
    efi_x64: str | None = "ipxe.efi"
    efi_arm32: str | None = None
    efi_arm64: str | None = None  # Debian ships no arm64 iPXE; e.g. "ipxe-arm64.efi"

    def for_arch(self, arch: Arch) -> str | None:
        field = arch.replace("-", "_")
        return getattr(self, field) if arch is not Arch.UNKNOWN else None


@dataclasses.dataclass(frozen=True)
class BootSettings:
    """Where boot files come from: the seed's addresses and the HTTP base URL."""

    server_ip: str  # our address: server identifier, next-server for HTTP
    http_base: str  # e.g. "http://10.20.0.1:80"
    tftp_server: str  # next-server for TFTP (usually server_ip)
    files: BootFiles = BootFiles()


def script_url(base_url: str, mac: str) -> str:
    """The iPXE script of one MAC: ``{base}/boot/52-54-00-12-34-56.ipxe`` (agreed with HTTP)."""
    return f"{base_url.rstrip('/')}/boot/{mac.lower().replace(':', '-')}.ipxe"


def binary_url(base_url: str, name: str) -> str:
    """An iPXE binary over HTTP, for UEFI HTTP-boot clients: ``{base}/ipxe/{name}``."""
    return f"{base_url.rstrip('/')}/ipxe/{name}"


@dataclasses.dataclass(frozen=True)
class Boot:
    """What one client is told to boot: the file, where from, and the options saying so."""

    client: Client
    filename: str  # TFTP file name or HTTP URL
    next_server: str
    options: Options


def boot_for(
    msg: DhcpMessage, client: Client, machine: Machine, settings: BootSettings, *, proxy: bool
) -> Boot | None:
    """The boot answer for this client, or None (not a boot client, retired, no binary)."""
    if machine.profile is BootProfile.RETIRED or client.kind is ClientKind.OTHER:
        return None
    if client.kind is ClientKind.IPXE:
        url = script_url(settings.http_base, msg.mac)
        if proxy:  # a proxy offer is recognised by iPXE only with option 60 PXEClient
            options: Options = ((Opt.VENDOR_CLASS, b"PXEClient"), (Opt.BOOTFILE, url.encode()))
        else:
            options = ((Opt.BOOTFILE, url.encode()), (Opt.IPXE, IPXE_NO_PXEDHCP))
        return Boot(client, url, settings.server_ip, options)
    name = settings.files.for_arch(client.arch)
    if name is None:
        return None
    if client.kind is ClientKind.HTTP:
        url = binary_url(settings.http_base, name)
        options = ((Opt.VENDOR_CLASS, b"HTTPClient"), (Opt.BOOTFILE, url.encode()))
        return Boot(client, url, settings.server_ip, options)
    options = (
        (Opt.VENDOR_CLASS, b"PXEClient"),
        (Opt.VENDOR_SPECIFIC, PXE_DISCOVERY_CONTROL),
        (Opt.TFTP_SERVER, settings.tftp_server.encode()),
        (Opt.BOOTFILE, name.encode()),
    )
    uuid = msg.options.get(Opt.CLIENT_UUID)
    if uuid is not None:  # PXE: a server answering a client that sent 97 echoes it
        options += ((Opt.CLIENT_UUID, uuid),)
    return Boot(client, name, settings.tftp_server, options)


# -- replies ----------------------------------------------------------------------------------


class Destination(enum.Enum):
    BROADCAST = "broadcast"  # 255.255.255.255:68 out of the interface
    CLIENT = "client"  # unicast to ciaddr:68 (the client has its address)
    SOURCE = "source"  # back to the sender's address and port (proxyDHCP on 4011)


class RequestState(enum.StrEnum):
    """RFC 2131 4.3.2: where a DHCPREQUEST comes from.

    Renewing (unicast) and rebinding (broadcast) look the same to a UDP socket
    and are answered alike, so both read as ``renewing``.
    """

    SELECTING = "selecting"
    INIT_REBOOT = "init-reboot"
    RENEWING = "renewing"
    INVALID = "invalid"


def request_state(msg: DhcpMessage) -> RequestState:
    if msg.server_id is not None:
        return RequestState.SELECTING if msg.ciaddr == ZERO else RequestState.RENEWING
    if msg.ciaddr != ZERO:
        return RequestState.RENEWING
    if msg.requested_ip is not None:
        return RequestState.INIT_REBOOT
    return RequestState.INVALID


@dataclasses.dataclass(frozen=True)
class NetworkSettings:
    """Full mode: what the segment looks like to a client."""

    interface: ipaddress.IPv4Interface  # the seed's address with its prefix
    lease_time: int
    router: str | None = None
    dns: tuple[str, ...] = ()

    @property
    def server_ip(self) -> str:
        return str(self.interface.ip)

    def options(self, lease_time: int | None) -> Options:
        """Mask, broadcast, router, DNS and (unless None) the lease times."""
        return _network_options(self, lease_time)


@functools.lru_cache(maxsize=64)  # the same few tuples for every reply
def _network_options(net: NetworkSettings, lease_time: int | None) -> Options:
    network = net.interface.network
    items: list[tuple[int, bytes]] = [
        (Opt.SUBNET_MASK, network.netmask.packed),
        (Opt.BROADCAST_ADDRESS, network.broadcast_address.packed),
    ]
    if net.router:
        items.append((Opt.ROUTER, ip_bytes(net.router)))
    if net.dns:
        items.append((Opt.DNS, b"".join(ip_bytes(d) for d in net.dns)))
    if lease_time is not None:
        items += [
            (Opt.LEASE_TIME, u32(lease_time)),
            (Opt.RENEWAL_TIME, u32(lease_time // 2)),
            (Opt.REBINDING_TIME, u32(lease_time * 7 // 8)),
        ]
    return tuple(items)


@dataclasses.dataclass(frozen=True)
class Reply:
    """One answer: the header fields and options to build, where to send it, what to record."""

    message_type: MessageType
    options: Options
    destination: Destination
    event: str
    message: str
    data: Mapping[str, Any]
    yiaddr: str = ZERO
    siaddr: str = ZERO
    ciaddr: str | None = None  # None: echo the request's
    file: str = ""


def _head(kind: MessageType, server_ip: str) -> Options:
    return ((Opt.MESSAGE_TYPE, bytes([kind])), (Opt.SERVER_ID, ip_bytes(server_ip)))


def _data(client: Client, ip: str | None, boot: Boot | None) -> dict[str, Any]:
    data: dict[str, Any] = {"client": str(client.kind), "arch": str(client.arch)}
    if ip:
        data["ip"] = ip
    if boot is not None:
        data["boot"] = boot.filename
    return data


def _hostname(machine: Machine) -> Options:
    return ((Opt.HOSTNAME, machine.hostname.encode()),) if machine.hostname else ()


def _describe(ip: str, client: Client, boot: Boot | None) -> str:
    what = f"{client.kind}, {client.arch}"
    return f"{ip} ({what}{': ' + boot.filename if boot else ''})"


def lease_reply(
    kind: MessageType,
    msg: DhcpMessage,
    client: Client,
    machine: Machine,
    boot: Boot | None,
    net: NetworkSettings,
    ip: str,
) -> Reply:
    """Full mode DHCPOFFER or DHCPACK of ``ip`` (with the boot answer, if any)."""
    options = (
        _head(kind, net.server_ip)
        + net.options(net.lease_time)
        + _hostname(machine)
        + (boot.options if boot else ())
    )
    name = "offer" if kind is MessageType.OFFER else "ack"
    return Reply(
        kind,
        options,
        Destination.CLIENT if msg.ciaddr != ZERO else Destination.BROADCAST,
        f"dhcp.{name}",
        f"DHCP{name.upper()} {_describe(ip, client, boot)}",
        _data(client, ip, boot),
        yiaddr=ip,
        siaddr=boot.next_server if boot else net.server_ip,
        file=boot.filename if boot else "",
    )


def inform_reply(
    msg: DhcpMessage, client: Client, machine: Machine, boot: Boot | None, net: NetworkSettings
) -> Reply:
    """DHCPACK to a DHCPINFORM: configuration, no lease, sent to the client's address."""
    options = _head(MessageType.ACK, net.server_ip) + net.options(None) + _hostname(machine)
    options += boot.options if boot else ()
    return Reply(
        MessageType.ACK,
        options,
        Destination.CLIENT if msg.ciaddr != ZERO else Destination.BROADCAST,
        "dhcp.ack",
        f"DHCPACK (inform) {_describe(msg.ciaddr, client, boot)}",
        _data(client, msg.ciaddr, boot),
        siaddr=boot.next_server if boot else net.server_ip,
        file=boot.filename if boot else "",
    )


def nak_reply(msg: DhcpMessage, client: Client, server_ip: str, reason: str) -> Reply:
    """DHCPNAK: broadcast, or through the relay with the broadcast flag (RFC 2131 4.3.2)."""
    options = _head(MessageType.NAK, server_ip) + ((Opt.MESSAGE, reason.encode()[:250]),)
    data = _data(client, msg.requested_ip or (msg.ciaddr if msg.ciaddr != ZERO else None), None)
    data["reason"] = reason
    return Reply(
        MessageType.NAK,
        options,
        Destination.BROADCAST,
        "dhcp.nak",
        f"DHCPNAK: {reason}",
        data,
        ciaddr=ZERO,
    )


def proxy_reply(msg: DhcpMessage, boot: Boot, server_ip: str, *, port: int) -> Reply:
    """proxyDHCP: boot options only, never an address.

    On port 67 a DHCPOFFER, broadcast next to the address server's offer; on
    port 4011 a DHCPACK sent back to the client's address and port.
    """
    offer = port != PXE_PORT
    kind = MessageType.OFFER if offer else MessageType.ACK
    options = _head(kind, server_ip) + boot.options
    if offer and Opt.CLIENT_UUID in msg.options and Opt.CLIENT_UUID not in dict(boot.options):
        options += ((Opt.CLIENT_UUID, msg.options[Opt.CLIENT_UUID]),)
    return Reply(
        kind,
        options,
        Destination.BROADCAST if offer else Destination.SOURCE,
        "dhcp.proxy-offer" if offer else "dhcp.ack",
        f"proxyDHCP {'offer' if offer else 'ack'} ({boot.client.kind}, {boot.client.arch}):"
        f" {boot.filename}",
        {**_data(boot.client, None, boot), "proxy": True},
        siaddr=boot.next_server,
        file=boot.filename,
        ciaddr=msg.ciaddr,
    )


DHCP_PORT = 67
CLIENT_PORT = 68
PXE_PORT = 4011

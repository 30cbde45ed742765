"""One simulated BMC, built on pyghmi's BMC server class.

``SimBmc`` extends ``pyghmi.ipmi.bmc.Bmc`` with what a lab needs and pyghmi's
server lacks:

* cipher suites 3 (SHA-1) and 17 (SHA-256), negotiated from the client's
  proposal; ``sha1_only`` refuses 17 with RMCP+ status 0x11 as older BMCs do
  (pyghmi's own server claims SHA-1 whatever is asked, which breaks pyghmi's
  client, see shared/notes/lab-facts.md);
* a user table with the IPMI user commands (names, passwords, access, enable),
  so credential rotation can be exercised; unknown users get RAKP2 status 0x0d;
* Get LAN Configuration (the BMC's MAC), Get Channel Info, a FRU image;
* boot flags with the persistent and EFI bits kept;
* a power hook called on every power change, and fault injection.

All of it runs on the single thread that drives pyghmi's event loop (see
``bmcrun.py``); latency is a deferred call on that loop, never a sleep.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import os
import random
import socket
import struct
import uuid
from collections.abc import Callable

import pyghmi.ipmi.bmc as pyghmi_bmc
import pyghmi.ipmi.private.constants as ipmi_constants
import pyghmi.ipmi.private.serversession as serversession
import pyghmi.ipmi.private.session as ipmisession

from ..guid import encode_ipmi
from .fru import build_fru

# RMCP+ authentication / integrity / confidentiality algorithm numbers (IPMI 2.0 13-17..19)
AUTH_SHA1, AUTH_SHA256 = 1, 3
INTEGRITY_SHA1_96, INTEGRITY_SHA256_128 = 1, 4
CONF_AES_CBC_128 = 1
#: suite id -> (auth, integrity, confidentiality)
SUITES = {
    3: (AUTH_SHA1, INTEGRITY_SHA1_96, CONF_AES_CBC_128),
    17: (AUTH_SHA256, INTEGRITY_SHA256_128, CONF_AES_CBC_128),
}
STATUS_UNAUTHORIZED_NAME = 0x0D
STATUS_NO_CIPHER_SUITE_MATCH = 0x11
STATUS_INSUFFICIENT_RESOURCES = 0x01  # RMCP+ open session: no free session slot
CC_OK, CC_INVALID_DATA, CC_PARAM_UNSUPPORTED = 0x00, 0xCC, 0x80
LAN_CHANNEL = 1
MAX_USERS = 16
PRIV_ADMIN = 4


@dataclasses.dataclass
class Faults:
    """Misbehaviour to inject, per BMC."""

    latency: float = 0.0  # seconds added before each answer
    drop: float = 0.0  # probability of dropping each incoming packet
    unresponsive: bool = False  # answer nothing at all
    sha1_only: bool = False  # refuse cipher suite 17 like older BMCs
    power_delay: float = 0.0  # seconds between a power command and the new state
    #: say nothing to a login as an unknown user (pyghmi's own server, many real BMCs)
    silent_unknown_user: bool = False
    #: answer this many Open Session Requests with "insufficient resources" (a full
    #: session table), then accept; -1: always
    refuse_sessions: int = 0


@dataclasses.dataclass
class User:
    name: str
    password: str
    enabled: bool = True
    privilege: int = PRIV_ADMIN


class UserTable:
    """IPMI user slots 1..16; slot 1 is the anonymous user and stays unnamed."""

    def __init__(self, users: list[tuple[str, str]]) -> None:
        self.slots: dict[int, User] = {}
        for slot, (name, password) in enumerate(users, start=2):
            self.slots[slot] = User(name, password)

    def get(self, name: str) -> str | None:
        """The ``authdata`` interface pyghmi's server expects: password by name."""
        for user in self.slots.values():
            if user.enabled and user.name == name:
                return user.password
        return None


@dataclasses.dataclass
class Machine:
    """The server behind the BMC: power and boot flags."""

    power: str = "off"
    bootdev: str = "default"
    bootdev_persistent: bool = False
    bootdev_uefi: bool = False


PowerHook = Callable[["SimBmc", str], None]


class SimSession(serversession.ServerSession):
    """A server-side RMCP+ session that honours the negotiated suite."""

    def __new__(cls, *args, **kwargs):  # pyghmi's __new__ does not take our keyword
        return object.__new__(cls)

    def __init__(self, *args, suite: int, **kwargs) -> None:
        self.suite = suite
        self.hashlib = hashlib.sha256 if suite == 17 else hashlib.sha1
        super().__init__(*args, **kwargs)

    def create_open_session_response(self, request):
        response = super().create_open_session_response(request)
        auth, integrity, conf = SUITES[self.suite]
        # pyghmi answers with SHA-1 algorithms; put the negotiated ones in place.
        response[16], response[24], response[32] = auth, integrity, conf
        return response

    def close_server_session(self):
        self.bmc.sessions.pop(self.sockaddr, None)

    def _got_rakp1(self, data):
        self.Rm = data[8:24]
        self.rolem = data[24]
        self.maxpriv = self.rolem & 0b111
        self.username = bytes(data[28 : 28 + data[27]])
        password = self.authdata.get(self.username.decode("utf-8", "replace"))
        if not self.username or password is None:
            if self.bmc.faults.silent_unknown_user:
                return  # no RAKP2 at all: the client waits until it gives up
            refusal = bytearray([data[0], STATUS_UNAUTHORIZED_NAME, 0, 0]) + self.clientsessionid
            self.send_payload(refusal, ipmi_constants.payload_types["rakp2"], retry=False)
            return
        self.uuiddata = self.uuid.bytes
        self.Rc = os.urandom(16)
        self.kuid = password.encode("utf-8")
        if self.kg is None:
            self.kg = self.kuid
        hmacdata = (
            self.clientsessionid
            + self.managedsessionid
            + self.Rm
            + self.Rc
            + self.uuiddata
            + bytearray([self.rolem, len(self.username)])
            + self.username
        )
        authcode = hmac.new(self.kuid, bytes(hmacdata), self.hashlib).digest()
        message = (
            bytearray([data[0], 0, 0, 0])
            + self.clientsessionid
            + self.Rc
            + self.uuiddata
            + authcode
        )
        self.send_payload(message, ipmi_constants.payload_types["rakp2"], retry=False)

    def _got_rakp3(self, data):
        if not hasattr(self, "kuid"):
            return
        namepart = struct.pack("2B", self.rolem, len(self.username)) + self.username
        expected = hmac.new(
            self.kuid, bytes(self.Rc + self.clientsessionid) + namepart, self.hashlib
        ).digest()
        if bytes(data[8:]) != expected or data[1] != 0:
            return  # a bad RAKP3 is dropped; the client times out
        self.sik = hmac.new(self.kg, bytes(self.Rm + self.Rc) + namepart, self.hashlib).digest()
        self.k1 = hmac.new(self.sik, b"\x01" * 20, self.hashlib).digest()
        self.k2 = hmac.new(self.sik, b"\x02" * 20, self.hashlib).digest()
        self.aeskey = self.k2[0:16]
        self.localsid = struct.unpack("<I", self.managedsessionid)[0]
        self.ipmicallback = self.handle_client_request
        self._send_rakp4(data[0], 0)

    def _send_rakp4(self, tagvalue, statuscode):
        icvlen = 16 if self.suite == 17 else 12
        payload = bytearray([tagvalue, statuscode, 0, 0]) + self.clientsessionid
        icvdata = bytes(self.Rm + self.managedsessionid + self.uuiddata)
        payload += hmac.new(self.sik, icvdata, self.hashlib).digest()[:icvlen]
        self.send_payload(payload, ipmi_constants.payload_types["rakp4"], retry=False)
        self.confalgo = "aes"
        self.integrityalgo = "sha256" if self.suite == 17 else "sha1"
        self.currhashlib = self.hashlib
        self.currhashlen = icvlen
        self.sequencenumber = 1
        self.sessionid = struct.unpack("<I", bytes(self.clientsessionid))[0]


class SimBmc(pyghmi_bmc.Bmc):
    """One simulated BMC endpoint. Construct through ``BmcSimulator``."""

    def __init__(
        self,
        *,
        address: str,
        port: int,
        guid: uuid.UUID,
        mac: str,
        users: UserTable,
        defer: Callable[..., None],
        machine: Machine | None = None,
        faults: Faults | None = None,
        manufacturer_id: int = 0xA0A0,
        product_id: int = 0x0001,
        firmware: tuple[int, int] = (1, 2),
        fru: dict[str, str] | None = None,
        power_hook: PowerHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address
        self.users = users
        self.machine = machine or Machine()
        self.faults = faults or Faults()
        self.mac = mac
        self.power_hook = power_hook
        self.sessions: dict[tuple, SimSession] = {}
        self._defer = defer
        self._rng = rng or random.Random()
        self._fru = build_fru(fru or {})
        # What pyghmi's IpmiServer.__init__ sets, minus its socket: that one would
        # join pyghmi's global IO thread, which routes server sessions by
        # (client, port) and mixes up BMCs that share a port. We own the socket
        # and the routing (``datagram``) instead.
        self.authdata = users
        self.uuid = guid
        self.port = port
        self.kg = None
        self.timeout = 60
        self.pktqueue = collections.deque()
        self.revision, self.deviceid, self.ipmiversion, self.additionaldevices = 0, 0x20, 2, 0
        self.firmwaremajor, self.firmwareminor = firmware
        self.mfgid, self.prodid = manufacturer_id, product_id
        # channel 1, IPMI 2.0 only, per-message auth off, IPMI 2.0 extended capabilities
        self.authcap = struct.pack("9B", 0, LAN_CHANNEL, 0x80, 0x04, 0x02, 0, 0, 0, 0)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.serversocket = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.serversocket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.serversocket.bind((address, port))
        except OSError:
            self.serversocket.close()
            raise

    def close(self) -> None:
        self.serversocket.close()

    # -- packet routing -------------------------------------------------------------

    def datagram(self, data: bytes, sockaddr) -> None:
        """Entry point for every datagram this BMC's socket receives."""
        self.defer(self._route, bytearray(data), sockaddr)

    def _route(self, data: bytearray, sockaddr) -> None:
        if len(data) < 14 or data[:4] != b"\x06\x00\xff\x07":
            return
        if data[4] != 6:  # IPMI 1.5 framing: only sessionless requests are served
            super().sessionless_data(data, sockaddr)
            return
        if len(data) < 16:
            return
        ptype = data[5] & 0x3F
        if ptype == ipmi_constants.payload_types["rmcpplusopenreq"]:
            self._open_session(data, sockaddr)
            return
        in_session = ptype in (0x12, 0x14) or data[6:10] != b"\x00\x00\x00\x00"
        session = self.sessions.get(sockaddr)
        if in_session and session is not None:
            session._handle_ipmi_packet(data, sockaddr=sockaddr)
        elif not in_session:
            super().sessionless_data(data, sockaddr)

    # -- fault injection and deferral -------------------------------------------

    def _dropped(self) -> bool:
        return self.faults.unresponsive or (
            self.faults.drop > 0 and self._rng.random() < self.faults.drop
        )

    def defer(self, fn: Callable[..., object], *args, **kwargs) -> None:
        """Run ``fn`` now, later (latency) or never (drop), per the faults."""
        if self._dropped():
            return
        self._defer(self.faults.latency, fn, *args, **kwargs)

    # -- sessions -----------------------------------------------------------------

    def _open_session(self, data: bytearray, sockaddr) -> None:
        request = data[16:]
        if len(request) < 32:
            return
        proposal = (request[12], request[20], request[28])
        suite = next((s for s, algs in SUITES.items() if algs == proposal), None)
        if suite is None or (suite == 17 and self.faults.sha1_only):
            self._refuse_open(request, sockaddr, STATUS_NO_CIPHER_SUITE_MATCH)
            return
        if self.faults.refuse_sessions:
            if self.faults.refuse_sessions > 0:
                self.faults.refuse_sessions -= 1
            self._refuse_open(request, sockaddr, STATUS_INSUFFICIENT_RESOURCES)
            return
        self.sessions[sockaddr] = SimSession(
            self.authdata,
            self.kg,
            sockaddr,
            self.serversocket,
            request,
            self.uuid,
            bmc=self,
            suite=suite,
        )
        # pyghmi's session registers itself in a global routing table we do not use
        ipmisession.Session.bmc_handlers.get(sockaddr, {}).pop(self.port, None)

    def _refuse_open(self, request: bytearray, sockaddr, status: int) -> None:
        payload = bytes([request[0], status, 0, 0]) + bytes(request[4:8])
        header = struct.pack(
            "<4sBBIIH",
            b"\x06\x00\xff\x07",
            6,
            ipmi_constants.payload_types["rmcpplusopenresponse"],
            0,
            0,
            len(payload),
        )
        ipmisession._io_sendto(self.serversocket, header + payload, sockaddr)

    def send_cipher_suites(self, myaddr, mylun, clientaddr, clientlun, clientseq, data, sockaddr):
        records = bytearray([0xC0, 3, AUTH_SHA1, 0x40 | INTEGRITY_SHA1_96, 0x80 | CONF_AES_CBC_128])
        if not self.faults.sha1_only:
            records += bytes([0xC0, 17, AUTH_SHA256, 0x40 | INTEGRITY_SHA256_128, 0x80 | 1])
        list_index = data[22] & 0x3F if len(data) > 22 else 0
        body = bytes([CC_OK, LAN_CHANNEL]) + (bytes(records) if list_index == 0 else b"")
        head = bytes([clientaddr, (clientlun | (7 << 2)) & 0xFF])
        rq = bytes([myaddr, (mylun | (clientseq << 2)) & 0xFF, 0x54]) + body
        message = head + bytes([ipmisession._checksum(*head)]) + rq
        message += bytes([ipmisession._checksum(*rq)])
        header = struct.pack("<4sBBIIH", b"\x06\x00\xff\x07", 6, 0, 0, 0, len(message))
        ipmisession._io_sendto(self.serversocket, header + message, sockaddr)

    # -- power and boot (pyghmi's Bmc hooks) ---------------------------------------

    def get_system_guid(self):
        return _IpmiGuid(self.uuid)

    def get_power_state(self):
        return self.machine.power

    def _set_power(self, state: str) -> None:
        def apply() -> None:
            changed = self.machine.power != state
            self.machine.power = state
            if self.power_hook and (changed or state == "reset"):
                self.power_hook(self, state)

        self._defer(self.faults.power_delay, apply)

    def power_on(self):
        self._set_power("on")

    def power_off(self):
        self._set_power("off")

    def power_shutdown(self):
        self._set_power("off")

    def power_cycle(self):
        if self.machine.power != "on":
            return 0xD5  # not supported in present state, as real BMCs answer
        self.power_off()
        self._set_power("on")

    def power_reset(self):
        if self.power_hook:
            self.power_hook(self, "reset")

    def cold_reset(self):
        return 0

    def get_boot_device(self):
        return self.machine.bootdev

    def get_system_boot_options(self, request, session):
        if request["data"][0] != 5:
            return session.send_ipmi_response(code=CC_PARAM_UNSUPPORTED)
        m = self.machine
        code = {v: k for k, v in _BOOT_DEVICES.items()}.get(m.bootdev, 0)
        flags = 0b10000000 | (0b01000000 if m.bootdev_persistent else 0)
        flags |= 0b00100000 if m.bootdev_uefi else 0
        session.send_ipmi_response(data=[1, 5, flags, code << 2, 0, 0, 0])

    def set_system_boot_options(self, request, session):
        data = request["data"]
        if data[0] & 0x7F != 5:
            return session.send_ipmi_response()  # other parameters: accepted, ignored
        if len(data) < 3:
            return session.send_ipmi_response(code=CC_INVALID_DATA)
        device = _BOOT_DEVICES.get((data[2] >> 2) & 0b1111)
        if device is None:
            return session.send_ipmi_response(code=CC_INVALID_DATA)
        m = self.machine
        m.bootdev = device
        m.bootdev_persistent = bool(data[1] & 0b01000000)
        m.bootdev_uefi = bool(data[1] & 0b00100000)
        session.send_ipmi_response()

    # -- the commands pyghmi's server does not know -----------------------------------

    def handle_raw_request(self, request, session):
        handler = _EXTRA_COMMANDS.get((request["netfn"], request["command"]))
        if handler is None:
            return super().handle_raw_request(request, session)
        data = bytes(request["data"])
        try:
            code, reply = handler(self, data)
        except (IndexError, ValueError, struct.error):
            code, reply = CC_INVALID_DATA, b""
        session.send_ipmi_response(code=code, data=list(reply))

    def _channel_info(self, data: bytes) -> tuple[int, bytes]:
        channel = data[0] & 0x0F
        if channel not in (LAN_CHANNEL, 0x0E):
            return CC_INVALID_DATA, b""
        # 802.3 LAN medium, IPMB-1.0 protocol... multi-session, vendor IPMI
        return CC_OK, bytes([LAN_CHANNEL, 0x04, 0x01, 0x82, 0xF2, 0x1B, 0x00, 0x00, 0x00])

    def _lan_config(self, data: bytes) -> tuple[int, bytes]:
        param = data[1]
        if param == 5:  # MAC address
            return CC_OK, bytes([0x11]) + bytes.fromhex(self.mac.replace(":", ""))
        if param == 3:  # IP address
            try:
                packed = bytes(int(p) for p in self.address.split("."))
            except ValueError:
                packed = b"\x00" * 4
            return CC_OK, bytes([0x11]) + packed
        if param == 4:  # address source: static
            return CC_OK, bytes([0x11, 0x01])
        return CC_PARAM_UNSUPPORTED, b""

    def _set_user_access(self, data: bytes) -> tuple[int, bytes]:
        slot = data[1] & 0x3F
        user = self.users.slots.get(slot)
        if user is None:
            return CC_INVALID_DATA, b""
        user.privilege = data[2] & 0x0F
        return CC_OK, b""

    def _get_user_access(self, data: bytes) -> tuple[int, bytes]:
        slot = data[1] & 0x3F
        if not 1 <= slot <= MAX_USERS:
            return CC_INVALID_DATA, b""
        enabled = sum(1 for u in self.users.slots.values() if u.enabled)
        user = self.users.slots.get(slot)
        access = (0x10 | user.privilege) if user else 0x0F
        return CC_OK, bytes([MAX_USERS, 0x40 | enabled, 0x01, access])

    def _set_user_name(self, data: bytes) -> tuple[int, bytes]:
        slot = data[0] & 0x3F
        if not 2 <= slot <= MAX_USERS:
            return CC_INVALID_DATA, b""
        name = data[1:17].rstrip(b"\x00").decode("utf-8")
        user = self.users.slots.get(slot)
        if user is None:
            self.users.slots[slot] = User(name, "", enabled=False)
        else:
            user.name = name
        return CC_OK, b""

    def _get_user_name(self, data: bytes) -> tuple[int, bytes]:
        slot = data[0] & 0x3F
        if not 1 <= slot <= MAX_USERS:
            return CC_INVALID_DATA, b""
        user = self.users.slots.get(slot)
        return CC_OK, (user.name.encode() if user else b"").ljust(16, b"\x00")

    def _set_user_password(self, data: bytes) -> tuple[int, bytes]:
        slot, operation = data[0] & 0x3F, data[1] & 0x03
        width = 20 if data[0] & 0x80 else 16
        user = self.users.slots.get(slot)
        if user is None:
            return CC_INVALID_DATA, b""
        if operation == 0:
            user.enabled = False
        elif operation == 1:
            user.enabled = True
        elif operation == 2:
            user.password = data[2 : 2 + width].rstrip(b"\x00").decode("utf-8")
        elif user.password != data[2 : 2 + width].rstrip(b"\x00").decode("utf-8"):
            return 0x80, b""  # test password: mismatch
        return CC_OK, b""

    def _fru_info(self, data: bytes) -> tuple[int, bytes]:
        if data[0] != 0 or not self._fru:
            return 0xCB, b""  # requested data not present
        return CC_OK, struct.pack("<HB", len(self._fru), 0)

    def _fru_read(self, data: bytes) -> tuple[int, bytes]:
        fru_id, offset, count = struct.unpack("<BHB", data[:4])
        if fru_id != 0 or not self._fru:
            return 0xCB, b""
        chunk = self._fru[offset : offset + count]
        return CC_OK, bytes([len(chunk)]) + chunk


class _IpmiGuid:
    """pyghmi's server sends ``guid.bytes_le``; hand it the IPMI spec's order instead."""

    def __init__(self, value: uuid.UUID) -> None:
        self.bytes_le = encode_ipmi(value)


_BOOT_DEVICES = {0: "default", 1: "network", 2: "hd", 5: "optical", 6: "setup", 15: "floppy"}

_EXTRA_COMMANDS: dict[tuple[int, int], Callable[[SimBmc, bytes], tuple[int, bytes]]] = {
    (0x06, 0x42): SimBmc._channel_info,
    (0x06, 0x43): SimBmc._set_user_access,
    (0x06, 0x44): SimBmc._get_user_access,
    (0x06, 0x45): SimBmc._set_user_name,
    (0x06, 0x46): SimBmc._get_user_name,
    (0x06, 0x47): SimBmc._set_user_password,
    (0x0C, 0x02): SimBmc._lan_config,
    (0x0A, 0x10): SimBmc._fru_info,
    (0x0A, 0x11): SimBmc._fru_read,
}

"""IPMI over LAN (RMCP+, UDP 623) through pyghmi: primitives only.

Retries, waits and backoff are the base class's. pyghmi exceptions are
translated here, at the boundary, into the metalseed error tree; messages
name the BMC and never carry a password.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import pyghmi.exceptions as pyghmi_exc
from pyghmi.ipmi import command as ipmi_command
from pyghmi.ipmi.fru import FRU
from pyghmi.ipmi.private import session as ipmi_session

from ..errors import BmcAuthError, BmcCommandError, BmcError, BmcTimeout, BmcUnreachable
from ..guid import decode_system_guid
from ..models import BmcIdentity, Credential
from .base import BmcTarget, PowerDriver

NETFN_CHASSIS, NETFN_APP, NETFN_STORAGE, NETFN_TRANSPORT = 0x00, 0x06, 0x0A, 0x0C
CMD_GET_DEVICE_ID, CMD_GET_SYSTEM_GUID, CMD_GET_CHANNEL_INFO = 0x01, 0x37, 0x42
CMD_SET_USER_ACCESS, CMD_GET_USER_ACCESS = 0x43, 0x44
CMD_SET_USER_NAME, CMD_GET_USER_NAME, CMD_SET_USER_PASSWORD = 0x45, 0x46, 0x47
CMD_GET_LAN_CONFIG = 0x02
LAN_PARAM_MAC = 5
CURRENT_CHANNEL = 0x0E
PRIV_ADMIN = 4
FIRST_ROTATION_SLOT = 3  # slot 1 is anonymous, slot 2 is usually the factory admin

_AUTH_MESSAGES = ("Incorrect password", "Unauthorized name", "Invalid role", "Unauthorized role")


def translate(exc: BaseException, target: BmcTarget, doing: str) -> BmcError:
    """A pyghmi / socket exception as a metalseed error naming the BMC."""
    where = f"BMC {target.address}"
    if isinstance(exc, BmcError):
        return exc
    if isinstance(exc, socket.gaierror):
        return BmcUnreachable(f"{where}: cannot resolve address", node=target.label)
    if isinstance(exc, pyghmi_exc.IpmiException):
        text = str(exc.args[0]) if exc.args and exc.args[0] else ""
        code = getattr(exc, "ipmicode", 0) or None
        if any(m in text for m in _AUTH_MESSAGES):
            return BmcAuthError(
                f"{where} refused the login for user {target.credential.username!r}"
                " (wrong username or password)",
                node=target.label,
            )
        if not text or "timeout" in text.lower() or "no longer connected" in text:
            return BmcTimeout(f"{where}: no answer while trying to {doing}", node=target.label)
        return BmcCommandError(f"{where}: {doing} failed: {text}", node=target.label, code=code)
    if isinstance(exc, OSError):
        return BmcUnreachable(f"{where}: {exc.strerror or type(exc).__name__}", node=target.label)
    return BmcCommandError(
        f"{where}: {doing} failed unexpectedly ({type(exc).__name__})", node=target.label
    )


class _Conn:
    def __init__(self, target: BmcTarget, cmd: ipmi_command.Command) -> None:
        self.target = target
        self.cmd = cmd
        self.lan_channel: int | None = None


#: Longest pyghmi's client waits on its IO thread before looking again (seconds).
_PYGHMI_POLL = 0.02
_pyghmi_patched = False


def _bound_pyghmi_waits() -> None:
    """Work around lost wakeups in pyghmi 1.6's client under threads.

    A caller registers its wait with pyghmi's IO thread (``session._io_wait``)
    only after sending; a reply the IO thread receives in between is queued on
    the session but wakes nobody, so the caller sleeps until its retry timer
    (0.5-5 s) although the answer is there. Every wait in pyghmi's client goes
    through ``_io_wait`` and re-checks its queue when it returns, so capping
    each wait makes a lost wakeup cost at most ``_PYGHMI_POLL`` seconds.
    """
    global _pyghmi_patched
    if _pyghmi_patched:
        return
    original = ipmi_session._io_wait

    def bounded_io_wait(timeout, myaddr=None, evq=None):
        return original(min(timeout, _PYGHMI_POLL), myaddr, evq)

    ipmi_session._io_wait = bounded_io_wait
    _refuse_reentrant_commands()
    _one_session_table_lock()
    _pyghmi_patched = True


def _one_session_table_lock() -> None:
    """Make pyghmi 1.6's two session-table locks one, ending an ABBA deadlock.

    ``Session.awaitresponse`` holds ``WAITING_SESSIONS`` while it handles a
    timeout, and the retransmit it sends takes ``KEEPALIVE_SESSIONS``;
    ``send_payload`` in another thread holds ``KEEPALIVE_SESSIONS`` and takes
    ``WAITING_SESSIONS`` to register its wait. Two threads doing those at once
    deadlock every IPMI session in the process for good. Seen in the lab: the
    seed daemon netbooting 100 machines while the box was loaded stopped
    talking IPMI (py-spy: one thread in ``_timedout -> send_payload`` waiting
    for KEEPALIVE, the others on WAITING). Both are RLocks held only briefly;
    one reentrant lock for both tables cannot deadlock on lock order. pyghmi
    looks the module globals up at each use, so replacing them is enough.
    """
    ipmi_session.KEEPALIVE_SESSIONS = ipmi_session.WAITING_SESSIONS


_in_command = threading.local()


def _refuse_reentrant_commands() -> None:
    """Turn pyghmi 1.6's re-entrant relogin deadlock into a quick, retryable failure.

    When a command times out on an established session, pyghmi logs in again
    from inside that command's wait loop; the new login's RAKP4 handler sends
    Set Session Privilege Level -- a second command on the same session from
    the same thread, which waits for the first command (further down the very
    same stack) to finish. Seen against a lossy BMC: discovery hung for
    minutes -- and pyghmi runs that relogin while holding its global
    ``WAITING_SESSIONS`` lock, so every other session in the process stalled
    too. A nested command on a session this thread is already inside is
    refused instead, without touching any pyghmi lock (raising unwinds the
    outer frames, which release theirs); the error reads as a timeout, and the
    driver marks the session broken once it is outside pyghmi and logs in
    afresh on its retry.
    """
    original = ipmi_session.Session.raw_command

    def raw_command(self, *args, **kwargs):
        active = _in_command.__dict__.setdefault("sessions", set())
        if id(self) in active:
            self.metalseed_reentered = True  # see IpmiPowerDriver._raw
            raise pyghmi_exc.IpmiException(
                "timeout: the BMC session was re-established in the middle of a command"
            )
        active.add(id(self))
        try:
            return original(self, *args, **kwargs)
        finally:
            active.discard(id(self))

    ipmi_session.Session.raw_command = raw_command


class IpmiPowerDriver(PowerDriver):
    name = "ipmi"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        _bound_pyghmi_waits()

    # -- plumbing -------------------------------------------------------------

    def _connect(self, target: BmcTarget) -> _Conn:
        host, port = target.address.host, target.address.port
        user, password = target.credential.username, target.credential.password.reveal()
        try:
            cmd = ipmi_command.Command(bmc=host, userid=user, password=password, port=port)
        except Exception as exc:  # pyghmi raises several types; all are translated
            raise translate(exc, target, "log in") from None
        finally:
            # pyghmi 1.6 files a logging-in session under (host, str user, str password,
            # port, kg) but removes it under the bytes forms, so the entry outlives the
            # login and the next login to this BMC gets the dead session back. The
            # login above is synchronous and over: drop the entry ourselves.
            ipmi_session.Session.initting_sessions.pop((host, user, password, port, None), None)
        return _Conn(target, cmd)

    def _disconnect(self, conn: _Conn) -> None:
        try:
            conn.cmd.ipmi_session.logout()
        except Exception:  # logging out of a dead session is not an error worth raising
            pass

    def _raw(
        self, conn: _Conn, netfn: int, command: int, data: bytes = b"", doing: str = ""
    ) -> bytes:
        try:
            reply = conn.cmd.xraw_command(netfn, command, data=data, timeout=self.timeout)
        except Exception as exc:
            session = conn.cmd.ipmi_session
            if getattr(session, "metalseed_reentered", False):
                # refused mid-relogin (see _refuse_reentrant_commands): retire it here,
                # outside every pyghmi lock, so nothing keeps it alive
                session.metalseed_reentered = False
                with contextlib.suppress(Exception):
                    session._mark_broken()
            raise translate(exc, conn.target, doing or f"command {netfn:#x}/{command:#x}") from None
        return bytes(reply["data"])

    # -- primitives -----------------------------------------------------------

    def _get_power(self, conn: _Conn) -> str:
        data = self._raw(conn, NETFN_CHASSIS, 0x01, doing="read power state")
        return "on" if data and data[0] & 0x01 else "off"

    def _set_power(self, conn: _Conn, action: str) -> None:
        control = {"off": 0x00, "on": 0x01, "cycle": 0x02}[action]
        self._raw(conn, NETFN_CHASSIS, 0x02, bytes([control]), doing=f"power {action}")

    def _set_boot_device(self, conn: _Conn, device: str, persistent: bool) -> None:
        selector = {"pxe": 0x04, "disk": 0x08}[device]
        flags = 0x80 | (0x40 if persistent else 0x00)
        # parameter 5 (boot flags): valid, persistence; device selector in bits 5:2
        self._raw(
            conn,
            NETFN_CHASSIS,
            0x08,
            bytes([0x05, flags, selector, 0, 0, 0]),
            doing=f"set boot device {device}",
        )

    def _channel(self, conn: _Conn) -> int:
        if conn.lan_channel is None:
            try:
                info = self._raw(conn, NETFN_APP, CMD_GET_CHANNEL_INFO, bytes([CURRENT_CHANNEL]))
                conn.lan_channel = info[0] & 0x0F if info else 1
            except BmcCommandError:
                conn.lan_channel = 1
        return conn.lan_channel

    def _identify(self, conn: _Conn) -> BmcIdentity:
        dev = self._raw(conn, NETFN_APP, CMD_GET_DEVICE_ID, doing="read device id")
        guid_raw = self._raw(conn, NETFN_APP, CMD_GET_SYSTEM_GUID, doing="read system GUID")
        try:
            guid = decode_system_guid(guid_raw)
        except ValueError as exc:
            raise BmcCommandError(
                f"BMC {conn.target.address}: {exc}", node=conn.target.label
            ) from None
        mfg = int.from_bytes(dev[6:9], "little") if len(dev) >= 9 else 0
        product = struct.unpack("<H", dev[9:11])[0] if len(dev) >= 11 else 0
        firmware = f"{dev[2] & 0x7F}.{dev[3]:02x}" if len(dev) >= 4 else ""
        return BmcIdentity(
            guid=guid,
            manufacturer_id=mfg,
            product_id=product,
            firmware=firmware,
            mac=self._mac(conn),
            power=self._get_power(conn),
            fru=self._fru(conn),
        )

    def _mac(self, conn: _Conn) -> str | None:
        try:
            data = self._raw(
                conn,
                NETFN_TRANSPORT,
                CMD_GET_LAN_CONFIG,
                bytes([self._channel(conn), LAN_PARAM_MAC, 0, 0]),
            )
        except BmcCommandError:
            return None  # not every BMC answers; the MAC is nice to have
        mac = data[1:7]
        if len(mac) < 6 or not any(mac):
            return None  # an all-zero MAC (OpenIPMI's ipmi_sim) says "not configured"
        return ":".join(f"{b:02x}" for b in mac)

    def _fru(self, conn: _Conn) -> dict[str, str]:
        try:
            info = FRU(ipmicmd=conn.cmd, fruid=0).info or {}
        except Exception:  # FRU is optional and BMCs get it wrong in many ways
            return {}
        keys = {
            "Manufacturer": "manufacturer",
            "Product name": "product",
            "Serial Number": "serial",
            "Asset Number": "asset_tag",
            "Board manufacturer": "board_manufacturer",
            "Board serial number": "board_serial",
        }
        return {ours: str(info[theirs]) for theirs, ours in keys.items() if info.get(theirs)}

    def _ensure_user(self, conn: _Conn, credential: Credential) -> None:
        channel = self._channel(conn)
        access = self._raw(conn, NETFN_APP, CMD_GET_USER_ACCESS, bytes([channel, 1]))
        max_users = access[0] & 0x3F if access else 16
        names: dict[int, str] = {}
        for slot in range(1, max_users + 1):
            try:
                raw = self._raw(conn, NETFN_APP, CMD_GET_USER_NAME, bytes([slot]))
            except BmcCommandError:
                raw = b""
            names[slot] = raw.rstrip(b"\x00").decode("latin-1")
        slot = next((s for s, n in names.items() if n == credential.username), None)
        if slot is None:
            free = [s for s, n in names.items() if s >= FIRST_ROTATION_SLOT and not n]
            if not free:
                raise BmcCommandError(
                    f"BMC {conn.target.address}: no free user slot for {credential.username!r}",
                    node=conn.target.label,
                )
            slot = free[0]
            name = credential.username.encode().ljust(16, b"\x00")
            self._raw(conn, NETFN_APP, CMD_SET_USER_NAME, bytes([slot]) + name, doing="set user")
        password = credential.password.reveal().encode()
        if len(password) > 20:
            raise ValueError("IPMI passwords are at most 20 bytes")
        wide = len(password) > 16
        padded = password.ljust(20 if wide else 16, b"\x00")
        head = slot | (0x80 if wide else 0)
        self._raw(
            conn,
            NETFN_APP,
            CMD_SET_USER_PASSWORD,
            bytes([head, 0x02]) + padded,
            doing="set user password",
        )
        self._raw(conn, NETFN_APP, CMD_SET_USER_PASSWORD, bytes([slot, 0x01]), doing="enable user")
        # change bits, IPMI messaging on, this channel; admin privilege limit
        self._raw(
            conn,
            NETFN_APP,
            CMD_SET_USER_ACCESS,
            bytes([0x80 | 0x10 | channel, slot, PRIV_ADMIN, 0]),
            doing="set user access",
        )

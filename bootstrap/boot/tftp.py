"""TFTP for the iPXE binaries only: tftpy behind a strict front door.

Firmware PXE fetches one small file over TFTP (``undionly.kpxe``,
``ipxe.efi``, ``snponly.efi``); everything after that is HTTP. So this server
is read-only and serves regular files directly in one directory
(``BootConfig.ipxe_dir``), with the ``blksize`` and ``tsize`` options.

tftpy does the transfers (its contexts and states: options, OACK, DATA/ACK,
retransmission). We own what it is lax about:

* **The first datagram** of a transfer is judged here before tftpy sees it.
  tftpy would let a WRQ write into its root, accept any mode, follow symlinks
  out of its root, and end its whole loop on a non-ASCII name or
  ``blksize=x``. Here: WRQ and anything but one plain file name (``../``,
  ``/`` inside, backslash, dot files) -> "access violation"; missing or
  special files -> "file not found"; garbage and non-request opcodes ->
  logged and dropped. One leading ``/`` is tolerated (firmware sends
  ``/undionly.kpxe``), as in tftpd-hpa's ``-s`` root.
* **Symlinks** are followed when they stay in the directory, and for the iPXE
  boot files Debian's ``ipxe`` links out of it (``ipxe.efi -> /boot/ipxe.efi``).
* **The loop** (``_Server.listen``): epoll, one lookup per datagram, a
  timeout sweep four times a second, errors isolated per transfer, a wake-up
  pipe so ``stop()`` is immediate. tftpy's loop scans every session per
  packet, resends a stalled session's packet on every other session's ACK,
  and lets any exception end the server.
* **The hot path** (``_Context.cycle``): an expected ACK sends the next block
  directly; anything else goes through tftpy's states. Transfer sockets are
  bound to the service address and connected to the client: the kernel drops
  other peers and reports a vanished client (ICMP unreachable) at once.
  tftpy's loggers go to WARNING: it logs every packet at INFO.

Transfers are events: ``tftp.start`` / ``tftp.sent`` / ``tftp.error`` on the
node whose MAC ``mac_for(client ip)`` names, else a log line. Events are
recorded by a worker thread so a slow store never stalls a transfer.
``TftpService.start()`` and ``stop()`` are synchronous; the loop runs in a
thread.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import queue
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tftpy
from tftpy.TftpContexts import TftpContextServer
from tftpy.TftpPacketTypes import TftpPacketDAT, TftpPacketRRQ
from tftpy.TftpShared import TftpException, TftpTimeoutExpectACK
from tftpy.TftpStates import TftpStateExpectACK, TftpStateServerRecvRRQ

from ..errors import FatalError
from .backend import BootBackend

log = logging.getLogger(__name__)

#: iPXE binaries served even when they are symlinks out of the directory
#: (Debian's ipxe package: ipxe.efi -> /boot/ipxe.efi, ipxe.lkrn -> /boot/ipxe.lkrn)
IPXE_BOOT_FILES = frozenset(
    {"undionly.kpxe", "undionly.kkpxe", "ipxe.efi", "snponly.efi", "ipxe.pxe", "ipxe.lkrn"}
)
#: RFC 2348 bounds; tftpy allows 65536, which does not fit in a UDP datagram
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464
#: seconds without an answer before a packet is sent again, and how often
RETRANSMIT_SECONDS, RETRIES = 1.0, 5
_DATAGRAM = 65536
MacFor = Callable[[str], str | None]


class TftpError(FatalError):
    """The TFTP server could not start (no such directory, address in use)."""

    exit_code = 69  # EX_UNAVAILABLE


class Opcode(enum.IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(enum.IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    ILLEGAL_OPERATION = 4


# -- the front door (pure but for ``resolve``) -----------------------------------------


class BadDatagram(ValueError):
    """Not a TFTP request: dropped without an answer."""


class Refused(Exception):
    """A well-formed request we say no to, with a TFTP error."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Request:
    opcode: Opcode
    filename: str
    mode: str
    options: Mapping[str, str]


def parse_request(datagram: bytes) -> Request:
    """An RRQ or WRQ (RFC 1350, options RFC 2347); anything else is a ``BadDatagram``."""
    if len(datagram) < 4:
        raise BadDatagram("too short")
    (opcode,) = struct.unpack("!H", datagram[:2])
    if opcode not in (Opcode.RRQ, Opcode.WRQ):
        raise BadDatagram(f"opcode {opcode} does not start a transfer")
    if not datagram.endswith(b"\0"):
        raise BadDatagram("fields not NUL-terminated")
    fields = datagram[2:-1].split(b"\0")
    if len(fields) < 2 or len(fields) % 2:
        raise BadDatagram("malformed fields")
    try:
        text = [f.decode("ascii") for f in fields]
    except UnicodeDecodeError:
        raise BadDatagram("non-ASCII fields") from None
    if not text[0] or any(not ch.isprintable() for ch in "".join(text)):
        raise BadDatagram("empty or unprintable fields")
    options = {text[i].lower(): text[i + 1] for i in range(2, len(text), 2)}
    return Request(Opcode(opcode), text[0], text[1].lower(), options)


def negotiate(options: Mapping[str, str]) -> dict[str, str]:
    """The options we answer: ``blksize`` (clamped) and ``tsize``; the rest are ignored."""
    accepted = {}
    blksize = options.get("blksize", "")
    if blksize.isdigit():
        accepted["blksize"] = str(min(max(int(blksize), MIN_BLKSIZE), MAX_BLKSIZE))
    if options.get("tsize", "").isdigit():
        accepted["tsize"] = "0"  # tftpy fills in the size
    return accepted


def check_request(request: Request) -> None:
    """Refuse what this server never does: writes, and modes other than octet."""
    if request.opcode is Opcode.WRQ:
        raise Refused(ErrorCode.ACCESS_VIOLATION, "read-only server")
    if request.mode != "octet":
        raise Refused(ErrorCode.NOT_DEFINED, "only octet (binary) mode is served")


def resolve(root: Path, filename: str) -> Path:
    """The file ``filename`` names directly in ``root``, or ``Refused``."""
    name = filename[1:] if filename.startswith("/") else filename
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise Refused(ErrorCode.ACCESS_VIOLATION, "only files directly in the boot directory")
    root = root.resolve()
    path = root / name
    try:
        link = path.lstat()
        target = path.resolve(strict=True)
        mode = target.stat().st_mode
    except (OSError, RuntimeError):
        raise Refused(ErrorCode.FILE_NOT_FOUND, "file not found") from None
    if stat.S_ISLNK(link.st_mode) and target.parent != root and name not in IPXE_BOOT_FILES:
        raise Refused(ErrorCode.ACCESS_VIOLATION, "link out of the boot directory")
    if not stat.S_ISREG(mode):
        raise Refused(ErrorCode.FILE_NOT_FOUND, "file not found")
    return target


def error_packet(code: ErrorCode, message: str) -> bytes:
    return struct.pack("!HH", Opcode.ERROR, code) + message.encode("ascii", "replace") + b"\0"


# -- tftpy, tightened --------------------------------------------------------------------


class _Context(TftpContextServer):
    """One transfer. ``cycle`` short-cuts the expected ACK; the rest is tftpy's."""

    def __init__(self, host: str, port: int, *, path: Path) -> None:
        super().__init__(
            host, port, RETRANSMIT_SECONDS, str(path.parent), retries=RETRIES, flock=False
        )
        self.path = path
        self._blksize = 0

    # tftpy keeps the last packet sent (to resend it) as a packet object; building one
    # per block costs more than sending it, so the hot path keeps (block, data) and
    # the object is made only when tftpy asks for it
    @property
    def last_pkt(self) -> Any:
        if self._last_block is not None:
            block, data = self._last_block
            packet = TftpPacketDAT()
            packet.blocknumber, packet.data = block, data
            packet.buffer = struct.pack("!HH", Opcode.DATA, block) + data
            self._last_packet, self._last_block = packet, None
        return self._last_packet

    @last_pkt.setter
    def last_pkt(self, packet: Any) -> None:
        self._last_packet, self._last_block = packet, None

    def cycle(self) -> None:
        try:
            buffer = self.sock.recv(_DATAGRAM)  # connected: only the client's TID gets here
        except (BlockingIOError, InterruptedError):
            return
        self.last_update = time.time()
        self.retry_count = 0
        if (
            len(buffer) == 4
            and buffer[1] == Opcode.ACK
            and buffer[0] == 0
            and isinstance(self.state, TftpStateExpectACK)
            and int.from_bytes(buffer[2:4], "big") == self.next_block
        ):
            if self.pending_complete:
                self.state = None  # the ACK of the last block: done
                return
            self.next_block += 1
            self.pending_complete = self._send_block()
            return
        self.state = self.state.handle(self.factory.parse(buffer), self.host, self.tidport)

    def _send_block(self) -> bool:
        """Send the next DATA block (what tftpy's ``sendDAT`` does, minus its logging)."""
        blksize = self._blksize or self.getBlocksize()  # fixed once options are agreed
        self._blksize = blksize
        block = self.next_block
        data = self.fileobj.read(blksize)
        self.sock.send(struct.pack("!HH", Opcode.DATA, block) + data)
        self.metrics.bytes += len(data)
        self.metrics.last_dat_time = self.last_update
        self._last_block = (block, data)
        return len(data) < blksize


Emit = Callable[[str, str, str, Mapping[str, Any]], None]  # ip, kind, message, data


class _Server(tftpy.TftpServer):
    """tftpy's server with our front door and loop; ``stop(now=...)`` as tftpy's."""

    def __init__(self, root: Path, address: str, port: int, emit: Emit) -> None:
        super().__init__(str(root), upload_open=_refuse_upload)
        self.root_path = root
        self.address = address
        self.emit = emit
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((address, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.listenip, self.listenport = self.sock.getsockname()
        self._wake_r, self._wake_w = os.pipe()
        self._selector = selectors.DefaultSelector()

    def stop(self, now: bool = False) -> None:
        super().stop(now)
        os.write(self._wake_w, b"x")

    def listen(self, *_args: Any, **_kwargs: Any) -> None:
        sel = self._selector
        sel.register(self.sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.is_running.set()
        sweep = time.monotonic()
        try:
            while not self.shutdown_immediately:
                if self.shutdown_gracefully and not self.sessions:
                    break
                for key, _ in sel.select(0.25):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        os.read(self._wake_r, 64)
                    else:
                        self._step(key.data)
                if time.monotonic() - sweep >= 0.25:
                    sweep = time.monotonic()
                    self._sweep(time.time())
        finally:
            for key in list(self.sessions):
                self._finish(key, "tftp.error", "aborted: server stopping")
            self.is_running.clear()

    def close(self) -> None:
        """Release the sockets and the wake-up pipe, once ``listen`` has returned."""
        self._selector.close()
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _accept(self) -> None:
        for _ in range(64):  # drain a burst, then let the sessions run
            try:
                datagram, (ip, port) = self.sock.recvfrom(_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                log.debug("tftp: main socket: %s", exc)
                continue
            if self.shutdown_gracefully:
                continue
            self._request(datagram, ip, port)

    def _request(self, datagram: bytes, ip: str, port: int) -> None:
        key = f"{ip}:{port}"
        if key in self.sessions:
            return  # a retransmitted request; the session answers it
        try:
            request = parse_request(datagram)
        except BadDatagram as exc:
            log.warning("tftp: dropped a bad datagram from %s (%s)", key, exc)
            return
        try:
            check_request(request)
            path = resolve(self.root_path, request.filename)
        except Refused as exc:
            self._refuse(ip, port, exc, request)
            return
        options = negotiate(request.options)
        context = _Context(ip, port, path=path)
        try:
            context.sock.bind((self.address, 0))  # answer from the address we serve on
            context.sock.setblocking(False)
            rrq = TftpPacketRRQ()
            rrq.filename, rrq.mode, rrq.options = path.name, "octet", options
            context.metrics.start_time = context.last_update = time.time()
            # tftpy opens the checked path (root = its directory, name = its name)
            context.state = TftpStateServerRecvRRQ(context).handle(rrq, ip, port)
            # connected: the kernel drops other peers' datagrams, routes once, and
            # reports a vanished client (ICMP port unreachable) as ECONNREFUSED
            context.sock.connect((ip, port))
        except (TftpException, OSError) as exc:
            log.warning("tftp: %s for %s failed to start: %s", request.filename, key, exc)
            context.end()
            return
        self.sessions[key] = context
        self._selector.register(context.sock, selectors.EVENT_READ, key)
        blksize = int(context.options.get("blksize", 512)) if context.options else 512
        self.emit(
            ip, "tftp.start", f"TFTP {path.name} started", {"file": path.name, "blksize": blksize}
        )

    def _refuse(self, ip: str, port: int, exc: Refused, request: Request) -> None:
        name = request.filename[:100]
        log.warning("tftp: refused %s %r from %s:%d: %s", request.opcode.name, name, ip, port, exc)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((self.address, 0))
                sock.sendto(error_packet(exc.code, exc.message), (ip, port))
            except OSError as err:
                log.debug("tftp: error to %s:%d not sent: %s", ip, port, err)
        data = {"file": name, "op": request.opcode.name, "error": exc.message}
        self.emit(
            ip, "tftp.error", f"TFTP {request.opcode.name} {name} refused: {exc.message}", data
        )

    def _step(self, key: str) -> None:
        context = self.sessions.get(key)
        if context is None:
            return
        try:
            context.cycle()
        except TftpTimeoutExpectACK:
            context.timeout_expectACK = True  # a duplicate ACK after a timeout: resend now
            self._sweep(time.time())
            return
        except TftpException as exc:
            self._finish(key, "tftp.error", f"failed: {exc}")
            return
        except (OSError, ValueError, struct.error) as exc:
            # the peer went away (ICMP port unreachable) or sent something tftpy chokes on
            self._finish(key, "tftp.error", f"failed: {exc}")
            return
        if context.state is None:
            self._finish(key, "tftp.sent", "sent")

    def _sweep(self, now: float) -> None:
        for key, context in list(self.sessions.items()):
            if now - context.last_update < context.timeout and not context.timeout_expectACK:
                continue
            context.timeout_expectACK = False
            context.retry_count += 1
            if context.retry_count > context.retries:
                self._finish(key, "tftp.error", f"timed out after {context.retries} retries")
                continue
            context.last_update = now  # next retransmission one timeout from now
            try:
                context.state.resendLast()
            except (TftpException, OSError) as exc:
                self._finish(key, "tftp.error", f"failed: {exc}")

    def _finish(self, key: str, kind: str, outcome: str) -> None:
        context = self.sessions.pop(key)
        try:
            self._selector.unregister(context.sock)
        except (KeyError, ValueError):
            pass
        context.end()
        m = context.metrics
        data = {"file": context.path.name, "bytes": m.bytes, "seconds": round(m.duration, 3)}
        ip = context.host
        self.emit(ip, kind, f"TFTP {context.path.name} {outcome} ({m.bytes} bytes)", data)


def _refuse_upload(path: str, context: Any) -> None:
    """tftpy's upload hook: never reached (WRQs stop at the front door), and never writes."""
    log.warning("tftp: upload to %s refused", path)
    return None


# -- the service -----------------------------------------------------------------------


class TftpService:
    """The TFTP server in a thread. ``start()`` binds (errors surface here); ``stop()`` joins."""

    def __init__(
        self,
        root: Path,
        backend: BootBackend,
        *,
        address: str,
        port: int,
        mac_for: MacFor | None = None,
    ) -> None:
        self.root = Path(root)
        self.backend = backend
        self.address = address
        self.port = port
        self.mac_for = mac_for
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._events: queue.Queue[tuple[str, str, str, Mapping[str, Any]] | None] = queue.Queue(
            maxsize=10000
        )
        self._recorder: threading.Thread | None = None

    def start(self) -> None:
        if not self.root.is_dir():
            raise TftpError(f"TFTP directory {self.root} does not exist")
        tftpy_log = logging.getLogger("tftpy")
        if tftpy_log.getEffectiveLevel() < logging.WARNING:
            tftpy_log.setLevel(logging.WARNING)  # tftpy logs every packet at INFO
        try:
            server = _Server(self.root, self.address, self.port, self._emit)
        except TftpException as exc:
            raise TftpError(f"TFTP directory {self.root}: {exc}") from None
        except OSError as exc:
            raise TftpError(
                f"cannot serve TFTP on {self.address}:{self.port}: {exc.strerror}"
            ) from None
        self._server = server
        self.port = server.listenport
        self._recorder = threading.Thread(
            target=self._record_events, name="tftp-events", daemon=True
        )
        self._recorder.start()
        self._thread = threading.Thread(target=server.listen, name="tftp", daemon=True)
        self._thread.start()
        log.info("TFTP server on %s:%d serving %s", self.address, self.port, self.root)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop at once: transfers in flight are dropped (firmware retries)."""
        if self._server is not None and self._thread is not None:
            self._server.stop(now=True)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("TFTP server thread did not stop within %.0f s", timeout)
            else:
                self._server.close()
        if self._recorder is not None:
            try:
                self._events.put(None, timeout=timeout)  # after the events already queued
            except queue.Full:
                log.error("TFTP events not recorded: the recorder is stuck")
            self._recorder.join(timeout)
        self._server = self._thread = self._recorder = None

    def _emit(self, ip: str, kind: str, message: str, data: Mapping[str, Any]) -> None:
        try:
            self._events.put_nowait((ip, kind, message, data))
        except queue.Full:
            log.warning("tftp: event queue full, dropped %s from %s", kind, ip)

    def _record_events(self) -> None:
        while (item := self._events.get()) is not None:
            ip, kind, message, data = item
            try:
                mac = self.mac_for(ip) if self.mac_for is not None else None
                if mac is None:
                    log.info("%s from %s (MAC unknown)", message, ip)
                else:
                    self.backend.record(mac, kind, message, {"ip": ip, **data})
            except Exception:  # noqa: BLE001 -- a failing event must never stop the recorder
                log.exception("tftp: event %s from %s not recorded", kind, ip)

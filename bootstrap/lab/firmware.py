"""A PXE firmware emulator for one lab machine: the real network boot, step by step.

Given an interface, a MAC and an SMBIOS UUID, inside the current network
namespace, ``Firmware.run()`` does what a PC's PXE ROM and then iPXE do:

1. DHCP as PXE firmware (option 60 ``PXEClient:Arch:00000:UNDI:002001``, 93,
   94, 97 in SMBIOS byte order, 55) from the machine's own MAC on a raw
   socket (``firmware_dhcp.DhcpPort``, shared by every machine on the
   interface);
2. the leased address goes on the interface (``ip addr add``; an extra
   address when machines share it);
3. TFTP of the boot file from the lease's next server with tftpy, blksize 1432
   as iPXE asks, from the leased address;
4. DHCP again as iPXE (user class ``iPXE``, option 175) for the script URL;
5. HTTP for the script, then the script runs in ``ipxe.Interpreter`` with
   this class as its actions: kernel and initrd downloads, and at ``boot``
   the ``metalseed.rootfs`` of the kernel command line, each checked against
   the sha256 of the server's ETag (and the rootfs also against
   ``metalseed.rootfs_sha256``). A mismatch fails the command, so the
   script's own ``|| goto failed`` path runs, as on a real machine.

What booting means is the machine kind's business: the ``on_boot`` hook gets
a ``BootContext`` once the downloads are verified (the fake kind enlists,
the netns kind starts the image). ``run()`` returns a ``FirmwareResult``:
leases, files (name, size, sha256), the kernel command line (also as a
dict), a timing per step, and the outcome. Powering the machine off is
``cancel.set()``: every wait notices it. No I/O at import or in constructors;
``python -m bootstrap.lab.firmware`` boots one machine and prints the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import io
import json
import logging
import random
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..agent.cmdline import cmdline_values
from ..errors import FatalError
from .firmware_dhcp import (
    IPXE_TIMING,
    PXE_TIMING,
    AddressError,
    Cancelled,
    DhcpFailed,
    DhcpPort,
    Exchange,
    Lease,
    Timing,
    add_address,
    ipxe_options,
    pxe_options,
    remove_address,
)
from .ipxe import CommandFailed, Image, Interpreter, IpxeError

log = logging.getLogger(__name__)

IPXE_BLKSIZE = 1432
CHUNK = 1 << 20
MAX_SCRIPT = 1 << 20
USER_AGENT = "iPXE/1.21.1+ (metalseed lab firmware)"
SECRET_PARAMS = ("metalseed.token",)
MASK = "********"


class FirmwareError(FatalError):
    """The network boot cannot go on (no boot file, TFTP failed, no script URL)."""


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """A file the firmware downloaded and verified."""

    name: str
    url: str
    size: int
    sha256: str
    seconds: float
    path: str | None = None  # where it was kept (None: hashed and dropped)
    verified: tuple[str, ...] = ()  # what it was checked against: "etag", "cmdline"


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    start: float  # seconds after power-on
    seconds: float
    ok: bool = True
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Options:
    """How the emulated firmware behaves; the defaults are a real machine's."""

    arch: int = 0  # option 93: 0 BIOS, 7 UEFI
    download_dir: Path | None = None  # keep the files here (None: hash and drop them)
    fetch_rootfs: bool = True
    pxe_timing: Timing = PXE_TIMING
    ipxe_timing: Timing = IPXE_TIMING
    tftp_timeout: float = 5.0
    tftp_retries: int = 3
    http_timeout: float = 30.0
    sleep_scale: float = 1.0  # the script's ``sleep N`` waits N * this
    max_chains: int = 16
    poweroff: bool = False  # Debian's iPXE build has no ``poweroff``


@dataclasses.dataclass
class FirmwareResult:
    mac: str
    uuid: str
    interface: str
    outcome: str = "running"  # booted, exited, poweroff, failed, cancelled
    attempt: int = 1  # which boot since power-on
    error: str | None = None
    pxe_lease: Lease | None = None
    lease: Lease | None = None
    ipxe_binary: FileRecord | None = None
    scripts: list[str] = dataclasses.field(default_factory=list)
    files: list[FileRecord] = dataclasses.field(default_factory=list)
    cmdline: str = ""
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    steps: list[Step] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    echoes: list[str] = dataclasses.field(default_factory=list)
    boot: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the hook reports

    def seconds(self, name: str) -> float:
        return sum(s.seconds for s in self.steps if s.name == name)

    @property
    def total(self) -> float:
        return max((s.start + s.seconds for s in self.steps), default=0.0)

    def to_json(self, *, reveal: bool = False) -> dict[str, Any]:
        """As JSON; the token masked unless ``reveal`` (the machine's secret, not the log's)."""
        data = dataclasses.asdict(self)
        data["total"] = round(self.total, 4)
        for key in SECRET_PARAMS:
            secret = data["params"].get(key)
            if secret and not reveal:
                data["params"][key] = MASK
                data["cmdline"] = data["cmdline"].replace(f"{key}={secret}", f"{key}={MASK}")
        return data


@dataclasses.dataclass(frozen=True)
class BootContext:
    """What the machine kind's boot hook gets: verified downloads and the command line."""

    firmware: Firmware
    result: FirmwareResult
    kernel: Image
    initrds: tuple[Image, ...]
    rootfs: FileRecord | None
    cmdline: str
    params: dict[str, str]

    @property
    def source_ip(self) -> str:
        assert self.result.lease is not None
        return self.result.lease.ip


BootHook = Callable[[BootContext], None]


def etag_sha256(etag: str | None) -> str | None:
    """``"<64 hex>"`` (or ``W/"..."``) -> the digest; anything else -> None."""
    if not etag:
        return None
    value = etag.strip().removeprefix("W/").strip('"').lower()
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


class Firmware:
    """One machine's network boot on ``port``; ``run()`` does it, once per power-on."""

    def __init__(
        self,
        port: DhcpPort,
        mac: str,
        uuid: str,
        *,
        options: Options = Options(),
        on_boot: BootHook | None = None,
        cancel: threading.Event | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port = port
        self.mac = mac.lower()
        self.uuid = uuid
        self.options = options
        self.on_boot = on_boot
        self.cancel = cancel or threading.Event()
        self.rng = rng or random.Random()
        self.clock = clock
        self.result = FirmwareResult(self.mac, uuid, port.interface)
        self._t0 = 0.0

    # -- the flow -----------------------------------------------------------------------------

    def run(self) -> FirmwareResult:
        result = self.result
        self._t0 = self.clock()
        interpreter: Interpreter | None = None
        try:
            opts = self.options
            pxe = self._timed("dhcp-pxe", lambda: self._dhcp(pxe_options(self.uuid, opts.arch)))
            result.pxe_lease = result.lease = pxe
            self._timed("address", lambda: add_address(self.port.interface, pxe.cidr), pxe.cidr)
            result.ipxe_binary = self._timed("tftp", lambda: self._tftp(pxe), pxe.bootfile)
            options = ipxe_options(self.uuid, opts.arch, self.mac)
            lease = self._timed("dhcp-ipxe", lambda: self._dhcp(options, opts.ipxe_timing))
            if lease.cidr != pxe.cidr:
                remove_address(self.port.interface, pxe.cidr)
                add_address(self.port.interface, lease.cidr)
            result.lease = lease
            if not lease.bootfile.startswith(("http://", "https://")):
                raise FirmwareError(f"iPXE got no script URL, but {lease.bootfile!r}")
            settings = {"mac": self.mac, "uuid": self.uuid, "ip": lease.ip}
            interpreter = Interpreter(self, settings, max_chains=opts.max_chains)
            result.outcome = str(interpreter.run_url(lease.bootfile).status)
        except Cancelled:
            result.outcome = "cancelled"
        except (FirmwareError, DhcpFailed, AddressError, IpxeError, CommandFailed) as exc:
            result.outcome, result.error = "failed", str(exc)
            log.warning("%s: network boot failed: %s", self.mac, exc)
        finally:
            if interpreter is not None:
                result.failures = list(interpreter.failures)
        return result

    def release(self) -> None:
        """Power-off: the machine's address leaves the interface."""
        if self.result.lease is not None:
            remove_address(self.port.interface, self.result.lease.cidr)

    def _timed(self, name: str, fn: Callable[[], Any], detail: str = "") -> Any:
        start = self.clock()
        try:
            value = fn()
        except BaseException as exc:
            self._step(name, start, False, f"{detail}: {exc}" if detail else str(exc))
            raise
        self._step(name, start, True, detail)
        return value

    def _step(self, name: str, start: float, ok: bool, detail: str) -> None:
        step = Step(name, round(start - self._t0, 4), round(self.clock() - start, 4), ok, detail)
        self.result.steps.append(step)

    def _dhcp(self, options, timing: Timing | None = None) -> Lease:
        timing = timing or self.options.pxe_timing
        lease = Exchange(
            self.port, self.mac, options, timing,
            rng=self.rng, cancelled=self.cancel.is_set, clock=self.clock,
        ).run()  # fmt: skip
        if not lease.bootfile:
            raise FirmwareError(f"the DHCP answer for {self.mac} names no boot file")
        return lease

    def _tftp(self, lease: Lease) -> FileRecord:
        import tftpy  # tftpy logs every packet at INFO
        from tftpy.TftpShared import TftpException

        logging.getLogger("tftpy").setLevel(logging.WARNING)
        start = self.clock()
        buffer = io.BytesIO()
        name = lease.bootfile
        try:
            client = tftpy.TftpClient(
                lease.next_server, 69, options={"blksize": IPXE_BLKSIZE}, localip=lease.ip
            )
            opts = self.options
            client.download(name, buffer, timeout=opts.tftp_timeout, retries=opts.tftp_retries)
        except (TftpException, OSError) as exc:
            raise FirmwareError(f"TFTP {name} from {lease.next_server}: {exc}") from None
        data = buffer.getvalue()
        if self.cancel.is_set():
            raise Cancelled()
        path = self._keep(Path(name).name, data)
        url = f"tftp://{lease.next_server}/{name}"
        digest = hashlib.sha256(data).hexdigest()
        return FileRecord(name, url, len(data), digest, self.clock() - start, path)

    def _keep(self, name: str, data: bytes) -> str | None:
        if self.options.download_dir is None:
            return None
        path = self.options.download_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    # -- HTTP ---------------------------------------------------------------------------------

    def _get(self, url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise CommandFailed(f"{url}: only http:// URLs are supported here")
        lease = self.result.lease
        source = (lease.ip, 0) if lease else None
        conn = http.client.HTTPConnection(
            parts.hostname, parts.port or 80, timeout=self.options.http_timeout,
            source_address=source,
        )  # fmt: skip
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target or "/", headers={"User-Agent": USER_AGENT})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise CommandFailed(f"{url}: {exc}") from None
        if response.status != 200:
            conn.close()
            raise CommandFailed(f"{url}: HTTP {response.status} {response.reason}")
        return conn, response

    def download(self, url: str, name: str, expect: str | None = None) -> FileRecord:
        """GET ``url``, hash it on the way, check it against the ETag (and ``expect``)."""
        start = self.clock()
        conn, response = self._get(url)
        digest = hashlib.sha256()
        size = 0
        out = None
        target = self.options.download_dir / name if self.options.download_dir else None
        try:
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                out = target.with_name(target.name + ".part").open("wb")
            while chunk := response.read(CHUNK):
                if self.cancel.is_set():
                    raise Cancelled()
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
        except (OSError, http.client.HTTPException) as exc:
            raise CommandFailed(f"{name}: download from {url} broke off: {exc}") from None
        finally:
            conn.close()
            if out is not None:
                out.close()
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) != size:
            raise CommandFailed(f"{name}: got {size} of {length} bytes from {url}")
        got = digest.hexdigest()
        verified = []
        etag = etag_sha256(response.getheader("ETag"))
        if etag is None:
            raise CommandFailed(f"{name}: {url} has no sha256 ETag to verify against")
        for source, want in (("etag", etag), ("cmdline", expect)):
            if want is None:
                continue
            if got != want.lower():
                raise CommandFailed(
                    f"{name}: sha256 mismatch: downloaded {got}, the {source} says {want}"
                )
            verified.append(source)
        path = None
        if target is not None:
            target.with_name(target.name + ".part").replace(target)
            path = str(target)
        record = FileRecord(name, url, size, got, self.clock() - start, path, tuple(verified))
        self.result.files.append(record)
        return record

    # -- the interpreter's actions ----------------------------------------------------------

    def fetch(self, url: str, name: str) -> FileRecord:
        return self._timed(name, lambda: self.download(url, name), url)

    def fetch_script(self, url: str) -> str:
        def get() -> str:
            conn, response = self._get(url)
            try:
                data = response.read(MAX_SCRIPT + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise CommandFailed(f"{url}: {exc}") from None
            finally:
                conn.close()
            if len(data) > MAX_SCRIPT:
                raise CommandFailed(f"{url}: a script larger than {MAX_SCRIPT} bytes")
            return data.decode("utf-8", "replace")

        text = self._timed("script", get, url.split("?", 1)[0])
        self.result.scripts.append(url.split("?", 1)[0])
        return text

    def sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds * self.options.sleep_scale):
            raise Cancelled()

    def echo(self, text: str) -> None:
        self.result.echoes.append(text)
        log.debug("%s: %s", self.mac, text)

    def poweroff(self) -> None:
        if not self.options.poweroff:
            raise CommandFailed("Operation not supported (this iPXE has no poweroff)")

    def boot(self, kernel: Image, initrds: Sequence[Image], cmdline: str) -> None:
        params = cmdline_values(cmdline)
        self.result.cmdline, self.result.params = cmdline, params
        rootfs = None
        url = params.get("metalseed.rootfs")
        if url and self.options.fetch_rootfs:
            want = params.get("metalseed.rootfs_sha256")
            if not want:
                raise CommandFailed("metalseed.rootfs without metalseed.rootfs_sha256")
            name = Path(urllib.parse.urlsplit(url).path).name or "rootfs"
            rootfs = self._timed("rootfs", lambda: self.download(url, name, want), url)
        if self.on_boot is not None:
            context = BootContext(
                self, self.result, kernel, tuple(initrds), rootfs, cmdline, params
            )
            self._timed("boot", lambda: self.on_boot(context))  # type: ignore[misc]


def boot_machine(
    interface: str,
    mac: str,
    uuid: str,
    *,
    options: Options = Options(),
    on_boot: BootHook | None = None,
    cancel: threading.Event | None = None,
    keep_address: bool = True,
) -> FirmwareResult:
    """Network-boot one machine on ``interface`` of this namespace, with a port of its own."""
    with DhcpPort(interface) as port:
        firmware = Firmware(port, mac, uuid, options=options, on_boot=on_boot, cancel=cancel)
        result = firmware.run()
        if not keep_address:
            firmware.release()
    return result


# -- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bootstrap.lab.firmware",
        description="Network-boot one emulated machine here (in this namespace); print JSON.",
    )
    parser.add_argument("--interface", required=True)
    parser.add_argument("--mac", required=True)
    parser.add_argument("--uuid", required=True, help="SMBIOS system UUID")
    parser.add_argument("--arch", type=int, default=0, help="option 93: 0 BIOS, 7 UEFI")
    parser.add_argument("--download-dir", type=Path, default=None)
    parser.add_argument("--no-rootfs", action="store_true")
    parser.add_argument("--sleep-scale", type=float, default=1.0)
    parser.add_argument("--max-chains", type=int, default=16)
    parser.add_argument("--keep-address", action="store_true", help="leave the lease on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="firmware: %(message)s", stream=sys.stderr)
    options = Options(
        arch=args.arch,
        download_dir=args.download_dir,
        fetch_rootfs=not args.no_rootfs,
        sleep_scale=args.sleep_scale,
        max_chains=args.max_chains,
    )
    try:
        result = boot_machine(
            args.interface, args.mac, args.uuid, options=options, keep_address=args.keep_address
        )
    except OSError as exc:  # no such interface, not root
        log.error("cannot open a raw socket on %s: %s", args.interface, exc)
        return 2
    print(json.dumps(result.to_json(), indent=2))
    return 0 if result.outcome == "booted" else 1


if __name__ == "__main__":
    sys.exit(main())

"""A real Redfish service for the tests: OpenStack's sushy-tools emulator, and a fault proxy.

``Emulator`` runs ``sushy-emulator`` (its fake driver: no libvirt) on a
loopback address with several Systems, HTTP basic auth from a bcrypt
htpasswd file, and optionally TLS with a throwaway CA; it is stopped by PID.

``FaultProxy`` sits in front of it because sushy-tools can neither inject
faults nor manage accounts: it forwards every request to the emulator, and on
demand answers 5xx, delays or holds answers, makes a System disappear (404),
and serves an AccountService whose accounts are bcrypt lines appended to the
emulator's own htpasswd file -- the emulator re-reads that file on every
request, so a rotated login is really checked by the emulator.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import bcrypt
from aiohttp import ClientSession, web

from tests.conftest import REPO, stop_process

SUSHY = REPO / ".venv" / "bin" / "sushy-emulator"
USER, PASSWORD = "root", "Redfish-Pw-9"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def htpasswd_line(user: str, password: str) -> str:
    digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{digest}\n"


def make_ca_and_cert(directory: Path, host: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``host`` signed by it: (ca, cert, key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metalseed test BMC CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "bmc.pem", directory / "bmc.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class Emulator:
    """``sushy-emulator`` with ``count`` fake Systems on ``host``; ``start()``/``stop()``."""

    def __init__(self, workdir: Path, host: str, count: int = 3, *, tls: bool = False):
        self.workdir = workdir
        self.host = host
        self.port = free_port(host)
        self.tls = tls
        self.htpasswd = workdir / "htpasswd"
        self.systems = [
            {
                "uuid": str(uuid.UUID(int=(0x5EED << 96) + n + 1)),
                "name": f"machine-{n + 1}",
                "power_state": "Off",
                "nics": [{"mac": f"52:54:00:5e:ed:{n + 1:02x}", "ip": f"10.20.0.{n + 10}"}],
            }
            for n in range(count)
        ]
        self.ca: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def range(self) -> str:
        return f"redfish{'' if self.tls else '+http'}://{self.host}:{self.port}"

    def start(self) -> Emulator:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.htpasswd.write_text(htpasswd_line(USER, PASSWORD))
        (self.workdir / "state").mkdir(exist_ok=True)
        conf = self.workdir / "emulator.conf"
        conf.write_text(
            "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
            f"SUSHY_EMULATOR_FAKE_SYSTEMS = {json.dumps(self.systems)}\n"
            f"SUSHY_EMULATOR_AUTH_FILE = {str(self.htpasswd)!r}\n"
            f"SUSHY_EMULATOR_STATE_DIR = {str(self.workdir / 'state')!r}\n"
        )
        argv = [str(SUSHY), "--config", str(conf), "-i", self.host, "-p", str(self.port)]
        if self.tls:
            self.ca, cert, key = make_ca_and_cert(self.workdir, self.host)
            argv += ["--ssl-certificate", str(cert), "--ssl-key", str(key)]
        log = (self.workdir / "emulator.log").open("w")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sushy-emulator exited: {self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"sushy-emulator did not listen: {self.log_text()}")

    def log_text(self) -> str:
        path = self.workdir / "emulator.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def system(self, uuid_: str) -> dict:
        """The emulator's own view of a System (read with plain HTTP, not metalseed)."""
        import requests

        response = requests.get(
            f"{self.url}/redfish/v1/Systems/{uuid_}",
            auth=(USER, PASSWORD),
            verify=str(self.ca) if self.ca else True,
            timeout=5,
        )
        response.raise_for_status()
        return response.json()

    def wait_power(self, uuid_: str, want: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.system(uuid_)["PowerState"]
            if state == want or time.monotonic() > deadline:
                return state
            time.sleep(0.3)


def redfish_error(message: str) -> dict:
    """An error body as Redfish services send them (sushy parses its ``error`` object)."""
    return {"error": {"code": "Base.1.0.GeneralError", "message": message}}


class FaultProxy:
    """A reverse proxy in front of an ``Emulator`` that misbehaves on demand."""

    def __init__(self, emulator: Emulator, host: str) -> None:
        self.emulator = emulator
        self.host = host
        self.port = free_port(host)
        self.fail_next = 0  # answer the next N requests with ``fail_status``
        self.fail_status = 503
        self.delay = 0.0  # seconds before every answer
        self.hold_next = 0  # hold the next N requests for ``hold_seconds``
        self.hold_seconds = 30.0
        self.gone: set[str] = set()  # System paths answered with 404
        self.accounts = False  # serve an AccountService
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[tuple[str, str, object]] = []  # PATCH/POST bodies, as sent
        self._users: dict[str, dict] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def range(self) -> str:
        return f"redfish+http://{self.host}:{self.port}"

    # -- the AccountService, backed by the emulator's htpasswd file -----------------------

    def _write_users(self) -> None:
        lines = [htpasswd_line(USER, PASSWORD)]
        lines += [htpasswd_line(u["UserName"], u["_password"]) for u in self._users.values()]
        self.emulator.htpasswd.write_text("".join(lines))

    def _account(self, n: str) -> dict:
        user = self._users[n]
        return {
            "@odata.id": f"/redfish/v1/AccountService/Accounts/{n}",
            "Id": n,
            "UserName": user["UserName"],
            "RoleId": user["RoleId"],
            "Enabled": user["Enabled"],
        }

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        known = {USER: PASSWORD} | {u["UserName"]: u["_password"] for u in self._users.values()}
        return known.get(user) == password

    async def _accounts(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(redfish_error("unauthorized"), status=401)
        path = request.path.rstrip("/")
        if path == "/redfish/v1/AccountService":
            return web.json_response(
                {"Accounts": {"@odata.id": "/redfish/v1/AccountService/Accounts"}}
            )
        if path == "/redfish/v1/AccountService/Accounts":
            if request.method == "POST":
                body = await request.json()
                n = str(len(self._users) + 1)
                self._users[n] = {
                    "UserName": body["UserName"],
                    "_password": body["Password"],
                    "RoleId": body.get("RoleId", "ReadOnly"),
                    "Enabled": body.get("Enabled", True),
                }
                self._write_users()
                return web.json_response(self._account(n), status=201)
            members = [{"@odata.id": f"{path}/{n}"} for n in self._users]
            return web.json_response({"Members": members})
        n = path.rsplit("/", 1)[1]
        if n not in self._users:
            return web.json_response({}, status=404)
        if request.method == "PATCH":
            body = await request.json()
            user = self._users[n]
            user["_password"] = body.get("Password", user["_password"])
            user["RoleId"] = body.get("RoleId", user["RoleId"])
            user["Enabled"] = body.get("Enabled", user["Enabled"])
            self._write_users()
        return web.json_response(self._account(n))

    # -- forwarding -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.hold_next > 0:
            self.hold_next -= 1
            await asyncio.sleep(self.hold_seconds)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response(redfish_error("injected fault"), status=self.fail_status)
        if any(request.path.rstrip("/").startswith(p) for p in self.gone):
            return web.json_response(redfish_error("no such System"), status=404)
        if self.accounts and request.path.startswith("/redfish/v1/AccountService"):
            return await self._accounts(request)
        body = await request.read()
        if body and request.method in ("PATCH", "POST") and "Account" not in request.path:
            self.bodies.append((request.method, request.path, json.loads(body)))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        url = f"{self.emulator.url}{request.path_qs}"
        async with ClientSession() as session:
            async with session.request(
                request.method, url, data=body or None, headers=headers
            ) as upstream:
                data = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() == "content-type"}
                return web.Response(status=upstream.status, body=data, headers=out)

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, self.host, self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def reset(self) -> None:
        self.fail_next = self.hold_next = 0
        self.delay = 0.0
        self.gone.clear()
        self.requests.clear()
        self.bodies.clear()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop = None

"""HTTP boot: per-machine iPXE scripts, image files, the node call-back (aiohttp).

Routes (``make_app``)::

    GET      /boot.ipxe                 fixed entry script: chains to the per-MAC one
    GET      /boot/{mac}.ipxe[?uuid=]   the machine's script, by profile (scripts.py)
    GET|HEAD /images/{name}/{file}      kernel, initrd, rootfs; ``current`` names the
                                        current image; Range, ETag = manifest sha256
    POST     /api/v1/callback           a booted node reports in, Bearer join token
    POST     /api/v1/enlist             the node agent enlists: Bearer token + inventory
                                        (enlist_http.py)

Every step a machine takes is an event through the backend: ``http.script``
when its script is rendered, ``http.file`` when a download starts (the MAC
comes from the ``?mac=`` the script put on each image URL, else from
``mac_for(client ip)``), ``boot.callback`` when it calls home. Backend and
catalogue calls are blocking (SQLite, small files) and run in worker threads.

Files go out with ``loop.sendfile`` (zero-copy, like aiohttp's FileResponse,
which we cannot use as is: its ETag is mtime-size and it answers If-Match /
If-None-Match against that, while ours is the manifest's sha256). Only files
listed in an image's manifest are served; there is no listing.

Tokens appear in rendered scripts and Authorization headers only: access
logging is off and nothing here logs a script body or a header.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import json
import logging
import math
import os
import re
import stat
import urllib.parse
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config import BootConfig
from ..errors import FatalError, MetalseedError, NotFoundError
from ..image.catalogue import Catalogue, Image, ImageError, safe_name
from .backend import BootBackend, BootProfile, Machine
from .enlist import bearer_token
from .enlist_http import PATH as ENLIST_PATH
from .enlist_http import EnlistApi
from .scripts import RETRY_SECONDS, ScriptError, ScriptRenderer, parse_mac, unbootable_reason

log = logging.getLogger(__name__)

#: the largest call-back body accepted
CALLBACK_MAX = 64 * 1024
#: the image name that resolves to the current image
CURRENT = "current"
MacFor = Callable[[str], str | None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpError(FatalError):
    """The HTTP boot server could not start (address in use, no such address)."""

    exit_code = 69  # EX_UNAVAILABLE


# -- pure helpers ----------------------------------------------------------------------


class RangeNotSatisfiable(ValueError):
    pass


_RANGE = re.compile(r"^bytes=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` (stop exclusive) of one range of a file; None: send it all.

    A missing, malformed or multi-range header is ignored (RFC 9110 allows
    that; we do not do multipart). A well-formed range that misses the file
    raises ``RangeNotSatisfiable`` (416).
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if not match:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - suffix), size
    start = int(first)
    stop = size if not last else int(last) + 1
    if last and stop <= start:
        return None  # last < first: invalid, ignored
    if start >= size:
        raise RangeNotSatisfiable(header)
    return start, min(stop, size)


def _etag_listed(header: str, etag: str, *, weak: bool) -> bool:
    """Does an If-Match / If-None-Match list name ``etag`` (or ``*``)?"""
    for item in header.split(","):
        item = item.strip()
        if item == "*":
            return True
        if item.startswith("W/"):
            if not weak:
                continue
            item = item[2:]
        if item == etag:
            return True
    return False


_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SECRETISH = re.compile(r"token|secret|passw|key|auth|cookie", re.IGNORECASE)


def sanitize_body(body: Mapping[str, Any], *, max_keys: int = 32, max_str: int = 200) -> dict:
    """What of a call-back body goes into an event: short scalars under plain keys.

    Keys that look like they hold secrets are dropped; nested values are
    reduced to their type name; strings are cut and stripped of control
    characters. The body came from the network: nothing in it is trusted.
    """
    out: dict[str, Any] = {}
    for key, value in list(body.items())[:max_keys]:
        if not isinstance(key, str) or not _KEY.match(key) or _SECRETISH.search(key):
            continue
        if value is None or isinstance(value, bool | int):
            out[key] = value
        elif isinstance(value, float):
            if math.isfinite(value):
                out[key] = value
        elif isinstance(value, str):
            out[key] = "".join(ch for ch in value[:max_str] if ch.isprintable())
        else:
            out[key] = f"<{type(value).__name__}>"
    return out


def _looks_like_traversal(raw_path: str) -> bool:
    path = urllib.parse.unquote(urllib.parse.unquote(raw_path.split("?", 1)[0]))
    return ".." in path.split("/") or "\\" in path or "\x00" in path or "//" in path


def _uuid_or_none(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        return None


def _json(code: int, **body: Any) -> web.Response:
    return web.json_response(body, status=code)


# -- the handlers ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BootHandlers:
    backend: BootBackend
    catalogue: Catalogue
    config: BootConfig
    seed_url: str
    mac_for: MacFor | None
    renderer: ScriptRenderer
    retry_seconds: int

    # -- iPXE scripts --------------------------------------------------------------

    async def chain(self, request: web.Request) -> web.Response:
        return _script_response(self.renderer.chain(seed_url=self.seed_url))

    async def script(self, request: web.Request) -> web.Response:
        try:
            mac = parse_mac(request.match_info["mac"])
        except ValueError:
            log.info("boot script for a bad MAC from %s refused", request.remote)
            return web.Response(status=400, text="not a MAC address\n")
        uuid = _uuid_or_none(request.query.get("uuid"))
        text = await asyncio.to_thread(self._script_for, mac, uuid, request.remote or "")
        return _script_response(text)

    def _script_for(self, mac: str, uuid: str | None, ip: str) -> str:
        """Identify, pick the image, mint a token if needed, render, record. Blocking."""
        try:
            machine = self.backend.identify(mac, uuid)
        except MetalseedError as exc:
            log.error("boot script for %s: the backend failed: %s", mac, exc)
            machine = Machine(mac, None, None, BootProfile.ENLIST)
            return self._retry(machine, "the seed could not look this machine up", ip)
        image = self._current()
        reason = "" if machine.profile is BootProfile.RETIRED else unbootable_reason(image)
        if reason:
            log.warning("boot script for %s: %s; told to retry", mac, reason)
            return self._retry(machine, reason, ip)
        token = None
        if machine.profile is BootProfile.PROVISION:
            token = self.backend.mint_token(machine.node_id or "", mac)
        elif machine.profile is BootProfile.ENLIST:  # may enlist as a new node, once, soon
            token = self.backend.mint_discovery_token(mac, self.config.discovery_token_ttl)
        try:
            script = self.renderer.render(
                machine,
                image,
                seed_url=self.seed_url,
                config=self.config,
                token=token,
                retry_seconds=self.retry_seconds,
            )
        except ScriptError as exc:
            log.error("boot script for %s: %s", mac, exc)
            return self._retry(machine, "the seed cannot render a boot script, see its log", ip)
        self._record(
            mac,
            "http.script",
            f"boot script: {script.profile}" + (f", image {script.image}" if script.image else ""),
            {"profile": script.profile, "image": script.image, "ip": ip, "uuid": uuid},
        )
        return script.text

    def _retry(self, machine: Machine, reason: str, ip: str) -> str:
        script = self.renderer.retry(
            machine, seed_url=self.seed_url, reason=reason, retry_seconds=self.retry_seconds
        )
        self._record(
            machine.mac,
            "http.script",
            f"nothing to boot ({reason}): retry in {self.retry_seconds} s",
            {"profile": script.profile, "reason": reason, "ip": ip},
        )
        return script.text

    def _current(self) -> Image | None:
        try:
            return self.catalogue.current()
        except MetalseedError as exc:
            log.error("the current image is unusable: %s", exc)
            return None

    def _record(self, mac: str, kind: str, message: str, data: Mapping[str, Any]) -> None:
        try:
            self.backend.record(mac, kind, message, data)
        except MetalseedError as exc:
            log.error("event %s for %s not recorded: %s", kind, mac, exc)

    # -- image files ---------------------------------------------------------------

    async def image_file(self, request: web.Request) -> web.StreamResponse:
        name, fname = request.match_info["name"], request.match_info["file"]
        ip = request.remote or ""
        try:
            safe_name(name)
            safe_name(fname, "file name")
        except ImageError:
            log.warning("refused image path %r from %s", request.path[:200], ip)
            return web.Response(status=404, text="not found\n")
        try:
            image = await asyncio.to_thread(self._image, name)
        except NotFoundError:
            image = None
        except MetalseedError as exc:
            log.error("image %s: %s", name, exc)
            image = None
        entry = image.files.get(fname) if image else None
        if image is None or entry is None:
            log.info("image file %s/%s not found (from %s)", name, fname, ip)
            return web.Response(status=404, text="not found\n")
        try:
            fobj, st = await asyncio.to_thread(_open_regular, str(image.path / fname))
        except OSError as exc:
            log.error("image file %s/%s: %s", image.name, fname, exc.strerror or exc)
            return web.Response(status=404, text="not found\n")
        try:
            if st.st_size != entry.size:
                log.error("image file %s/%s does not match its manifest", image.name, fname)
                return web.Response(status=500, text="image file does not match its manifest\n")
            return await self._send(request, fobj, st, image, fname, entry.sha256)
        finally:
            fobj.close()

    def _image(self, name: str) -> Image:
        if name == CURRENT:
            image = self.catalogue.current()
            if image is None:
                raise NotFoundError("no current image")
            return image
        return self.catalogue.get(name)

    async def _send(
        self, request: web.Request, fobj, st: os.stat_result, image: Image, fname: str, sha: str
    ) -> web.StreamResponse:
        size = st.st_size
        etag = f'"{sha}"'
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "X-Checksum-Sha256": sha,
            "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:",
        }
        if_match = request.headers.get("If-Match")
        if if_match is not None and not _etag_listed(if_match, etag, weak=False):
            return web.Response(status=412, headers={"ETag": etag})
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match is not None and _etag_listed(if_none_match, etag, weak=True):
            return web.Response(status=304, headers={"ETag": etag})

        try:
            rng = parse_range(request.headers.get("Range"), size)
        except RangeNotSatisfiable:
            return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if rng is not None and not _if_range_holds(request.headers.get("If-Range"), etag, st):
            rng = None
        status, offset, count = 200, 0, size
        if rng is not None:
            (offset, stop), status = rng, 206
            count = stop - offset
            headers["Content-Range"] = f"bytes {offset}-{stop - 1}/{size}"

        if request.method == "GET" and offset == 0:  # a download starts (not a resumption)
            message = f"download {image.name}/{fname} ({size} bytes)"
            data = {"image": image.name, "file": fname, "size": size, "ip": request.remote}
            await asyncio.to_thread(self._record_download, request, message, data)

        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = count
        await response.prepare(request)
        if request.method == "GET" and count:
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client went away")
            await asyncio.get_running_loop().sendfile(transport, fobj, offset, count)
        await response.write_eof()
        return response

    def _record_download(self, request: web.Request, message: str, data: dict) -> None:
        """The MAC from the script's ``?mac=``, else ``mac_for(ip)`` (may block: a thread)."""
        try:
            mac: str | None = parse_mac(request.query.get("mac", ""))
        except ValueError:
            mac = self.mac_for(request.remote) if self.mac_for and request.remote else None
        if mac:
            self._record(mac, "http.file", message, data)
        else:
            log.info("%s from %s (MAC unknown)", message, request.remote)

    # -- the call-back -------------------------------------------------------------

    async def callback(self, request: web.Request) -> web.Response:
        ip = request.remote or ""
        try:
            raw = await request.read()  # at most client_max_size = CALLBACK_MAX bytes
        except web.HTTPRequestEntityTooLarge:
            return _json(400, error=f"body larger than {CALLBACK_MAX} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            body = None
        mac = None
        if body is not None and isinstance(body.get("mac"), str):
            try:
                mac = parse_mac(body["mac"])
            except ValueError:
                mac = None

        token = bearer_token(request.headers.get("Authorization"))
        node_id = None
        if token is not None:
            try:
                node_id = await asyncio.to_thread(self.backend.check_token, token, mac)
            except MetalseedError as exc:
                log.error("call-back from %s: tokens cannot be checked: %s", ip, exc)
                return _json(503, error="the seed cannot check tokens right now")
        if node_id is None:
            if mac is not None:  # recorded, never trusted: the MAC is the caller's word
                await asyncio.to_thread(
                    self._record,
                    mac,
                    "boot.callback_rejected",
                    f"call-back from {ip} with a missing or invalid token",
                    {"ip": ip},
                )
            log.warning("call-back from %s refused: missing or invalid token", ip)
            return web.json_response(
                {"error": "missing or invalid token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="metalseed"'},
            )
        if body is None:
            return _json(400, error="the body must be a JSON object")
        if mac is None:
            return _json(400, error="the body needs the booted interface's mac")
        if (body.get("node") or None) not in (None, node_id):
            log.warning("call-back from %s: token of %s used for another node", ip, node_id)
            return _json(403, error="the token was not issued to this node")
        data = {**sanitize_body(body), "peer": ip}
        await asyncio.to_thread(self._record, mac, "boot.callback", f"called back from {ip}", data)
        return _json(200, status="ok", node=node_id)


def _script_response(text: str) -> web.Response:
    return web.Response(
        text=text,
        content_type="text/plain",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},  # per machine, and may carry a token
    )


def _open_regular(path: str):
    """Open an image file read-only: no symlinks, regular files only."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def _if_range_holds(header: str | None, etag: str, st: os.stat_result) -> bool:
    """May a Range be honoured under this If-Range (RFC 9110 13.1.5)?"""
    if header is None:
        return True
    header = header.strip()
    if header.startswith('"') or header.startswith("W/"):
        return header == etag  # strong comparison
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return False
    return int(st.st_mtime) <= when.timestamp()


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse and log path traversal before routing makes it a plain 404."""
    if _looks_like_traversal(request.raw_path):
        log.warning("refused path %r from %s", request.raw_path[:200], request.remote)
        return web.Response(status=404, text="not found\n")
    return await handler(request)


# -- public API ------------------------------------------------------------------------


def make_app(
    backend: BootBackend,
    catalogue: Catalogue,
    config: BootConfig,
    *,
    seed_url: str,
    mac_for: MacFor | None = None,
    renderer: ScriptRenderer | None = None,
    retry_seconds: int = RETRY_SECONDS,
    provisioning_cidr: str | None = None,
) -> web.Application:
    """The boot HTTP application. ``seed_url``: how machines reach us, e.g. ``http://10.0.0.1``.

    ``provisioning_cidr``: the network enlisted nodes let in (default: ``config.interface``'s).
    """
    handlers = _BootHandlers(
        backend,
        catalogue,
        config,
        seed_url.rstrip("/"),
        mac_for,
        renderer or ScriptRenderer(),
        retry_seconds,
    )
    app = web.Application(middlewares=[_guard], client_max_size=CALLBACK_MAX)
    app.router.add_get("/boot.ipxe", handlers.chain)
    app.router.add_get("/boot/{mac}.ipxe", handlers.script)
    app.router.add_get("/images/{name}/{file}", handlers.image_file)  # HEAD too
    app.router.add_post("/api/v1/callback", handlers.callback)
    enlist = EnlistApi(
        backend, config, seed_url=handlers.seed_url, provisioning_cidr=provisioning_cidr
    )
    app.router.add_post(ENLIST_PATH, enlist.handle)
    return app


class _QuietClientErrors(logging.Filter):
    """aiohttp logs every malformed request (too-long lines, bad headers) at ERROR with a
    traceback; those are the client's fault: one INFO line, no traceback, no content."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            log.info("bad HTTP request from %s (%s)", peer, type(exc).__name__)
            return False
        return True


_server_log = logging.getLogger(__name__ + ".server")


class HttpService:
    """Runs a ``make_app`` application on one address. ``start``/``stop`` are coroutines."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, address: str, port: int) -> None:
        if not any(isinstance(f, _QuietClientErrors) for f in _server_log.filters):
            _server_log.addFilter(_QuietClientErrors())
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False, logger=_server_log)
        await runner.setup()
        site = web.TCPSite(runner, address, port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise HttpError(f"cannot serve HTTP on {address}:{port}: {exc.strerror}") from None
        self._runner = runner
        self.port = runner.addresses[0][1] if runner.addresses else port
        log.info("HTTP boot server on %s:%d", address, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

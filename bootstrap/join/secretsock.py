"""Hand the cluster's keys to one Ansible run without writing them anywhere.

ansible-runner writes its environment, extra vars and inventory into its
private data directory, so none of those may carry a key. Instead the join
stage serves the keys of one run on a Unix socket in a fresh mode-0700
directory, and the ``metalseed_secret`` lookup plugin
(``playbooks/lookup_plugins/``) asks for them by name while the play runs;
the roles pass them on only in ``no_log`` tasks, over the SSH session
(pipelining: no temp files). The socket is closed and removed when the run
ends.

Protocol: the client sends a name and a newline; the answer is ``+value`` or
``-reason``, then a newline.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from ..models import Secret

log = logging.getLogger(__name__)

ENV = "METALSEED_SECRETS_SOCKET"


class SecretSocket:
    """``with SecretSocket({"admin_key": secret}) as path: ...`` -- serve while inside."""

    def __init__(self, secrets: Mapping[str, Secret | Callable[[], Secret]]) -> None:
        self._secrets = dict(secrets)
        self._dir: Path | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.served: list[str] = []  # names asked for (never values), for the event log

    @property
    def path(self) -> Path:
        assert self._dir is not None, "not serving"
        return self._dir / "secrets.sock"

    def __enter__(self) -> Path:
        run_dir = Path("/run") if os.access("/run", os.W_OK) else None
        self._dir = Path(tempfile.mkdtemp(prefix="metalseed-join-", dir=run_dir))
        os.chmod(self._dir, 0o700)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="join-secrets", daemon=True)
        self._thread.start()
        return self.path

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self._answer(conn)
                except OSError as exc:
                    log.warning("secret socket: a client went away: %s", exc)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\n" not in data and len(data) < 256:
            chunk = conn.recv(256)
            if not chunk:
                break
            data += chunk
        name = data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
        value = self._secrets.get(name)
        if value is None:
            log.warning("secret socket: asked for unknown secret %r", name[:64])
            conn.sendall(f"-no secret named {name[:64]!r} in this run\n".encode())
            return
        secret = value() if callable(value) else value
        self.served.append(name)
        conn.sendall(b"+" + secret.reveal().encode() + b"\n")

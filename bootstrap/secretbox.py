"""Encryption at rest for secrets in the state store.

A Fernet key (AES-128-CBC + HMAC-SHA256, from ``cryptography``) lives in
``<state dir>/secret.key`` with mode 0600, created atomically the first time it
is needed. Secrets are stored only as Fernet tokens; a wrong or missing key is
a clear ``SecretError``, never a silent fallback to clear text.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from .errors import SecretError
from .models import Secret


class SecretBox:
    def __init__(self, key_path: Path) -> None:
        self._key_path = key_path
        self._fernet: Fernet | None = None
        self._lock = threading.Lock()

    def _load(self, create: bool) -> Fernet:
        with self._lock:
            return self._load_locked(create)

    def _load_locked(self, create: bool) -> Fernet:
        if self._fernet is not None:
            return self._fernet
        path = self._key_path
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            if not create:
                raise SecretError(f"secrets key {path} is missing") from None
            self._fernet = Fernet(self._create(path))
            return self._fernet
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(f"secrets key {path} is readable by others; chmod 600 it")
        try:
            self._fernet = Fernet(path.read_bytes().strip())
        except (ValueError, OSError) as exc:
            raise SecretError(f"secrets key {path} is unusable: {type(exc).__name__}") from None
        return self._fernet

    @staticmethod
    def _create(path: Path) -> bytes:
        key = Fernet.generate_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() fails if another process created the key meanwhile: use theirs.
            os.link(tmp, path)
        except FileExistsError:
            key = path.read_bytes().strip()
        finally:
            os.unlink(tmp)
        return key

    def encrypt(self, secret: Secret) -> bytes:
        return self._load(create=True).encrypt(secret.reveal().encode())

    def decrypt(self, token: bytes) -> Secret:
        try:
            return Secret(self._load(create=False).decrypt(token).decode())
        except InvalidToken:
            raise SecretError(
                f"a stored secret does not decrypt with {self._key_path} (wrong key?)"
            ) from None

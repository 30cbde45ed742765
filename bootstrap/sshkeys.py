"""The control plane's SSH key pair: ed25519, made on first use under ``STATE_DIR/ssh``.

``id_ed25519`` (OpenSSH private key format, mode 0600, directory 0700) is what
the join stage logs in to nodes with; ``id_ed25519.pub`` is what nodes are
told to trust when they enlist. The pair is generated with ``cryptography``
the first time anything asks for it -- never at import or in the constructor
-- and published atomically (``link`` of a complete file), so two processes
asking at once end up with the same pair. A private key readable by anyone
but its owner is refused, not used. The private key never leaves this module
except as a path.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import FatalError

log = logging.getLogger(__name__)

PRIVATE_NAME = "id_ed25519"
COMMENT = "metalseed-control-plane"


class SshKeyError(FatalError):
    """The control plane's SSH key pair cannot be made or used."""

    exit_code = 77


class SeedKeyPair:
    """The key pair in ``directory`` (``STATE_DIR/ssh``)."""

    def __init__(self, directory: Path, comment: str = COMMENT) -> None:
        self.directory = directory
        self.comment = comment

    @property
    def private_path(self) -> Path:
        return self.directory / PRIVATE_NAME

    @property
    def public_path(self) -> Path:
        return self.directory / f"{PRIVATE_NAME}.pub"

    def ensure(self) -> Path:
        """Make the pair if there is none; check the private key's mode. Returns its path."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.private_path.exists():
                self._generate()
            self._check_mode()
            if not self.public_path.exists():
                self._write_public()
        except OSError as exc:
            raise SshKeyError(
                f"cannot set up the SSH key pair in {self.directory}: {exc.strerror or exc}"
            ) from None
        return self.private_path

    def public_line(self) -> str:
        """``ssh-ed25519 AAAA... metalseed-control-plane``, for ``authorized_keys``."""
        self.ensure()
        try:
            line = self.public_path.read_text().strip()
        except OSError as exc:
            raise SshKeyError(f"cannot read {self.public_path}: {exc.strerror}") from None
        if not line.startswith("ssh-ed25519 ") or "\n" in line:
            raise SshKeyError(f"{self.public_path} is not an ed25519 public key")
        return line

    # -- internals ---------------------------------------------------------------------

    def _generate(self) -> None:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        fd, tmp = tempfile.mkstemp(prefix=".id_ed25519.", dir=self.directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.private_path)  # fails if another process got there first
            except FileExistsError:
                return
            log.info("made the control plane's SSH key pair in %s", self.directory)
        finally:
            os.unlink(tmp)
        self._write_public()

    def _check_mode(self) -> None:
        mode = stat.S_IMODE(self.private_path.stat().st_mode)
        if mode & 0o077:
            raise SshKeyError(
                f"{self.private_path} has mode {mode:04o}; it must be 0600 (chmod 600 it, or "
                "remove the pair to make a new one)"
            )

    def _write_public(self) -> None:
        try:
            key = serialization.load_ssh_private_key(self.private_path.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise SshKeyError(f"{self.private_path} is not a usable private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SshKeyError(f"{self.private_path} is not an ed25519 key")
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        fd, tmp = tempfile.mkstemp(prefix=".id_ed25519.pub.", dir=self.directory)
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o644)
            fh.write(f"{public.decode()} {self.comment}\n")
        os.replace(tmp, self.public_path)


def for_state_dir(state_dir: Path) -> SeedKeyPair:
    """The seed's pair: ``STATE_DIR/ssh/id_ed25519``."""
    return SeedKeyPair(state_dir / "ssh")

# metalseed: fetch a cluster key from the seed's join stage while a play runs.
"""
name: metalseed_secret
short_description: a key from the metalseed seed's join stage
description:
  - Asks the join stage's Unix socket (path in METALSEED_SECRETS_SOCKET) for a key by
    name. The join stage serves the keys of one run only, so they never sit in an
    inventory, extra-vars or environment file. For a hand-written inventory, set the
    variables with ansible-vault instead (inventory/README.md).
options:
  _terms:
    description: names of the keys (mon_key, admin_key, bootstrap_osd_key)
    required: true
"""

from __future__ import annotations

import os
import socket

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

ENV = "METALSEED_SECRETS_SOCKET"


def _ask(path: str, name: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(name.encode("ascii") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    text = data.decode().rstrip("\n")
    if not text.startswith("+"):
        raise AnsibleError(f"metalseed_secret {name}: {text[1:] or 'no answer'}")
    return text[1:]


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        path = os.environ.get(ENV)
        if not path:
            raise AnsibleError(
                f"metalseed_secret: {ENV} is not set -- outside the seed's join stage, "
                "give the key variables with ansible-vault"
            )
        try:
            return [_ask(path, str(term)) for term in terms]
        except OSError as exc:
            raise AnsibleError(f"metalseed_secret: the seed's socket: {exc.strerror}") from None

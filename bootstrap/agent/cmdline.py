"""What the seed put on the kernel command line for the agent. Pure functions.

The seed's iPXE script boots the image with (scripts.py)::

    metalseed.url=http://10.20.0.1 metalseed.node=node-6f1c3e2a metalseed.token=...
    metalseed.mac=52:54:00:12:34:56 BOOTIF=01-52-54-00-12-34-56

or, for a machine the seed does not know yet, ``metalseed.mode=enlist``
instead of ``metalseed.node``. ``BootParams.token`` is a ``Token``: it never
shows itself in a repr, a log line or an exception.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{8,512}$")


class CmdlineError(ValueError):
    """The kernel command line lacks what the agent needs, or has it malformed."""


class Token:
    """The join or discovery token. ``reveal()`` is the only way to its text."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Token('********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Token) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):
        raise TypeError("tokens are not pickled")


@dataclasses.dataclass(frozen=True)
class BootParams:
    url: str  # the seed's base URL, no trailing slash
    token: Token
    mac: str  # the booted interface, lower-case, colon-separated
    node: str | None  # None in enlist mode (or when the seed did not say)
    enlist_mode: bool = False

    @property
    def enlist_url(self) -> str:
        return f"{self.url}/api/v1/enlist"


def split_cmdline(text: str) -> list[str]:
    """Split like the kernel does: on whitespace, double quotes group and are dropped."""
    words: list[str] = []
    current: list[str] = []
    quoted = False
    started = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            started = True
        elif ch.isspace() and not quoted:
            if started:
                words.append("".join(current))
            current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        words.append("".join(current))
    return words


def cmdline_values(text: str) -> dict[str, str]:
    """``key=value`` words as a dict (the last one wins, as for the kernel); bare words skipped."""
    values: dict[str, str] = {}
    for word in split_cmdline(text):
        key, sep, value = word.partition("=")
        if sep:
            values[key] = value
    return values


def normalise_mac(text: str) -> str:
    """``52-54-00-AB-CD-EF`` / ``52:54:00:ab:cd:ef`` -> ``52:54:00:ab:cd:ef``; else CmdlineError."""
    mac = text.strip().lower().replace("-", ":")
    if not _MAC.match(mac):
        raise CmdlineError(f"not a MAC address: {text[:40]!r}")
    return mac


def _mac_from_bootif(value: str) -> str:
    """``BOOTIF=01-52-54-00-ab-cd-ef`` (ARP type 1, then the MAC) -> the MAC."""
    if value.startswith("01-") and len(value) == 20:
        return normalise_mac(value[3:])
    raise CmdlineError(f"BOOTIF={value[:40]!r} is not an Ethernet MAC")


def parse_boot_params(text: str) -> BootParams:
    """The agent's parameters from ``/proc/cmdline`` text; ``CmdlineError`` says what is missing."""
    values = cmdline_values(text)
    url = values.get("metalseed.url", "").rstrip("/")
    if not url:
        raise CmdlineError("no metalseed.url= on the kernel command line: where is the seed?")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise CmdlineError(f"metalseed.url={url[:100]!r} is not an http(s) URL of the seed")
    token = values.get("metalseed.token", "")
    if not token:
        raise CmdlineError("no metalseed.token= on the kernel command line: cannot prove who I am")
    if not _TOKEN.match(token):
        raise CmdlineError("metalseed.token= is malformed")  # never echo it
    if "metalseed.mac" in values:
        mac = normalise_mac(values["metalseed.mac"])
    elif "BOOTIF" in values:
        mac = _mac_from_bootif(values["BOOTIF"])
    else:
        raise CmdlineError("no metalseed.mac= (or BOOTIF=) on the kernel command line")
    mode = values.get("metalseed.mode", "")
    if mode not in ("", "enlist"):
        raise CmdlineError(f"unknown metalseed.mode={mode[:40]!r} (only enlist is known)")
    enlist_mode = mode == "enlist"
    node = values.get("metalseed.node") or None
    if node is not None and not _NODE.match(node):
        raise CmdlineError(f"metalseed.node={node[:70]!r} is not a node id")
    if enlist_mode:
        node = None  # an unknown machine has no node id yet, whatever else is there
    return BootParams(url=url, token=Token(token), mac=mac, node=node, enlist_mode=enlist_mode)

"""Parse sweep targets: ``CIDR``, ``A-B``, ``A`` — each optionally ``:PORT``. Pure.

IPMI BMCs: ``10.0.8.0/22``, ``10.0.8.10-10.0.8.40``, ``10.0.8.10-40``,
``10.0.8.7:6230``, ``127.0.0.0/24:6230``. Redfish services: the same forms
after ``redfish://`` (HTTPS, port 443 unless given) or ``redfish+http://``
(port 80), and a single host name too (``redfish://bmc7.rack2.example``: an
HTTPS certificate names hosts, not addresses).
"""

from __future__ import annotations

import ipaddress
import re

from ..errors import UsageError
from ..models import DEFAULT_PORTS, REDFISH, REDFISH_SCHEMES, BmcAddress

MAX_ADDRESSES = 65536


def _split_port(text: str, default_port: int) -> tuple[str, int]:
    head, sep, tail = text.rpartition(":")
    if not sep:
        return text, default_port
    if not tail.isdigit() or not 0 < int(tail) < 65536:
        raise UsageError(f"bad port in {text!r}")
    return head, int(tail)


def _addr(text: str, whole: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise UsageError(f"{whole!r}: {text!r} is not an IPv4 address") from None


_LABEL = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def parse_range(text: str, default_port: int = 623) -> list[BmcAddress]:
    text = text.strip()
    word, sep, rest = text.partition("://")
    if sep:
        scheme = REDFISH_SCHEMES.get(word.lower())
        if scheme is None:
            known = ", ".join(f"{k}://" for k in REDFISH_SCHEMES)
            raise UsageError(f"{text!r}: unknown scheme {word!r}; use {known} or none (IPMI)")
        rest = rest.rstrip("/")
        if "/" in rest and not _looks_like_cidr(rest):
            raise UsageError(f"{text!r}: give the service's host (and port), not a URL path")
        port = DEFAULT_PORTS[(REDFISH, scheme)]
        spec, port = _split_port(rest, port)
        if any(c.isalpha() for c in spec) and _HOSTNAME.match(spec):
            return [BmcAddress.redfish(scheme, spec.lower(), port)]
        return [BmcAddress.redfish(scheme, a.host, port) for a in _hosts(spec, port, text)]
    spec, port = _split_port(text, default_port)
    return _hosts(spec, port, text)


def _looks_like_cidr(text: str) -> bool:
    head, _, tail = text.partition("/")
    return tail.split(":")[0].isdigit() and head.replace(".", "").isdigit()


def _hosts(spec: str, port: int, text: str) -> list[BmcAddress]:
    if "/" in spec:
        try:
            net = ipaddress.IPv4Network(spec, strict=False)
        except ValueError as exc:
            raise UsageError(f"{text!r} is not a valid CIDR: {exc}") from None
        if net.num_addresses > MAX_ADDRESSES:
            raise UsageError(f"{text!r} has {net.num_addresses} addresses; split it up")
        hosts = list(net.hosts()) if net.prefixlen < 31 else list(net)
        return [BmcAddress(str(h), port) for h in hosts]
    if "-" in spec:
        left, right = spec.split("-", 1)
        start = _addr(left, text)
        if "." not in right:  # short form: 10.0.8.10-40
            prefix = left.rsplit(".", 1)[0]
            right = f"{prefix}.{right}"
        end = _addr(right, text)
        if int(end) < int(start):
            raise UsageError(f"{text!r}: the range ends before it starts")
        if int(end) - int(start) + 1 > MAX_ADDRESSES:
            raise UsageError(f"{text!r} is too large; split it up")
        return [
            BmcAddress(str(ipaddress.IPv4Address(i)), port) for i in range(int(start), int(end) + 1)
        ]
    return [BmcAddress(str(_addr(spec, text)), port)]


def parse_ranges(texts: list[str] | tuple[str, ...], default_port: int = 623) -> list[BmcAddress]:
    """All targets of all ranges, de-duplicated, in the order given."""
    seen: dict[BmcAddress, None] = {}
    for text in texts:
        for addr in parse_range(text, default_port):
            seen.setdefault(addr, None)
    if len(seen) > MAX_ADDRESSES:
        raise UsageError(f"{len(seen)} addresses in all; sweep at most {MAX_ADDRESSES} at once")
    return list(seen)

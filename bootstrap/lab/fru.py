"""Build an IPMI FRU image (Platform Management FRU Information Storage Definition v1.0).

Only what a lab BMC needs: a common header and a product info area with
manufacturer, product name, part number, version, serial and asset tag. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping

PRODUCT_FIELDS = ("manufacturer", "product", "part_number", "version", "serial", "asset_tag")


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _field(text: str) -> bytes:
    raw = text.encode("ascii", "replace")[:63]
    return bytes([0xC0 | len(raw)]) + raw  # type 11b: 8-bit ASCII + Latin-1


def build_fru(info: Mapping[str, str]) -> bytes:
    """The FRU bytes for ``info`` (keys from ``PRODUCT_FIELDS``); b"" when empty."""
    if not any(info.get(k) for k in PRODUCT_FIELDS):
        return b""
    body = bytes([0x01, 0x00, 0x00])  # format version, length placeholder, language English
    for key in PRODUCT_FIELDS:
        body += _field(info.get(key, ""))
    body += _field("")  # FRU file id
    body += b"\xc1"  # end of fields
    size = len(body) + 1  # + checksum
    size += (-size) % 8
    area = bytearray(body.ljust(size - 1, b"\x00"))
    area[1] = size // 8
    area.append(_checksum(bytes(area)))
    header = bytearray([0x01, 0, 0, 0, 1, 0, 0])  # product area right after the header
    header.append(_checksum(bytes(header)))
    return bytes(header + area)


def parse_product_area(fru: bytes) -> dict[str, str]:
    """Inverse of ``build_fru`` for its product area (used to read FRUs we get back)."""
    if len(fru) < 8 or _checksum(fru[:7]) != fru[7]:
        raise ValueError("bad FRU common header")
    offset = fru[4] * 8
    if not offset:
        return {}
    length = fru[offset + 1] * 8
    area = fru[offset : offset + length]
    if len(area) != length or sum(area) & 0xFF:
        raise ValueError("bad FRU product area checksum")
    pos, values = 3, []
    while pos < len(area) and area[pos] != 0xC1:
        n = area[pos] & 0x3F
        values.append(area[pos + 1 : pos + 1 + n].decode("latin-1"))
        pos += 1 + n
    return {k: v for k, v in zip(PRODUCT_FIELDS, values, strict=False) if v}

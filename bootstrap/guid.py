"""System GUID byte order between IPMI, SMBIOS and text.

The IPMI spec sends Get System GUID as all 16 bytes reversed (least
significant byte first); SMBIOS and many real BMCs send the first three
fields little-endian and the rest as is (Python's ``bytes_le``). The text form
everyone agrees on is what ``dmidecode -s system-uuid``, iPXE's ``${uuid}``
and PXE option 97 give, so that is what metalseed stores. Pure functions.
"""

from __future__ import annotations

import uuid


def encode_ipmi(guid: uuid.UUID) -> bytes:
    """The Get System GUID answer for ``guid``, in the IPMI spec's byte order."""
    return guid.bytes[::-1]


def _plausible(value: uuid.UUID) -> bool:
    return value.variant == uuid.RFC_4122 and 1 <= (value.version or 0) <= 8


def decode_system_guid(wire: bytes) -> str:
    """Canonical lower-case text of a GUID as a BMC sent it, whichever order it used.

    Prefers the IPMI encoding, then the SMBIOS one, taking the first that reads
    as a well-formed RFC 4122 UUID; falls back to the IPMI encoding.
    """
    if len(wire) != 16:
        raise ValueError(f"a system GUID has 16 bytes, got {len(wire)}")
    ipmi = uuid.UUID(bytes=bytes(wire[::-1]))
    if _plausible(ipmi):
        return str(ipmi)
    smbios = uuid.UUID(bytes_le=bytes(wire))
    if _plausible(smbios):
        return str(smbios)
    return str(ipmi)


def uuid_candidates(text: str) -> tuple[str, ...]:
    """A UUID as sent, and with the first three fields byte-swapped.

    IPMI and SMBIOS encode the first three fields of the same UUID in opposite
    byte orders, and firmware is not consistent about which it sends; matching
    either ties the same machine together.
    """
    value = uuid.UUID(text)
    swapped = uuid.UUID(bytes_le=value.bytes)
    return (str(value), str(swapped)) if swapped != value else (str(value),)

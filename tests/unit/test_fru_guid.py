import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootstrap.guid import decode_system_guid, encode_ipmi
from bootstrap.lab.fru import build_fru, parse_product_area

GUID = uuid.UUID("4c4c4544-0042-3510-8052-b4c04f4d3232")  # a real Dell-style SMBIOS UUID


def test_ipmi_order_round_trips():
    assert decode_system_guid(encode_ipmi(GUID)) == str(GUID)


def test_smbios_order_from_real_world_bmcs_is_understood():
    # Many BMCs send the SMBIOS layout (first three fields little-endian)
    assert decode_system_guid(GUID.bytes_le) == str(GUID)


@given(st.uuids(version=4))
def test_any_v4_uuid_round_trips_both_ways(value):
    assert decode_system_guid(encode_ipmi(value)) == str(value)
    assert decode_system_guid(value.bytes_le) == str(value)


def test_wrong_length_is_rejected():
    with pytest.raises(ValueError):
        decode_system_guid(b"\x01" * 15)


def test_fru_product_area_round_trips_with_checksums():
    info = {"manufacturer": "Acme", "product": "R1", "serial": "SN123", "asset_tag": "rack2-u7"}
    fru = build_fru(info)
    assert len(fru) % 8 == 0
    assert sum(fru[:8]) & 0xFF == 0
    assert parse_product_area(fru) == info


def test_empty_fru_is_empty():
    assert build_fru({}) == b""


def test_corrupt_fru_is_detected():
    fru = bytearray(build_fru({"manufacturer": "Acme"}))
    fru[12] ^= 0xFF
    with pytest.raises(ValueError):
        parse_product_area(bytes(fru))

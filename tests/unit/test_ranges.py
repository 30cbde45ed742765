import pytest

from bootstrap.discovery.ranges import parse_range, parse_ranges
from bootstrap.errors import UsageError
from bootstrap.models import BmcAddress


def hosts(addrs):
    return [f"{a.host}:{a.port}" for a in addrs]


def test_cidr_sweeps_hosts_not_network_or_broadcast():
    addrs = parse_range("10.0.8.0/30")
    assert hosts(addrs) == ["10.0.8.1:623", "10.0.8.2:623"]
    assert len(parse_range("127.0.4.0/22")) == 1022


def test_slash_32_and_31_are_every_address():
    assert hosts(parse_range("10.0.0.7/32")) == ["10.0.0.7:623"]
    assert len(parse_range("10.0.0.6/31")) == 2


def test_ranges_long_and_short_form_with_port():
    assert hosts(parse_range("10.0.8.10-12:6230")) == [
        "10.0.8.10:6230",
        "10.0.8.11:6230",
        "10.0.8.12:6230",
    ]
    assert len(parse_range("10.0.8.250-10.0.9.5")) == 12


def test_single_address_and_dedup_in_order():
    assert parse_ranges(["10.0.0.2", "10.0.0.1-2", "10.0.0.2:623"]) == [
        BmcAddress("10.0.0.2"),
        BmcAddress("10.0.0.1"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.300",
        "10.0.0.5-1",
        "10.0.0.0/33",
        "nope",
        "10.0.0.1:99999",
        "10.0.0.1:x",
        "10.0.0.0/8",
    ],
)
def test_bad_ranges_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_range(text)


def test_redfish_ranges_name_the_scheme_and_default_port():

    [one] = parse_range("redfish://10.0.9.3")
    assert one == BmcAddress.redfish("https", "10.0.9.3", 443) and one.driver == "redfish"
    [plain] = parse_range("redfish+http://127.0.0.1:8000")
    assert (plain.scheme, plain.port, plain.path) == ("http", 8000, "")
    assert str(plain) == "redfish+http://127.0.0.1:8000"
    assert BmcAddress.parse(str(plain)) == plain
    many = parse_range("redfish+http://10.0.9.10-12:8080")
    assert [a.host for a in many] == ["10.0.9.10", "10.0.9.11", "10.0.9.12"]
    assert {a.port for a in many} == {8080}
    assert len(parse_range("redfish://10.0.9.0/30")) == 2
    [named] = parse_range("redfish://BMC7.rack2.example:8443/")
    assert (named.host, named.port, named.scheme) == ("bmc7.rack2.example", 8443, "https")


@pytest.mark.parametrize(
    "bad",
    ["ftp://10.0.0.1", "redfish://10.0.0.1/redfish/v1", "redfish://10.0.0.1:99999", "redfish://"],
)
def test_bad_redfish_ranges_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_range(bad)


def test_a_system_address_parses_back_with_its_path():

    text = "redfish://10.0.9.3:443/redfish/v1/Systems/System.Embedded.1"
    address = BmcAddress.parse(text)
    assert address.path == "/redfish/v1/Systems/System.Embedded.1" and str(address) == text
    assert address.service == BmcAddress.redfish("https", "10.0.9.3")

"""The full-mode lease pool: who gets which address, what is persisted, what survives a restart."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootstrap.boot.dhcp.leases import LeasePool, Nak, parse_pool
from bootstrap.errors import ConfigError
from bootstrap.models import Lease
from bootstrap.secretbox import SecretBox
from bootstrap.store.sqlite import SqliteStore

IFACE = ipaddress.IPv4Interface("10.20.0.1/24")
A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    """The lease half of ``StateStore``, in memory (for the fuzz test's speed)."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._reserved: dict[str, str] = {}

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def put_lease(self, lease: Lease) -> None:
        self._leases[lease.ip] = lease

    def delete_lease(self, ip: str) -> None:
        self._leases.pop(ip, None)

    def reservations(self) -> dict[str, str]:
        return dict(self._reserved)

    def reserve(self, mac: str, ip: str, node_id: str | None = None) -> None:
        self._reserved[mac] = ip


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = SqliteStore(tmp_path / "state.db", SecretBox(tmp_path / "secret.key"), clock=clock)
    yield s
    s.close()


def make_pool(store, clock, first="10.20.0.1", last="10.20.0.4", **kw) -> LeasePool:
    pool = LeasePool(
        store,
        IFACE,
        ipaddress.IPv4Address(first),
        ipaddress.IPv4Address(last),
        lease_time=kw.pop("lease_time", 100),
        offer_time=kw.pop("offer_time", 10),
        decline_time=kw.pop("decline_time", 50),
        clock=clock,
    )
    pool.load()
    return pool


def bind(pool, mac, requested=None) -> Lease:
    ip = pool.offer(mac, requested)
    assert ip is not None
    lease = pool.request(mac, ip)
    assert isinstance(lease, Lease), lease
    return lease


# -- pool ranges --------------------------------------------------------------------------------


def test_parse_pool():
    first, last = parse_pool("10.20.0.100 - 10.20.0.199", IFACE)
    assert (str(first), str(last)) == ("10.20.0.100", "10.20.0.199")


def test_one_address_is_a_pool_of_one():
    first, last = parse_pool("10.20.0.100", IFACE)
    assert first == last


@pytest.mark.parametrize(
    "text", ["10.21.0.1-10.21.0.9", "10.20.0.9-10.20.0.1", "nope-10.20.0.1", "", "10.20.0.5-x"]
)
def test_bad_pools_are_config_errors(text):
    with pytest.raises(ConfigError):
        parse_pool(text, IFACE)


# -- offers and bindings ------------------------------------------------------------------------


def test_offers_skip_the_seed_and_differ_per_mac(store, clock):
    pool = make_pool(store, clock)
    a, b = pool.offer(A), pool.offer(B)
    assert a == "10.20.0.2" and b == "10.20.0.3"  # .1 is the seed itself
    assert pool.offer(A) == a  # a retransmitted DISCOVER: the same offer


def test_offers_are_memory_only_and_expire(store, clock):
    pool = make_pool(store, clock, last="10.20.0.2")
    assert pool.offer(A) == "10.20.0.2"
    assert store.leases() == []
    assert pool.offer(B) is None  # held for A
    clock.now += 11
    pool.sweep()
    assert pool.offer(B) == "10.20.0.2"


def test_a_request_binds_and_persists(store, clock):
    pool = make_pool(store, clock)
    lease = bind(pool, A)
    assert store.leases() == [lease]
    assert (lease.state, lease.expires) == ("bound", clock.now + 100)
    assert pool.mac_for(lease.ip) == A


def test_the_requested_address_is_honoured_when_free(store, clock):
    pool = make_pool(store, clock)
    assert pool.offer(A, "10.20.0.4") == "10.20.0.4"
    assert pool.offer(B, "10.20.0.4") != "10.20.0.4"  # offered to A meanwhile


@pytest.mark.parametrize(
    "ip, why",
    [
        ("10.99.0.5", "not on"),
        ("10.20.0.50", "outside the pool"),
        ("10.20.0.1", "not available"),
        (None, "no address"),
    ],
)
def test_wrong_requests_are_refused(store, clock, ip, why):
    result = make_pool(store, clock).request(A, ip)
    assert isinstance(result, Nak) and why in result.reason


def test_an_address_bound_to_another_mac_is_refused(store, clock):
    pool = make_pool(store, clock)
    lease = bind(pool, A)
    result = pool.request(B, lease.ip)
    assert isinstance(result, Nak) and "not available" in result.reason


def test_init_reboot_with_an_unknown_but_free_address_is_acked(store, clock):
    lease = make_pool(store, clock).request(A, "10.20.0.3")
    assert isinstance(lease, Lease) and lease.ip == "10.20.0.3"


def test_renewal_extends_the_lease(store, clock):
    pool = make_pool(store, clock)
    lease = bind(pool, A)
    clock.now += 60
    renewed = pool.request(A, lease.ip)
    assert renewed.expires == clock.now + 100
    assert store.leases() == [renewed]


def test_moving_to_another_address_frees_the_old_one(store, clock):
    pool = make_pool(store, clock)
    old = bind(pool, A)
    new = pool.request(A, "10.20.0.4")
    assert isinstance(new, Lease)
    assert [lease.ip for lease in store.leases()] == ["10.20.0.4"]
    assert pool.mac_for(old.ip) is None


# -- release, decline, expiry ------------------------------------------------------------------


def test_release_keeps_history_and_the_mac_gets_its_address_back(store, clock):
    pool = make_pool(store, clock)
    lease = bind(pool, A)
    released = pool.release(A, lease.ip)
    assert released.state == "released"
    assert store.leases()[0].state == "released"
    assert pool.offer(B) != lease.ip  # never-used addresses first
    assert pool.offer(A) == lease.ip


def test_release_by_another_mac_is_ignored(store, clock):
    pool = make_pool(store, clock)
    lease = bind(pool, A)
    assert pool.release(B, lease.ip) is None
    assert store.leases()[0].state == "bound"


def test_released_and_expired_addresses_are_reused_when_the_pool_runs_out(store, clock):
    pool = make_pool(store, clock, last="10.20.0.3")  # two addresses
    a = bind(pool, A)
    b = bind(pool, B)
    assert pool.offer(C) is None
    pool.release(B, b.ip)
    assert pool.offer(C) == b.ip
    pool.forget_offer(C)
    clock.now += 101  # A's lease expires too; B's release is older
    assert pool.offer(C) == b.ip
    assert pool.request(C, b.ip).mac == C
    assert bind(pool, "52:54:00:00:00:0d").ip == a.ip  # expired: reusable


def test_decline_holds_the_address_back(store, clock):
    pool = make_pool(store, clock, last="10.20.0.3")
    lease = bind(pool, A)
    declined = pool.decline(A, lease.ip)
    assert declined.state == "declined"
    assert store.leases()[0].state == "declined"
    other = pool.offer(A)
    assert other is not None and other != lease.ip
    pool.forget_offer(A)
    assert pool.offer(B) != lease.ip
    clock.now += 51
    pool.sweep()
    assert [x.ip for x in store.leases()] == []  # hold over: forgotten
    assert pool.offer(C) == lease.ip


def test_declining_an_offer_works_too(store, clock):
    pool = make_pool(store, clock)
    ip = pool.offer(A)
    assert pool.decline(A, ip).state == "declined"
    assert pool.offer(A) != ip
    assert pool.decline(B, "10.20.0.4") is None


# -- restarts and reservations ------------------------------------------------------------------


def test_a_restarted_pool_gives_each_mac_its_address(store, clock):
    pool = make_pool(store, clock)
    a, b = bind(pool, A), bind(pool, B)
    again = make_pool(store, clock)
    assert again.offer(B) == b.ip and again.offer(A) == a.ip
    assert again.offer(C) not in (a.ip, b.ip)
    clock.now += 1000  # long expired: still theirs while nobody else needed them
    later = make_pool(store, clock)
    assert later.offer(A) == a.ip


def test_a_reservation_pins_the_address(store, clock):
    pool = make_pool(store, clock)
    lease = bind(pool, A)
    assert pool.reserve(A, lease.ip, "node-1") is True
    assert pool.reserve(A, lease.ip, "node-1") is False  # already
    assert store.reservations() == {A: lease.ip}
    pool.release(A, lease.ip)
    clock.now += 1000
    for mac in (B, C, "52:54:00:00:00:0d"):
        ip = pool.offer(mac)
        assert ip != lease.ip
        if ip:
            pool.request(mac, ip)
    restarted = make_pool(store, clock)
    assert restarted.offer(A) == lease.ip
    wrong = restarted.request(A, "10.20.0.4")
    assert isinstance(wrong, Nak) and "reserved" in wrong.reason


def test_a_reservation_outside_the_pool_is_honoured(store, clock):
    store.reserve(A, "10.20.0.200", "node-1")
    pool = make_pool(store, clock)
    assert pool.offer(A) == "10.20.0.200"
    assert pool.request(A, "10.20.0.200").ip == "10.20.0.200"
    assert isinstance(pool.request(B, "10.20.0.200"), Nak)


def test_leases_of_other_networks_are_not_loaded(store, clock):
    store.put_lease(Lease(ip="10.99.0.5", mac=A, state="bound", expires=clock.now + 100))
    pool = make_pool(store, clock)
    assert pool.mac_for("10.99.0.5") is None


# -- fuzz: whatever clients do, no address is ever held by two MACs -----------------------------

MACS = [f"52:54:00:00:01:{i:02x}" for i in range(5)]
operations = st.lists(
    st.tuples(
        st.sampled_from(["offer", "request", "release", "decline", "tick", "sweep", "restart"]),
        st.sampled_from(MACS),
        st.sampled_from([None, "10.20.0.2", "10.20.0.3", "10.20.0.4", "10.20.0.5", "10.20.0.9"]),
        st.integers(0, 120),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_fuzz_no_address_is_ever_given_to_two_macs_at_once(ops):
    clock, store = Clock(), MemoryStore()
    pool = make_pool(store, clock, first="10.20.0.2", last="10.20.0.5")
    offered: dict[str, tuple[str, float]] = {}
    for op, mac, ip, dt in ops:
        if op == "offer":
            got = pool.offer(mac, ip)
            if got is not None:
                offered[mac] = (got, clock.now + 10)
        elif op == "request":  # a binding consumes the MAC's offer
            if isinstance(pool.request(mac, ip or offered.get(mac, (None,))[0]), Lease):
                offered.pop(mac, None)
        elif op == "release":  # so does a release
            pool.release(mac, ip)
            offered.pop(mac, None)
        elif op == "decline":
            if pool.decline(mac, ip) is not None:
                offered.pop(mac, None)
        elif op == "tick":
            clock.now += dt
        elif op == "sweep":
            pool.sweep()
        else:
            pool = make_pool(store, clock, first="10.20.0.2", last="10.20.0.5")
            offered.clear()
        live = [
            lease
            for lease in store.leases()
            if lease.state == "bound" and lease.expires > clock.now
        ]
        holders: dict[str, str] = {}
        for lease in live:
            assert holders.setdefault(lease.ip, lease.mac) == lease.mac
            assert ipaddress.IPv4Address(lease.ip) in IFACE.network
        for other, (oip, until) in offered.items():
            if until > clock.now and holders.get(oip, other) != other:
                # a live offer and a live binding of the same address to different MACs
                raise AssertionError(f"{oip} offered to {other} but bound to {holders[oip]}")

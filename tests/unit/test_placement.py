"""Ceph placement: mons on the first three (or labelled) machines, an OSD per empty disk."""

from bootstrap.join.placement import place


def machine(*disks, lldp=None):
    return {
        "disks": [
            {"name": name, "size_bytes": size, "empty": empty} for name, size, empty in disks
        ],
        "lldp": lldp or [],
    }


G = 2**30


def test_three_machines_one_empty_disk_each_is_a_full_cluster():
    p = place([(f"n{i}", machine(("vda", 10 * G, True))) for i in range(1, 4)])
    assert p.mons == p.mgrs == ("n1", "n2", "n3")
    assert [(o.node, o.disk) for o in p.osds] == [("n1", "vda"), ("n2", "vda"), ("n3", "vda")]
    assert (p.pool_size, p.pool_min_size, p.failure_domain) == (3, 2, "host")
    assert not p.degraded


def test_only_empty_disks_get_osds_and_unknown_is_not_empty():
    p = place([("n1", machine(("sda", G, False), ("sdb", G, True), ("sdc", G, None)))])
    assert [o.disk for o in p.osds] == ["sdb"]


def test_mons_are_the_first_three_to_enlist_or_the_labelled_ones():
    enlisted = [(f"n{i}", machine(("vda", G, True))) for i in range(1, 6)]
    assert place(enlisted).mons == ("n1", "n2", "n3")
    assert place(enlisted, mon_labels=["n5", "n4", "nX"]).mons == ("n5", "n4")


def test_fewer_hosts_is_a_degraded_mode_that_upgrades_as_machines_join():
    one = place([("n1", machine(("vda", G, True), ("vdb", G, True), ("vdc", G, True)))])
    # one of the three disks holds the monitor's store, two are OSDs on one host
    assert one.mon_disks == {"n1": "vda"}
    assert (one.pool_size, one.pool_min_size, one.failure_domain) == (2, 1, "osd")
    assert one.degraded
    two = place([("n1", machine(("vda", G, True))), ("n2", machine(("vda", G, True)))])
    assert (two.pool_size, two.pool_min_size, two.failure_domain) == (2, 1, "host")
    four = place([(f"n{i}", machine(("vda", G, True))) for i in range(1, 5)])
    assert (four.pool_size, four.pool_min_size, four.failure_domain) == (3, 2, "host")
    assert len(four.osds) == 4 and four.mons == ("n1", "n2", "n3")


def test_racks_come_from_config_then_lldp_then_default():
    p = place(
        [
            ("n1", machine(("vda", G, True))),
            ("n2", machine(("vda", G, True), lldp=[{"chassis_name": "tor-a"}])),
            ("n3", machine(("vda", G, True), lldp=[{"chassis_name": "tor-a"}])),
        ],
        racks={"n3": "r7"},
    )
    assert p.racks == {"n1": "default", "n2": "rack-tor-a", "n3": "r7"}


def test_a_monitor_host_with_two_empty_disks_gives_the_smallest_to_its_store():
    def inv(*sizes):
        return {"disks": [{"name": f"sd{chr(98 + i)}", "size_bytes": s << 30, "empty": True}
                          for i, s in enumerate(sizes)]}  # fmt: skip

    p = place([("a", inv(20, 4)), ("b", inv(10)), ("c", inv(10, 10)), ("d", inv(4, 20))])
    assert p.mon_disks == {"a": "sdc", "c": "sdb"}  # d is no monitor; b has one disk
    assert [o.disk for o in p.osds_of("a")] == ["sdb"]
    assert [o.disk for o in p.osds_of("c")] == ["sdc"]
    assert [o.disk for o in p.osds_of("d")] == ["sdb", "sdc"]

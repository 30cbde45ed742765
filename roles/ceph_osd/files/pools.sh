#!/bin/sh
# The cluster's pools, idempotently (metalseed ceph_osd role, run on a monitor host).
#   pools.sh CLUSTER SIZE MIN_SIZE FAILURE_DOMAIN PG_NUM NAME:APPLICATION...
# Size, min_size and the CRUSH rule are set on every run, so a cluster that grew past
# the degraded mode (fewer than three hosts) is upgraded by the next join.
set -eu
cluster=$1 size=$2 min_size=$3 domain=$4 pg_num=$5
shift 5
ceph() { command ceph --cluster "$cluster" "$@"; }
rule="metalseed-$domain"
# a pool of size 1 (one OSD in all) must be allowed explicitly
[ "$size" -gt 1 ] || ceph config set mon mon_allow_pool_size_one true
if ! ceph osd crush rule ls | grep -qx "$rule"; then
    ceph osd crush rule create-replicated "$rule" default "$domain"
    echo "changed: rule $rule"
fi
pools=$(ceph osd pool ls)
for spec in "$@"; do
    name=${spec%%:*} app=${spec#*:}
    if ! printf '%s\n' "$pools" | grep -qx "$name"; then
        ceph osd pool create "$name" "$pg_num" "$pg_num" replicated "$rule"
        echo "changed: pool $name"
    fi
    # grow before shrinking min_size, shrink after: min_size may never exceed size
    ceph osd pool set "$name" crush_rule "$rule" >/dev/null
    ceph osd pool set "$name" size "$size" --yes-i-really-mean-it >/dev/null
    ceph osd pool set "$name" min_size "$min_size" >/dev/null
    ceph osd pool application enable "$name" "$app" --yes-i-really-mean-it >/dev/null
done
if printf '%s\n' "$@" | grep -q ':rbd$'; then
    ceph osd pool application get rbd | grep -q rbd || rbd pool init rbd
fi

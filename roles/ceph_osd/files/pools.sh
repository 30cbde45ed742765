#!/bin/sh
# The cluster's pools, idempotently (metalseed ceph_osd role, run on a monitor host).
#   pools.sh CLUSTER SIZE MIN_SIZE FAILURE_DOMAIN PG_NUM NAME:APPLICATION...
# Size, min_size, the CRUSH rule and the application are checked on every run and set
# where they differ, so a cluster that grew past the degraded mode (fewer than three
# hosts) is upgraded by the next join; a run with nothing to change makes two reads.
set -eu
cluster=$1 size=$2 min_size=$3 domain=$4 pg_num=$5
shift 5
ceph() { command ceph --cluster "$cluster" "$@"; }
rule="metalseed-$domain"
if ! ceph osd crush rule ls | grep -qx "$rule"; then
    ceph osd crush rule create-replicated "$rule" default "$domain"
    echo "changed: rule $rule"
fi
# a pool of size 1 (one OSD in all) must be allowed explicitly
[ "$size" -gt 1 ] || ceph config set mon mon_allow_pool_size_one true
rule_id=$(ceph osd crush rule dump "$rule" --format json | python3 -c \
    'import json, sys; print(json.load(sys.stdin)["rule_id"])')
# what to do, from one read of every pool: "create NAME APP" or "set NAME KEY VALUE"
ceph osd pool ls detail --format json | python3 -c '
import json, sys
size, min_size, rule_id = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pools = {p["pool_name"]: p for p in json.load(sys.stdin)}
for spec in sys.argv[4:]:
    name, app = spec.split(":", 1)
    pool = pools.get(name)
    if pool is None:
        print("create", name, app)
        pool = {}
    if pool.get("crush_rule") != rule_id:
        print("set", name, "crush_rule", "RULE")
    if pool.get("size") != size:
        print("set", name, "size", size)
    if pool.get("min_size") != min_size:
        print("set", name, "min_size", min_size)
    if app not in pool.get("application_metadata", {}):
        print("app", name, app)
' "$size" "$min_size" "$rule_id" "$@" | while read -r what name key value; do
    case $what in
        create)
            ceph osd pool create "$name" "$pg_num" "$pg_num" replicated "$rule"
            [ "$key" != rbd ] || rbd pool init "$name" ;;
        set)
            [ "$value" != RULE ] || value=$rule
            [ "$key" != size ] || set -- --yes-i-really-mean-it
            [ "$key" = size ] || set --
            ceph osd pool set "$name" "$key" "$value" "$@" >/dev/null ;;
        app)
            ceph osd pool application enable "$name" "$key" --yes-i-really-mean-it >/dev/null ;;
    esac
    echo "changed: $what $name $key $value"
done

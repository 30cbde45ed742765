#!/bin/sh
# One data disk -> one running OSD, idempotently (metalseed ceph_osd role).
#   osd-device.sh CLUSTER DEVICE [--activate-only]
# A disk that already carries a bluestore OSD of this cluster is activated as it is
# (a stateless node after a reboot); an empty disk is prepared first, unless
# --activate-only (the node agent at boot: it starts what is there, makes nothing).
# A disk with another cluster's OSD is never touched. The last line printed is
# "osd ID", or "skip: REASON".
# The same file is copied into the node image (/usr/lib/metalseed/osd-device.sh).
set -eu
cluster=$1 dev=$2 mode=${3:-}
fsid=$(ceph-conf --cluster "$cluster" --lookup fsid)

osd_of() {  # the OSD id on $dev, if it is one of this cluster's
    ceph-volume raw list "$dev" --format json 2>/dev/null | python3 -c '
import json, sys
fsid = sys.argv[1]
for osd in json.load(sys.stdin).values():
    if osd.get("ceph_fsid") == fsid:
        print(osd["osd_id"])
        break
' "$fsid"
}

id=$(osd_of)
if [ -z "$id" ]; then
    if [ -n "$(ceph-volume raw list "$dev" --format json 2>/dev/null | tr -d '{} \n')" ]; then
        echo "skip: $dev holds another cluster's OSD"
        exit 0
    fi
    if [ "$mode" = --activate-only ]; then
        echo "skip: no OSD of this cluster on $dev"
        exit 0
    fi
    ceph-volume --cluster "$cluster" raw prepare --bluestore --data "$dev" >&2
    echo prepared
    id=$(osd_of)
    [ -n "$id" ] || { echo "ceph-volume prepared $dev but lists no OSD on it" >&2; exit 4; }
fi
if [ ! -e "/var/lib/ceph/osd/$cluster-$id/keyring" ]; then
    ceph-volume --cluster "$cluster" raw activate --device "$dev" --no-systemd >&2
fi
if ! systemctl is-active --quiet "ceph-osd@$id"; then
    systemctl enable --quiet "ceph-osd@$id" 2>/dev/null || true
    # an OSD that gave up while the monitors were away may start again now
    systemctl reset-failed "ceph-osd@$id" 2>/dev/null || true
    systemctl start "ceph-osd@$id"
    echo started
fi
echo "osd $id"

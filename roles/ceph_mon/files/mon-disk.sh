#!/bin/sh
# This host's monitor disk on /var/lib/ceph/mon, idempotently (metalseed ceph_mon role).
#   mon-disk.sh LABEL [DEVICE]
# A filesystem labelled LABEL (made by an earlier run, before this node rebooted) is
# mounted; else DEVICE -- an empty disk the seed chose -- gets one first; with neither,
# the monitor's store stays in memory (a stateless node: rebuilt from the quorum when
# the node boots again). A DEVICE that holds anything is never formatted.
# The last line printed: "already-mounted DEVICE", "mounted DEVICE",
# "formatted+mounted DEVICE" or "memory".
set -eu
label=$1 dev=${2:-}
mnt=/var/lib/ceph/mon
if mountpoint -q "$mnt"; then
    echo "already-mounted $(findmnt -n -o SOURCE "$mnt")"
    exit 0
fi
found=$(blkid -c /dev/null -o device -l -t "LABEL=$label" 2>/dev/null || true)
made=
if [ -z "$found" ]; then
    if [ -z "$dev" ]; then
        echo memory
        exit 0
    fi
    if blkid -c /dev/null -p "$dev" >/dev/null 2>&1; then
        echo "$dev is not empty (blkid finds a signature): not formatting it" >&2
        exit 3
    fi
    mkfs.ext4 -q -L "$label" "$dev" >&2
    found=$dev made=formatted+
fi
mkdir -p "$mnt"
mount -o noatime "$found" "$mnt"
chown ceph:ceph "$mnt"
chmod 0750 "$mnt"
echo "${made}mounted $found"

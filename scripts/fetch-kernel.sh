#!/usr/bin/env bash
# Fetch the Debian kernel the netboot test image uses (the package linux-image-amd64
# depends on), unpacked into a cache, never installed into /boot. Idempotent: with a
# kernel already cached it does nothing (no network). Needs apt-get, dpkg-deb, depmod.
#   scripts/fetch-kernel.sh [--cache DIR] [--update] [--offline]
# The cache is $METALSEED_KERNEL_CACHE, else /var/cache/metalseed.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[[ -x $py ]] || py=python3
exec "$py" -m bootstrap.image.callback fetch-kernel "$@"

#!/usr/bin/env bash
# On the seed VM: what metalseed.service (metalseed run) does on its own every sweep,
# done at once and shown: find the nodes' BMCs, rotate their logins, netboot every node.
set -euo pipefail
metalseed discover --rotate
metalseed boot-device pxe --all
metalseed power on --all
metalseed nodes list

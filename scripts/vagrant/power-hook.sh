#!/usr/bin/env bash
# The virtual BMCs' power hook: METALSEED_POWER (on|off|reset) on the libvirt domain whose
# UUID is the BMC's system GUID (METALSEED_BMC_GUID). Set by `metalseed lab bmc`.
set -euo pipefail
VIRSH=(virsh -c "${LIBVIRT_DEFAULT_URI:-qemu:///system}")
domain=${METALSEED_BMC_GUID:?}
case "${METALSEED_POWER:?}" in
  on)    "${VIRSH[@]}" start "$domain" ;;
  off)   "${VIRSH[@]}" destroy "$domain" ;;
  reset) "${VIRSH[@]}" reset "$domain" ;;
  *)     echo "power-hook: unknown power state $METALSEED_POWER" >&2; exit 2 ;;
esac

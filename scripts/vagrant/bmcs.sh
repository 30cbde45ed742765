#!/usr/bin/env bash
# Virtual BMCs for the Vagrant lab, run on the workstation (a Vagrant trigger calls this).
#   bmcs.sh start N BASE_PORT   one simulated BMC per node on MGMT_ADDRESS:BASE_PORT+i,
#                               each with the node's SMBIOS UUID as its system GUID;
#                               nodes are powered off so their BMC decides from now on
#   bmcs.sh stop                stop the simulator (by its recorded PID)
# The simulator is metalseed's own (`metalseed lab bmc`, pyghmi's BMC server); its
# power hook (power-hook.sh) runs `virsh start|destroy UUID` on the node's domain.
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE=${METALSEED_VAGRANT_STATE:-build/vagrant}   # pid, log, spec, credentials
PIDFILE=$STATE/bmcs.pid
# vagrant-libvirt's management network: the workstation's address on it
MGMT_ADDRESS=${METALSEED_BMC_ADDRESS:-192.168.121.1}
FACTORY_PASSWORD=${METALSEED_LAB_FACTORY_PASSWORD:-lab-factory-pw}
VIRSH=(virsh -c "${LIBVIRT_DEFAULT_URI:-qemu:///system}")

node_uuid() { printf '6d657461-6c73-6565-6400-%012x' "$1"; }

running() {
  [[ -f $PIDFILE ]] || return 1
  local pid; pid=$(cat "$PIDFILE")
  [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "lab bmc"
}

case "${1:-}" in
  start)
    nodes=${2:?number of nodes}; base=${3:?base port}
    [[ -x .venv/bin/python ]] || { echo "bmcs.sh: run 'make setup' on the workstation first" >&2; exit 1; }
    mkdir -p "$STATE"
    if running; then echo "virtual BMCs already running (pid $(cat "$PIDFILE"))"; exit 0; fi
    umask 077
    printf 'admin:%s\n' "$FACTORY_PASSWORD" > "$STATE/bmc-credentials"
    {
      printf '{"bmcs": ['
      for i in $(seq 1 "$nodes"); do
        [[ $i -gt 1 ]] && printf ','
        printf '{"address": "%s", "port": %d, "guid": "%s"}' \
          "$MGMT_ADDRESS" $((base + i)) "$(node_uuid "$i")"
      done
      printf ']}\n'
    } > "$STATE/bmcs.json"
    for i in $(seq 1 "$nodes"); do
      "${VIRSH[@]}" destroy "$(node_uuid "$i")" >/dev/null 2>&1 || true   # already off is fine
    done
    rm -f "$STATE/manifest.json"
    nohup .venv/bin/python -m bootstrap lab bmc --spec "$STATE/bmcs.json" \
      --credentials "$STATE/bmc-credentials" --manifest "$STATE/manifest.json" \
      --power-hook "$PWD/scripts/vagrant/power-hook.sh" > "$STATE/bmcs.log" 2>&1 &
    echo $! > "$PIDFILE"
    for _ in $(seq 1 100); do [[ -f $STATE/manifest.json ]] && break; sleep 0.1; done
    [[ -f $STATE/manifest.json ]] || { echo "bmcs.sh: simulator did not start, see $STATE/bmcs.log" >&2; exit 1; }
    echo "virtual BMCs for $nodes nodes on $MGMT_ADDRESS:$((base + 1))-$((base + nodes)) (pid $(cat "$PIDFILE"))"
    ;;
  stop)
    if running; then kill "$(cat "$PIDFILE")"; echo "virtual BMCs stopped"; fi
    rm -f "$PIDFILE"
    ;;
  *)
    echo "usage: $0 start N BASE_PORT | stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Provisions the seed VM of the Vagrant lab (run as root by Vagrant, repo in /opt/metalseed).
# Installs metalseed with the repository's own set-up, points it at the provisioning
# network (eth1) and at the virtual BMCs on the workstation, serves NTP to the nodes,
# builds the node image. The nodes' empty data disks become OSDs (join.auto).
set -euo pipefail
cd /opt/metalseed
make setup
ln -sf /opt/metalseed/.venv/bin/metalseed /usr/local/bin/metalseed

nodes=${METALSEED_NODES:-3}
base=${METALSEED_BMC_PORT:-6230}
mgmt=${METALSEED_BMC_ADDRESS:-192.168.121.1}
install -d -m 0755 /etc/metalseed
ranges=$(for i in $(seq 1 "$nodes"); do printf '"%s:%d", ' "$mgmt" $((base + i)); done)
cat > /etc/metalseed/metalseed.toml <<TOML
state_dir = "/var/lib/metalseed"

[discovery]
ranges = [${ranges%, }]
credentials_file = "/etc/metalseed/bmc-credentials"
rotate = true

[boot]
interface = "eth1"
mode = "full"
pool = "10.20.0.100-10.20.0.250"
TOML
# the BMCs' factory login, as printed on a sticker; rotation replaces it per BMC
( umask 077; printf 'admin:%s\n' "${METALSEED_LAB_FACTORY_PASSWORD:-lab-factory-pw}" \
    > /etc/metalseed/bmc-credentials )

# the nodes take their time from the seed (Ceph's monitors need clocks within 50 ms)
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chrony >/dev/null
sed 's|^allow .*|allow 10.20.0.0/24|' contrib/chrony/metalseed-seed.conf \
    > /etc/chrony/conf.d/metalseed-seed.conf
systemctl restart chrony

install -m 0644 contrib/systemd/metalseed.service /etc/systemd/system/
systemctl daemon-reload
metalseed image build            # the node image, cached by its recipe's hash
systemctl enable --now metalseed.service
echo "seed ready: metalseed run on eth1 ($SEED_IP); BMCs at $mgmt:$((base + 1))-$((base + nodes))"

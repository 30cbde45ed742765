#!/usr/bin/env bash
# Idempotent set-up on Debian 12 as root: apt packages, then the venv at .venv/.
# Fast when everything is already there: it only installs what is missing and
# reinstalls the Python package only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev   # the venv is made from Debian's python3 (for python3-rados later)
  ipmitool                   # peer IPMI client: tests and the benchmark baseline
  freeipmi-tools             # ipmipower: FreeIPMI's parallel power client, the power benchmark's peer
  openipmi                   # ipmi_sim: a BMC nobody here wrote, for the tests
  iproute2 procps iputils-ping  # ip, ps, ping for tests and the lab
  ipxe                       # undionly.kpxe, ipxe.efi, snponly.efi served over TFTP
  ipxe-qemu qemu-system-x86  # QEMU machines with real iPXE NIC ROMs (TCG here)
  busybox-static cpio kmod   # the small call-back initramfs (kmod: depmod indexes the kernel modules)
  udhcpc isc-dhcp-client     # DHCP clients nobody here wrote, for the tests
  dnsmasq-base               # the "existing DHCP server" in proxy-mode tests; DHCP peer in bench
  kea-admin                  # perfdhcp, ISC's DHCP benchmark
  tftp-hpa tftpd-hpa curl    # TFTP client/server peers; curl for HTTP and tftp:// tests
  nginx-light wrk            # HTTP peer and load generator for the bench
  libpcap0.8                 # scapy's packet filters
  debootstrap squashfs-tools # metalseed image build: the node image's root and its squashfs
  systemd-container          # systemd-nspawn: boots the node image as a machine in the image tests
  lynis                      # the hardening audit the image tests run inside the booted image
  openssh-client             # ssh/ssh-keygen: the image tests log in (key) and are refused (password)
  vagrant vagrant-libvirt    # `vagrant validate` of the lab's Vagrantfile
  ceph-common python3-rados  # the seed's RADOS client (cluster status) and the ceph CLI in tests
  ceph-base                  # monmaptool, ceph-authtool: checking what the seed generates
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  [[ "$pkg" == \#* ]] && continue
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages (${missing[*]}); run as root or install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# the QEMU tests and the demo fetch Debian's kernel package with `apt-get download`:
# that needs the package lists, which a fresh machine may not have yet
if [[ $(id -u) -eq 0 ]] && ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  apt-get update -qq
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv from /usr/bin/python3 (with system site packages)"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.metalseed-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing metalseed and its Python dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi

#!/usr/bin/env bash
# Idempotent set-up on Debian 12 as root: apt packages, then the venv at .venv/.
# Fast when everything is already there: it only installs what is missing and
# reinstalls the Python package only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev   # the venv is made from Debian's python3 (for python3-rados later)
  ipmitool                   # peer IPMI client: tests and the benchmark baseline
  openipmi                   # ipmi_sim: a BMC nobody here wrote, for the tests
  iproute2 procps            # ip, ps for tests and the lab
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

#!/usr/bin/env bash
# Installs the Debian libraries mooncake-transfer-engine-non-cuda needs, when missing and when we are root.
set -euo pipefail
pkgs=(libibverbs1 librdmacm1 libnuma1 liburing2 libcurl4)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Egress allowlists of container sandboxes (dsec/substrates/container/network.py): `ip` for netns and veth
# pairs, `nft` for the per-sandbox filter table; idempotent and quiet.
set -euo pipefail
PACKAGES=(iproute2 nftables)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing network packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# the kernel must have nf_tables (and veth): probe with a throwaway table rather than trust module lists
probe="dsec_setup_probe_$$"
nft add table inet "$probe" 2>/dev/null && nft delete table inet "$probe" || {
  echo "setup: nftables does not work on this kernel (nf_tables missing?): network allowlists will fail" >&2
  exit 1
}

#!/usr/bin/env bash
# Egress allowlists of container sandboxes (dsec/substrates/container/network.py): `ip` for netns and veth
# pairs, `nft` for the per-sandbox filter table (both from 00-apt.sh); idempotent and quiet.
set -euo pipefail
# the kernel must have nf_tables (and veth): probe with a throwaway table rather than trust module lists
probe="dsec_setup_probe_$$"
nft add table inet "$probe" 2>/dev/null && nft delete table inet "$probe" || {
  echo "setup: nftables does not work on this kernel (nf_tables missing?): network allowlists will fail" >&2
  exit 1
}

#!/usr/bin/env bash
# VM substrates: fetch the Debian cloud kernel, build the guest initramfs (busybox, virtio modules, init,
# dsec-agent) and probe once whether KVM can boot it (else TCG). All cached under $DSEC_HOME/vm/; idempotent.
set -euo pipefail
: "${REPO_ROOT:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${VENV:=$REPO_ROOT/.venv}"
"$VENV/bin/python" -m dsec.substrates.vm.prepare --quiet

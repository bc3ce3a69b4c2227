#!/usr/bin/env bash
# One idempotent setup for a fresh Debian 12 machine: Debian runtimes, .venv with dsec installed,
# the in-sandbox agent, base images, guest kernel, and the services tests need. Quiet when all is there.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT
export VENV="$REPO_ROOT/.venv"
export DSEC_HOME="${DSEC_HOME:-/var/lib/dsec}"
export PATH="$VENV/bin:$PATH"
mkdir -p "$DSEC_HOME"
for step in "$REPO_ROOT"/infra/setup.d/*.sh; do
  started=$(date +%s)
  bash "$step"
  took=$(( $(date +%s) - started ))
  [ "$took" -ge 5 ] && echo "setup: $(basename "$step") took ${took}s"
done
exit 0

#!/usr/bin/env bash
# Start dsec's own Docker Engine (private socket /run/dsec-docker.sock, data under $DSEC_HOME/docker) so the
# Docker driver and its tests find one; idempotent: a running engine is reused. Needs docker.io (00-).
set -euo pipefail
: "${REPO_ROOT:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${VENV:=$REPO_ROOT/.venv}"
if ! command -v dockerd >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
"$VENV/bin/python" - <<'PY'
from dsec.substrates.container.dockerd import ensure_engine

ensure_engine(use_docker_host=False)
PY

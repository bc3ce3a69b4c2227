#!/usr/bin/env bash
# Start dsec's own Docker Engine (private socket /run/dsec-docker.sock, data under $DSEC_HOME/docker) so the
# Docker driver and its tests find one; idempotent: a running engine is reused. Needs docker.io (00-).
set -euo pipefail
: "${REPO_ROOT:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${VENV:=$REPO_ROOT/.venv}"
"$VENV/bin/python" - <<'PY'
from dsec.substrates.container.dockerd import ensure_engine

ensure_engine(use_docker_host=False)
PY

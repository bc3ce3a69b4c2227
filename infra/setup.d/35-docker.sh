#!/usr/bin/env bash
# Start dsec's own Docker Engine (private socket /run/dsec-docker.sock, data under $DSEC_HOME/docker) so the
# Docker driver and its tests find one; idempotent: a running engine is reused. Needs docker.io (00-).
# The engine remaps container ids (--userns-remap=dsec-docker): ensure_engine creates the dsec-docker system user
# and its /etc/subuid + /etc/subgid range (200000000:65536) if missing, and restarts an engine found running
# without the remap (dsec/substrates/container/dockerd.py).
set -euo pipefail
: "${REPO_ROOT:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${VENV:=$REPO_ROOT/.venv}"
"$VENV/bin/python" - <<'PY'
from dsec.substrates.container.dockerd import ensure_engine

ensure_engine(use_docker_host=False)
PY

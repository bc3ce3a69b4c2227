#!/usr/bin/env bash
# Build the base images (busybox, python) locally and import them into the node's layer store
# ($DSEC_HOME/images); needs busybox-static and debootstrap (00-apt.sh). Idempotent and quiet: images
# already imported are a no-op; the debootstrap tree is cached under $DSEC_HOME/images/base-cache.
set -euo pipefail
: "${REPO_ROOT:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${VENV:=$REPO_ROOT/.venv}"
: "${DSEC_HOME:=/var/lib/dsec}"
export DSEC_HOME
cd "$REPO_ROOT"
"$VENV/bin/python" -m dsec.images.base_images all --quiet

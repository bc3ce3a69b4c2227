#!/usr/bin/env bash
# Build the base images (busybox, python, base and code-interpreter = E2B's templates, cpp = SandboxFusion's C++) locally and import them into the node's layer store
# ($DSEC_HOME/images); needs busybox-static and debootstrap (00-apt.sh). Idempotent and quiet: images
# already imported are a no-op; the debootstrap tree is cached under $DSEC_HOME/images/base-cache.
# layer_format=erofs (tests/images run both formats) needs mkfs.erofs (erofs-utils, 00-apt.sh) and the
# kernel's erofs filesystem: load the module when it is not built in.
set -euo pipefail
: "${REPO_ROOT:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${VENV:=$REPO_ROOT/.venv}"
: "${DSEC_HOME:=/var/lib/dsec}"
export DSEC_HOME
cd "$REPO_ROOT"
if ! grep -qw erofs /proc/filesystems; then
    modprobe erofs 2>/dev/null || echo "warning: kernel has no erofs: layer_format=erofs (and its tests) will fail" >&2
fi
"$VENV/bin/python" -m dsec.images.base_images all --quiet

#!/usr/bin/env bash
# Build the static in-sandbox agent into $DSEC_HOME/bin/dsec-agent (a no-op when it is newer than agent.c).
# gcc and libc6-dev (libc.a, for -static) come from 00-apt.sh.
set -euo pipefail
: "${REPO_ROOT:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${VENV:=$REPO_ROOT/.venv}"
"$VENV/bin/python" -m dsec.agent.build >/dev/null

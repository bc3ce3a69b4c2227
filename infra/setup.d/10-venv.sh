#!/usr/bin/env bash
# .venv in the repo root with dsec (editable), the trainer and test extras, and torch from the local CPU wheel.
set -euo pipefail
cd "$REPO_ROOT"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.dsec-installed"
want="$(sha256sum pyproject.toml setup.py | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing dsec and its dependencies into $VENV"
  "$VENV/bin/pip" install -q numpy "torch==2.13.0"
  "$VENV/bin/pip" install -q -e ".[train,db,test]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -m dsec.codegen >/dev/null

#!/usr/bin/env bash
# .venv in the repo root with dsec (editable) and its server, trainer, db and test extras, plus grpcio-tools: the
# stubs are generated from proto/ here and by the build (setup.py); a wheel ships them.
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
  "$VENV/bin/pip" install -q "grpcio-tools>=1.76,<2" -e ".[server,train,db,test]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" dsec/codegen.py >/dev/null  # by path: importing the dsec package needs the stubs it makes

# The two commands of the README: `make demo` and `make test` (each runs the idempotent setup first).
SHELL := /bin/bash
PY := .venv/bin/python
export DSEC_HOME ?= /var/lib/dsec

.PHONY: setup demo demo-sandboxes demo-train test bench

setup:
	@bash infra/setup.sh

demo: setup
	@$(PY) -m dsec.demo
	@if [ -f trainer/demo.py ]; then $(PY) -m trainer.demo; fi

demo-sandboxes: setup
	@$(PY) -m dsec.demo

test: setup
	@$(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	@for script in bench/*.py; do name=$$(basename $$script .py); case $$name in __init__|harness) continue;; esac; \
		echo "== bench.$$name"; $(PY) -m bench.$$name || exit 1; done

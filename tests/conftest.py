"""Shared test setup: every test talks to real servers and runtimes; state lives under $DSEC_HOME."""

import os

os.environ.setdefault("DSEC_HOME", "/var/lib/dsec")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

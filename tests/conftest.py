"""Shared test setup: every test talks to real servers and runtimes; state lives under $DSEC_HOME."""

import os

os.environ.setdefault("DSEC_HOME", "/var/lib/dsec")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Test Ray clusters are local and on loopback; a stray ~/.ray/auth_token must not switch on token auth
# (with it, a fresh local raylet fails to register within Ray's fixed 30 s and ray.init dies).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Test servers share one $DSEC_HOME and many tests kill -9 a server to check its successor reaps everything it
# left; so they reap (the pre-re-adoption behaviour). tests/recovery/test_readopt.py turns re-adoption on.
os.environ.setdefault("DSEC_READOPT", "0")

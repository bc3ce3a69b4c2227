"""An in-process server with token auth and a metrics endpoint, shared by this folder's tests."""

from __future__ import annotations

import pytest

from dsec.config import ServerConfig
from dsec.server.main import serve

TOKENS = {"alice": "tok-alice-1234", "bob": "tok-bob-5678"}


@pytest.fixture(scope="module")
def secured_server():
    config = ServerConfig(
        listen="127.0.0.1:0",
        tokens=",".join(f"{token}:{tenant}" for tenant, token in TOKENS.items()),
        metrics_listen="127.0.0.1:0",
        tenant_max_sandboxes=2,
    )
    running = serve(config)
    yield running
    running.stop()

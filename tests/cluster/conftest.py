"""Cluster fixtures: node servers behind a gateway (no Ray), and a throwaway PostgreSQL for shared logs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.postgres import throwaway_postgres

from dsec.sdk.embedded import EmbeddedServer


def home() -> Path:
    return Path(os.environ["DSEC_HOME"])


def reap_dead_servers() -> None:
    """Start and stop one server on the home: at start it cleans what killed node servers left."""
    EmbeddedServer.start(home()).stop()


@pytest.fixture
def node_servers() -> Iterator[list[EmbeddedServer]]:
    """Two node servers (the nodes of a gateway); killed ones are reaped at teardown."""
    servers = [EmbeddedServer.start(home()) for _ in range(2)]
    yield servers
    killed = False
    for server in servers:
        killed |= server.process.poll() is not None
        server.stop()
    if killed:
        reap_dead_servers()


@pytest.fixture(scope="session")
def shared_log_dsn() -> Iterator[str]:
    """A PostgreSQL of our own on loopback: the trajectory log every node shares."""
    with throwaway_postgres("dsec-cluster-pg-") as dsn:
        yield dsn

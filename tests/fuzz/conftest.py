"""A live dsec server of its own for the fuzz suite (a child process that dies with the test run)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from dsec.sdk.embedded import EmbeddedServer
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

MAX_MESSAGE = 64 << 20


@pytest.fixture(scope="session")
def fuzz_server():
    server = EmbeddedServer.start(Path(os.environ["DSEC_HOME"]))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def channel(fuzz_server):
    options = [("grpc.max_send_message_length", 2 * MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    with grpc.insecure_channel(fuzz_server.address, options=options) as chan:
        grpc.channel_ready_future(chan).result(timeout=60)
        yield chan


@pytest.fixture(scope="session")
def stub(channel):
    return pb_grpc.SandboxServiceStub(channel)

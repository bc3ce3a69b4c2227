"""An E2B client keeps the sandbox it holds across a kill -9 restart of the server, with auth on (issue #20 pt 5).

E2B's envd and port requests carry no API key: the door acts for the key a sandbox was created with, which it
remembered in memory. The successor re-adopts the sandbox, and its door, which never saw the create, asks the
server who owns it (only for sandboxes created through the door's E2B API: a key-less request reaches nothing
else, restart or not). Every wait is on a protocol point: a server's ready line, a process's exit."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

import dsec
from dsec.sdk.embedded import EmbeddedServer
from support.ports import free_port  # tests/ is on sys.path (rootdir-relative test packages)

from .conftest import private_home

pytestmark = pytest.mark.timeout(600)
KEY = "tok-alice-restart-0001"
DEADLINE_S = 120.0


def test_an_e2b_client_keeps_its_sandbox_across_a_kill_9_restart(monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="dr-", dir="/tmp"))  # short: sandboxes' unix sockets live under it
    tokens = root / "tokens.yaml"
    tokens.write_text(f"{KEY}: alice\n")
    home, http_listen = private_home(root), f"127.0.0.1:{free_port()}"  # the successor takes the same HTTP port
    monkeypatch.setenv("DSEC_READOPT", "1")  # the product default; tests/conftest.py turns it off elsewhere
    args = ["--tokens-file", str(tokens)]
    first = EmbeddedServer.start(home=home, extra_args=args, http_listen=http_listen)
    successor = None
    try:
        assert first.http_url
        for name, value in {"E2B_API_URL": first.http_url, "E2B_SANDBOX_URL": first.http_url, "E2B_API_KEY": KEY}.items():
            monkeypatch.setenv(name, value)
        sb = Sandbox.create("base", timeout=600)
        assert sb.commands.run("echo before > /tmp/mark && cat /tmp/mark").stdout == "before\n"
        with dsec.Client(first.address, token=KEY) as client:  # alice's sandbox made through the SDK, not the door
            other = client.create("busybox", "container", timeout_s=600)
            other.files.write("/tmp/sdk.txt", "made through the SDK")

        first.process.kill()  # kill -9: the door forgets every key it remembered
        first.process.wait()
        successor = EmbeddedServer.start(home=home, extra_args=args, http_listen=http_listen)
        assert successor.http_url == first.http_url

        # the Sandbox object from before the restart, unchanged: envd commands and files as its owner
        assert sb.commands.run("cat /tmp/mark && echo after >> /tmp/mark").stdout == "before\n"
        assert sb.files.read("/tmp/mark") == "before\nafter\n"
        # a key-less request reaches only what the door's E2B API created: not alice's SDK sandbox
        with httpx.Client(base_url=successor.http_url, timeout=DEADLINE_S) as envd:
            refused = envd.get("/files", params={"path": "/tmp/sdk.txt"}, headers={"E2b-Sandbox-Id": other.id})
            assert refused.status_code == 401, refused.text
            allowed = envd.get("/files", params={"path": "/tmp/sdk.txt"}, headers={"E2b-Sandbox-Id": other.id, "X-API-Key": KEY})
            assert allowed.status_code == 200 and allowed.text == "made through the SDK", allowed.text
        sb.kill()
    finally:
        for server in (successor, first):
            if server is not None and server.process.poll() is None:
                server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_owner_is_answered_only_for_sandboxes_the_door_created() -> None:
    from dsec.compat.context import DOOR_CREATED_LABEL, CompatContext
    from dsec.server.auth import Authenticator

    auth = Authenticator({"tok-a1": "alice", "tok-b1": "bob", "tok-a2": "alice"})
    assert (auth.token_of("alice"), auth.token_of("bob"), auth.token_of("carol")) == ("tok-a1", "tok-b1", None)
    owners = {"door": ({DOOR_CREATED_LABEL: "base"}, "tok-a1"), "sdk": ({"team": "x"}, "tok-a1")}
    ctx = CompatContext(backend_address="127.0.0.1:1", owner_of=owners.get)
    assert ctx.owner_key("door") == "tok-a1"
    assert ctx.owner_key("sdk") is None  # made through the gRPC API: no key-less access, as before a restart
    assert ctx.owner_key("gone") is None
    assert CompatContext(backend_address="127.0.0.1:1").owner_key("door") is None  # a door outside any server

"""A sandbox paused with its memory on disk (a VM's migrated state, a runc container's CRIU images) outlives a
kill -9 of its server: the successor re-adopts it paused, with no QEMU or container running, and its resume
brings back the same processes with their memory. Servers are `dsec serve` children (see test_readopt.py)."""

from __future__ import annotations

import pytest

import dsec
from dsec.substrates.container.criu import criu_probe
from support.ports import free_port  # tests/ is on sys.path (rootdir-relative test packages)

from .test_readopt import Server, no_traces, wait_connected

pytestmark = pytest.mark.timeout(600)
SERVER = 'n=0; s=$RANDOM$RANDOM; while :; do read line < /tmp/in; n=$((n+1)); echo "$n $s $line" > /tmp/out; done'


def start_counter(sb: dsec.Sandbox) -> None:
    assert sb.exec(f"mkfifo /tmp/in /tmp/out && setsid sh -c '{SERVER}' </dev/null >/dev/null 2>&1 &").exit_code == 0


def ask(sb: dsec.Sandbox, word: str) -> tuple[int, str]:
    count, secret, _ = sb.exec(f"echo {word} > /tmp/in && cat /tmp/out", timeout=60).text.split()
    return int(count), secret


def test_memory_paused_sandboxes_are_re_adopted_and_resume():
    kinds = [("microvm", "")] + ([("container", "runc")] if criu_probe().works else [])
    port = free_port()
    server = Server(port)
    client = dsec.Client(server.address)
    successor = None
    made: list[dsec.Sandbox] = []
    try:
        for substrate, driver in kinds:
            made.append(client.create("busybox", substrate, driver=driver, memory_mb=256, timeout_s=600))
        before = []
        for sb in made:
            start_counter(sb)
            before.append(ask(sb, "before"))
            sb.pause(memory=True)
        successor = Server(port, held=True)
        server.kill9()
        successor.go()
        wait_connected(client)
        for sb, (count, secret) in zip(made, before):
            assert sb.refresh().state == "paused", f"{sb.info.spec.substrate} came back paused"
            sb.resume()
            assert ask(sb, "after") == (count + 1, secret), f"{sb.info.spec.substrate}: its processes came back"
    finally:
        for server_ in (successor, server):
            if server_ is not None:
                server_.stop()
    assert no_traces([sb.id for sb in made]) == []

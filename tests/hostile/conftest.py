"""A server of our own (its pid is a target), the substrate matrix, host-side bait, and the results table."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from pathlib import Path

import pytest

import dsec
from dsec.sdk.embedded import EmbeddedServer

from . import host
from .table import CREATED, DEFINED, LEAKS, ROWS, dump_if_requested, render, set_current_test

# (case id, substrate, driver, image)
CASES = [
    pytest.param(("crun", "container", "crun", "busybox"), id="crun"),
    pytest.param(("runc", "container", "runc", "busybox"), id="runc"),
    pytest.param(("docker", "container", "docker", "busybox"), id="docker"),
    pytest.param(("function", "function", "", "python"), id="function"),
    pytest.param(("microvm", "microvm", "", "busybox"), id="microvm"),
    pytest.param(("vm", "vm", "", "busybox"), id="vm"),
]
VM_SUBSTRATES = ("microvm", "vm")
# VM sandboxes come from a booted template per (kind, image, memory): one shape for the whole suite (the one
# tests/vm uses too), so each kind boots at most once and every other VM is a ~0.3 s restore.
VM_MEMORY_MB = 256


def is_vm(case: tuple) -> bool:
    return case[1] in VM_SUBSTRATES


@pytest.fixture(scope="session")
def hostile_server():
    server = EmbeddedServer.start(Path(os.environ["DSEC_HOME"]))
    yield server
    server.stop()
    LEAKS.extend(host.leftovers(CREATED))  # stop() destroyed every sandbox: nothing of theirs may remain


@pytest.fixture(scope="session")
def hostile_client(hostile_server):
    client = dsec.Client(hostile_server.address)
    yield client
    client.close()


FIRST_CREATE_TIMEOUT_S = 120.0
_broken: dict[tuple, str] = {}


def _first_create(client, case) -> None:
    """Fail a case fast (not skip) when its substrate cannot create a sandbox, instead of every test hanging."""
    if case in _broken:
        raise AssertionError(_broken[case])
    _, substrate, driver, image = case
    outcome: dict[str, object] = {}

    def attempt() -> None:
        try:
            client.create(image, substrate, driver=driver, timeout_s=120).destroy()
            outcome["ok"] = True
        except Exception as error:  # noqa: BLE001 - reported below with its type
            outcome["error"] = f"{type(error).__name__}: {error}"

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(FIRST_CREATE_TIMEOUT_S)
    if not outcome.get("ok"):
        _broken[case] = f"{case[0]}: no sandbox could be created ({outcome.get('error', f'no answer in {FIRST_CREATE_TIMEOUT_S:.0f}s')})"
        raise AssertionError(_broken[case])


_checked: set[tuple] = set()


@pytest.fixture(params=CASES)
def case(request):
    if request.param not in _checked:
        _first_create(request.getfixturevalue("hostile_client"), request.param)
        _checked.add(request.param)
    return request.param


@pytest.fixture
def spawn(hostile_client, case):
    """Create sandboxes of the current case with given limits (and another image if asked); all destroyed at teardown."""
    created = []
    _, substrate, driver, image = case

    def make(image_override: str = "", **limits):
        limits.setdefault("memory_mb", 256)
        if is_vm(case):
            limits["memory_mb"] = VM_MEMORY_MB
        sandbox = hostile_client.create(image_override or image, substrate, driver=driver, timeout_s=600, **limits)
        created.append(sandbox)
        CREATED.append(sandbox.id)
        return sandbox

    yield make
    for sandbox in created:
        try:
            sandbox.destroy()
        except dsec.DsecError:
            pass


@pytest.fixture
def bait(tmp_path_factory):
    """Secret files on the host in places an escape would read; removed afterwards."""
    secret = "dsec-secret-" + secrets.token_hex(8)
    paths = [Path("/tmp") / f"dsec-hostile-{secrets.token_hex(4)}", Path("/root") / f"dsec-hostile-{secrets.token_hex(4)}"]
    for path in paths:
        path.write_text(secret)
    yield secret, paths
    for path in paths:
        path.unlink(missing_ok=True)


@pytest.fixture
def loopback_listener():
    """A TCP listener on the host's 127.0.0.1: a sandbox reaching it has left its network namespace."""
    token = "dsec-listener-" + secrets.token_hex(6)
    connections: list[str] = []
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except OSError:
                continue
            connections.append(str(peer))
            with conn:
                conn.sendall(f"HTTP/1.0 200 OK\r\n\r\n{token}\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], token, connections
    stop.set()
    thread.join(5)
    server.close()


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect: a deselected attempt is still defined, so it shows as missing
def pytest_collection_modifyitems(session, config, items):
    """What the run defines: one (case, test) pair per collected attempt; each must leave a row in the table."""
    DEFINED.clear()
    here = Path(__file__).parent
    for item in items:
        if here not in Path(item.path).parents:
            continue  # a whole-suite run hands this hook every test; conformance cases have a `case` too
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "case" in callspec.params:
            DEFINED.append((callspec.params["case"][0], item.originalname))


@pytest.fixture(autouse=True)
def _name_rows_after_their_test(request):
    set_current_test(request.node.originalname)
    yield
    set_current_test("")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A sandbox that outlived its server fails the run (bench/load.py then refuses its figures)."""
    if LEAKS:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS and not DEFINED:
        return
    terminalreporter.section("hostile suite: attempts and outcomes")
    for line in render(ROWS, DEFINED):
        terminalreporter.write_line(line)
    for leak in LEAKS:
        terminalreporter.write_line(f"LEAK: {leak}")
    terminalreporter.write_line(f"leaks={len(LEAKS)} of {len(set(CREATED))} sandboxes created")
    dump_if_requested(ROWS, DEFINED)

"""Honest lifetimes (issue #20 point 4): a sandbox that ended answers SandboxExpired with its reason (timeout,
idle, destroyed; lost on a cluster), distinct from SandboxNotFound; keep_alive extends and never shortens; an
idle timeout spares a long call but ends a sandbox nobody calls; a server killed mid-destroy has that destroy
finished by its successor, which still answers for the id. Every wait polls a protocol-visible state with a
deadline."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import SandboxExpired, SandboxNotFound, SandboxStateError
from dsec.sdk.embedded import EmbeddedServer
from dsec.server.lifetimes import CRASH_ENV, DestroyIntents, Tombstones
from dsec.server.main import serve
from dsec.v1 import sandbox_pb2 as pb
from core.leftovers import leftovers  # tests/ is on sys.path (rootdir-relative test packages)

DEADLINE_S = 60.0
SHARED_HOME = Path(os.environ.get("DSEC_HOME", "/var/lib/dsec"))


@pytest.fixture(scope="module")
def client():
    running = serve(ServerConfig(listen="127.0.0.1:0"))
    c = dsec.Client(running.address)
    yield c
    c.close()
    running.stop()


def _wait_expired(sb: dsec.Sandbox) -> SandboxExpired:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            sb.refresh()
        except SandboxExpired as expired:
            return expired
        time.sleep(0.1)
    raise AssertionError(f"{sb.id} still alive after {DEADLINE_S}s")


def _settled(sandbox_id: str) -> list[str]:
    """What the sandbox left on the host once its teardown (which runs after its id already answers) is done."""
    deadline = time.monotonic() + DEADLINE_S
    while (left := leftovers(sandbox_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_a_destroyed_sandbox_is_expired_not_unknown(client):
    sb = client.create("busybox", timeout_s=120)
    sb.destroy()
    with pytest.raises(SandboxExpired) as caught:
        sb.exec("true")
    assert caught.value.reason == "destroyed"
    assert sb.id in str(caught.value) and "create a new one" in str(caught.value)
    assert isinstance(caught.value, SandboxStateError)  # code written against the older error still catches it
    with pytest.raises(SandboxExpired):
        sb.files.read("/etc/hostname")
    sb.destroy()  # destroying twice is fine
    with pytest.raises(SandboxNotFound) as unknown:
        client.connect("sb-00000000deadbeef")
    assert not isinstance(unknown.value, SandboxExpired)


def test_timeout_ends_with_reason_timeout(client):
    sb = client.create("busybox", timeout_s=1)
    assert _wait_expired(sb).reason == "timeout"
    assert _settled(sb.id) == []


def test_idle_timeout_spares_a_running_call_then_ends_an_idle_sandbox(client):
    sb = client.create("busybox", timeout_s=600, idle_timeout_s=1)
    assert sb.info.spec.idle_timeout_s == 1
    # the exec runs three idle timeouts long: a call in flight is activity
    result = sb.exec("sleep 3; echo still-here", timeout=60)
    assert result.stdout == b"still-here\n"
    assert _wait_expired(sb).reason == "idle"
    assert _settled(sb.id) == []


def test_keep_alive_extends_and_never_shortens(client):
    sb = client.create("busybox", timeout_s=30)
    first = sb.info.expires_at
    extended = sb.keep_alive(600)
    assert extended >= first + 500
    assert sb.keep_alive(5) == extended  # keep-alive never moves the end earlier
    sb.set_timeout(5)  # set_timeout does
    assert sb.info.expires_at < extended - 500
    sb.keep_alive(600)
    sb.destroy()
    with pytest.raises(SandboxExpired):
        sb.keep_alive(60)


def test_keep_alive_from_the_async_sdk(client):
    async def run() -> tuple[float, float]:
        sb = await dsec.AsyncSandbox.create("busybox", client=client, timeout_s=30)
        try:
            return sb.sync.info.expires_at, await sb.keep_alive(600)
        finally:
            await sb.destroy()

    before, after = asyncio.run(run())
    assert after >= before + 500


def test_bad_lifetimes_are_typed_errors(client):
    with pytest.raises(dsec.InvalidSpec):
        client.create("busybox", idle_timeout_s=-1)
    with pytest.raises(dsec.InvalidSpec):
        client.create("busybox", idle_timeout_s=float("nan"))
    sb = client.create("busybox", timeout_s=60)
    try:
        for bad in (0, -5, float("inf"), 10 * 24 * 3600):
            with pytest.raises(dsec.InvalidSpec):
                sb.keep_alive(bad)
    finally:
        sb.destroy()


def test_tombstones_are_bounded_in_number_age_and_scoped_to_the_tenant():
    stones = Tombstones(limit=3, ttl_s=60)
    for n in range(5):
        stones.add(f"sb-{n}", "timeout", "", "alice")
    assert [f"sb-{n}" in stones for n in range(5)] == [False, False, True, True, True]
    stones.add("sb-old", "idle", "", "alice", ended_at=time.time() - 61)
    assert stones.get("sb-old") is None
    assert stones.get("sb-4", "alice").reason == "timeout"
    assert stones.get("sb-4", "bob") is None  # another tenant learns nothing about it


def _private_home(root: Path) -> Path:
    """A home whose run state and destroy intents are this test's own, sharing the machine's images."""
    home = root / "home"
    home.mkdir(parents=True)
    for name in ("images", "bin", "oci", "cache"):
        if (SHARED_HOME / name).exists():
            (home / name).symlink_to(SHARED_HOME / name)
    return home


def test_a_destroy_cut_by_a_crash_is_finished_by_the_next_server(monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))  # short: sandboxes' unix sockets live under it
    home = _private_home(root)
    monkeypatch.setenv(CRASH_ENV, "destroy-after-intent")
    first = EmbeddedServer.start(home=home, http_listen="")
    monkeypatch.delenv(CRASH_ENV)
    successor = None
    try:
        with dsec.Client(first.address) as c:
            sb = c.create("busybox", timeout_s=600)
            assert sb.exec("echo up").stdout == b"up\n"
            with pytest.raises(dsec.DsecError):  # the server kills itself right after recording the intent
                sb.destroy()
        assert first.process.wait(30) != 0
        intents = DestroyIntents(home / "destroy-intents").pending()
        assert [i["sandbox_id"] for i in intents] == [sb.id] and intents[0]["reason"] == "destroyed"
        assert any("cgroup" in item or "process" in item for item in leftovers(sb.id))  # teardown never began

        successor = EmbeddedServer.start(home=home, http_listen="")  # reports ready only after finishing it
        assert DestroyIntents(home / "destroy-intents").pending() == []
        assert _settled(sb.id) == []  # the kernel reaps a killed container's processes asynchronously
        with dsec.Client(successor.address) as c, pytest.raises(SandboxExpired) as caught:
            c.connect(sb.id)
        assert caught.value.reason == "destroyed"
    finally:
        if first.process.poll() is None:
            first.stop()
        if successor is not None:
            successor.stop()
        shutil.rmtree(root, ignore_errors=True)


def _until(check, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while not (value := check()):
        assert time.monotonic() < deadline, f"not {what} after {DEADLINE_S}s"
        time.sleep(0.05)
    return value


def test_a_failed_teardown_is_retried_by_the_live_server(monkeypatch):
    """A teardown that fails (here: the driver's destroy raises EBUSY while `busy` is set) is not left for the
    next server start: the running server keeps the sandbox counted, its intent on disk, and tries again with
    backoff until it succeeds; then nothing of the sandbox is left."""
    running = serve(ServerConfig(listen="127.0.0.1:0", http_listen=""))
    manager = running.manager
    try:
        with dsec.Client(running.address) as c:
            sb = c.create("busybox", timeout_s=600)
            assert sb.exec("echo up").stdout == b"up\n"
            driver = manager.get(sb.id).driver
            real_destroy, attempts, busy = driver.destroy, [], threading.Event()
            busy.set()

            def flaky_destroy(handle):
                attempts.append(handle.sandbox_id)
                if busy.is_set():
                    raise OSError(errno.EBUSY, "injected: the rootfs is busy")
                real_destroy(handle)

            monkeypatch.setattr(driver, "destroy", flaky_destroy)
            sb.destroy()  # returns once killed; the teardown fails in the background
            _until(lambda: len(attempts) >= 2, "retried")  # the first attempt and one retry, both failed
            assert sb.id in manager.teardown_retries.ids()
            assert manager._live_total() == 1  # still holds host resources, so still counted
            assert [i["sandbox_id"] for i in manager.intents.pending()] == [sb.id]
            assert any(item.startswith("mount:") for item in leftovers(sb.id))
            with pytest.raises(SandboxExpired) as caught:  # its id already answers as destroyed
                c.connect(sb.id)
            assert caught.value.reason == "destroyed"

            busy.clear()  # the cause goes away: the next retry finishes the destroy
            _until(lambda: manager._live_total() == 0, "released")
            assert manager.intents.pending() == [] and manager.teardown_retries.ids() == set()
            assert _settled(sb.id) == []
    finally:
        running.stop()


def test_destroy_intents_survive_as_files_until_finished(tmp_path):
    intents = DestroyIntents(tmp_path / "intents")
    run_dir = tmp_path / "run" / "dead-server"  # no server.lock held: its server is dead
    state_dir = run_dir / "sb-1234567890abcdef"
    state_dir.mkdir(parents=True)
    intents.record("sb-1234567890abcdef", driver="crun", state_dir=state_dir, run_dir=run_dir, reason="idle",
                   detail="no call for 5s", tenant="alice")
    on_disk = json.loads((tmp_path / "intents" / "sb-1234567890abcdef.json").read_text())
    assert on_disk["reason"] == "idle" and on_disk["tenant"] == "alice"
    cleaned: list[tuple[str, Path]] = []
    finished = intents.finish_dead(lambda driver, path: cleaned.append((driver, path)))
    assert [i["sandbox_id"] for i in finished] == ["sb-1234567890abcdef"]
    assert cleaned == [("crun", state_dir)]
    assert intents.pending() == []


def test_the_expired_reason_travels_as_a_trailer(client):
    sb = client.create("busybox", timeout_s=60)
    sb.destroy()
    with pytest.raises(grpc.RpcError) as caught:
        client.sandboxes.Get(pb.SandboxRef(sandbox_id=sb.id))
    trailers = dict(caught.value.trailing_metadata())
    assert trailers["dsec-error"] == "SandboxExpired"
    assert trailers["dsec-expired-reason"] == "destroyed"

"""Warm pools (issue #20 point 1): a create that matches a pool's shape is served from it (SandboxInfo.timings_ms
has `pool_claim`, the pool counts the claim) with its own identity (id, labels, timeout, env), never with a trace of
earlier use; the pool refills to its size; pooled sandboxes are not listed and count against no tenant; refills
never take an admission slot a user create waits for; shutdown destroys them. Every wait polls with a deadline."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

import dsec
from dsec.config import PoolConfig, ServerConfig, parse_pool
from dsec.server.admission import CreateAdmission
from dsec.server.main import serve
from dsec.server.pools import DEMAND_WINDOW_S, Pool
from dsec.server.state import SANDBOX_RECORD
from core.leftovers import leftovers  # tests/ is on sys.path (rootdir-relative test packages)

DEADLINE_S = 120.0
TOKENS = {"default": "tok-operator-0001", "alice": "tok-alice-0001"}

# (substrate, driver, image): one pool shape per case
CASES = [
    pytest.param(("container", "crun", "busybox"), id="crun"),
    pytest.param(("container", "runc", "busybox"), id="runc"),
    pytest.param(("container", "docker", "busybox"), id="docker"),
    pytest.param(("function", "", "python"), id="function"),
    pytest.param(("microvm", "", "busybox"), id="microvm"),
]


@pytest.fixture(scope="module")
def server():
    running = serve(ServerConfig(listen="127.0.0.1:0"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with dsec.Client(server.address) as c:
        yield c


def _wait_ready(client: dsec.Client, image: str, substrate: str, ready: int):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        pool = client.pools.get(image, substrate)
        assert pool is not None
        assert not pool.last_error, pool.last_error
        if pool.ready == ready:
            return pool
        time.sleep(0.05)
    raise AssertionError(f"pool {image}/{substrate} not at {ready} ready after {DEADLINE_S}s: {pool}")


@pytest.mark.parametrize("case", CASES)
def test_a_matching_create_claims_a_pooled_sandbox_with_its_own_identity(client, case):
    substrate, driver, image = case
    client.pools.resize(image, 1, substrate=substrate, driver=driver)
    try:
        before = _wait_ready(client, image, substrate, 1)
        assert client.list({"dsec.pool": image}) == []  # pooled sandboxes are nobody's: not listed
        sb = client.create(image, substrate, driver=driver, timeout_s=300, env={"GREETING": "hello"},
                           labels={"owner": "test"})
        try:
            assert "pool_claim" in sb.info.timings_ms  # served from the pool, seen without timing anything
            after = client.pools.get(image, substrate)
            assert after.claims == before.claims + 1
            assert dict(sb.info.spec.labels) == {"owner": "test"}
            assert dict(sb.info.spec.env) == {"GREETING": "hello"}
            assert 290 <= sb.info.expires_at - time.time() <= 300
            assert [s.id for s in client.list({"owner": "test"})] == [sb.id]
            assert sb.exec("echo $GREETING").stdout == b"hello\n"  # the claim's env reaches its processes
            if substrate == "function":
                assert sb.call(pow, 2, 10) == 1024
            _wait_ready(client, image, substrate, 1)  # refilled to its size
        finally:
            sb.destroy()
    finally:
        client.pools.resize(image, 0, substrate=substrate, driver=driver)
    assert client.pools.get(image, substrate) is None


def test_a_claimed_sandbox_has_no_trace_of_earlier_use(client):
    client.pools.resize("busybox", 1)
    try:
        _wait_ready(client, "busybox", "container", 1)
        first = client.create("busybox")
        assert "pool_claim" in first.info.timings_ms
        first.exec("echo used > /tmp/marker && echo used > /root/marker && touch /marker")
        first.destroy()
        _wait_ready(client, "busybox", "container", 1)
        second = client.create("busybox")
        try:
            assert "pool_claim" in second.info.timings_ms
            assert second.id != first.id
            check = second.exec("ls /tmp/marker /root/marker /marker 2>&1; ps -o pid,args | wc -l")
            assert b"No such file" in check.stdout and b"used" not in check.stdout
            with pytest.raises(dsec.SandboxExpired):
                first.exec("true")  # the first claim's id stays ended: ids are never reused
        finally:
            second.destroy()
    finally:
        client.pools.resize("busybox", 0)


def test_a_create_of_another_shape_is_cold(client):
    client.pools.resize("busybox", 1)
    try:
        claims = _wait_ready(client, "busybox", "container", 1).claims
        for options in ({"memory_mb": 256}, {"network": True}, {"workdir": "/tmp"}):
            sb = client.create("busybox", **options)
            try:
                assert "pool_claim" not in sb.info.timings_ms, options
            finally:
                sb.destroy()
        assert client.pools.get("busybox").claims == claims
    finally:
        client.pools.resize("busybox", 0)


def test_pool_shapes_are_validated():
    with pytest.raises(ValueError):
        parse_pool("image=busybox")  # size is required
    with pytest.raises(ValueError):
        parse_pool("image=busybox,size=2,memroy_mb=64")
    assert parse_pool("image=python, substrate=function, size=3, memory_mb=256") == PoolConfig(
        image="python", substrate="function", size=3, memory_mb=256)


def test_bad_pool_requests_are_typed_errors(client):
    with pytest.raises(dsec.InvalidSpec):
        client.pools.resize("busybox", -1)
    with pytest.raises(dsec.InvalidSpec):
        client.pools.resize("busybox", 1, substrate="mainframe")
    with pytest.raises(dsec.ImageNotFound):
        client.pools.resize("no-such-image-anywhere", 1)


def test_pooled_sandboxes_count_against_no_tenant_and_only_the_operator_resizes():
    tokens = ",".join(f"{token}:{tenant}" for tenant, token in TOKENS.items())
    running = serve(ServerConfig(listen="127.0.0.1:0", tokens=tokens, tenant_max_sandboxes=1,
                                 pools=[PoolConfig(image="busybox", size=2)]))
    try:
        with dsec.Client(running.address, token=TOKENS["alice"]) as alice, \
                dsec.Client(running.address, token=TOKENS["default"]) as operator:
            _wait_ready(alice, "busybox", "container", 2)
            assert alice.list() == []
            sb = alice.create("busybox")  # two pooled sandboxes exist, yet alice is under her quota of one
            assert "pool_claim" in sb.info.timings_ms
            record = json.loads((running.manager.get(sb.id).state_dir / SANDBOX_RECORD).read_text())
            assert record["tenant"] == "alice"  # crash cleanup and audits see the claimer
            with pytest.raises(dsec.CapacityExceeded):
                alice.create("busybox")  # her claim counts; the pool does not hand out past her quota
            assert [s.id for s in alice.list()] == [sb.id]
            assert operator.list() == []  # a claim belongs to its claimer only
            with pytest.raises(dsec.PermissionDenied):
                alice.pools.resize("busybox", 5)
            assert operator.pools.resize("busybox", 3).size == 3
    finally:
        running.stop()


def test_shutdown_destroys_pooled_sandboxes():
    running = serve(ServerConfig(listen="127.0.0.1:0", pools=[PoolConfig(image="busybox", size=2)]))
    try:
        with dsec.Client(running.address) as c:
            _wait_ready(c, "busybox", "container", 2)
        ids = [s.sandbox_id for pool in running.manager.pools.list() for s in pool.ready]
        assert len(ids) == 2 and all(leftovers(i) for i in ids)
    finally:
        running.stop()
    assert {i: leftovers(i) for i in ids} == {i: [] for i in ids}


def test_a_refill_never_takes_a_slot_a_user_create_waits_for():
    admission = CreateAdmission(max_sandboxes=100, max_concurrent=1, queue_limit=4, tenant_max=0)
    holding, waiting, release, release_second = (threading.Event() for _ in range(4))

    def user(started: threading.Event, until: threading.Event) -> None:
        with admission.slot("alice", lambda: 0, lambda _t: 0):
            started.set()
            until.wait(30)

    first = threading.Thread(target=user, args=(holding, release))
    first.start()
    assert holding.wait(30)
    second = threading.Thread(target=user, args=(waiting, release_second))
    second.start()
    deadline = time.monotonic() + 30
    while admission._waiting == 0:  # the second user create is in line (a protocol-visible state)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not admission.try_background_slot(lambda: True)  # slot busy and a user waiting
    release.set()
    assert waiting.wait(30)  # the freed slot went to the user, not to background work
    assert not admission.try_background_slot(lambda: True)  # the user holds it now
    release_second.set()
    first.join(30)
    second.join(30)
    assert admission.try_background_slot(lambda: True)  # free and nobody waiting: background may go
    assert not admission.try_background_slot(lambda: True)  # but only one of max_concurrent=1
    admission.release_background_slot()
    assert not admission.try_background_slot(lambda: False)  # and never past the server's room


def test_an_egress_allowlist_is_part_of_the_shape(client):
    allow = ["0.0.0.0/0"]
    client.pools.resize("busybox", 1, network_allow=allow)
    try:
        assert _wait_ready_allow(client, allow).network_allow == allow
        plain = client.create("busybox")
        try:
            assert "pool_claim" not in plain.info.timings_ms  # no allowlist: another shape
        finally:
            plain.destroy()
        sb = client.create("busybox", network_allow=allow)
        try:
            assert "pool_claim" in sb.info.timings_ms
            assert list(sb.info.spec.network_allow) == allow
        finally:
            sb.destroy()
    finally:
        client.pools.resize("busybox", 0, network_allow=allow)


def _wait_ready_allow(client: dsec.Client, allow: list[str]):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        pool = client.pools.get("busybox", network_allow=allow)
        assert pool is not None and not pool.last_error, pool
        if pool.ready == 1:
            return pool
        time.sleep(0.05)
    raise AssertionError(f"allowlisted pool not ready after {DEADLINE_S}s")


def test_an_e2b_create_through_the_door_is_served_from_a_pool(tmp_path, monkeypatch):
    """The real e2b SDK: its default create (template base, internet on = allowlist 0.0.0.0/0) claims a pooled
    sandbox when the node keeps a pool of that shape, with the metadata and env of the create."""
    from e2b import Sandbox as E2BSandbox

    from dsec.sdk.embedded import EmbeddedServer

    home = tmp_path / "home"
    home.mkdir()
    shared = Path(os.environ.get("DSEC_HOME", "/var/lib/dsec"))
    for name in ("images", "bin", "oci", "cache"):
        if (shared / name).exists():
            (home / name).symlink_to(shared / name)
    server = EmbeddedServer.start(home=home, http_listen="127.0.0.1:0",
                                  extra_args=["--pool", "image=base,size=1,network_allow=0.0.0.0/0"])
    try:
        for key, value in {"E2B_API_URL": server.http_url, "E2B_SANDBOX_URL": server.http_url,
                           "E2B_API_KEY": "e2b_dsec_test_key"}.items():
            monkeypatch.setenv(key, value)
        with dsec.Client(server.address) as native:
            deadline = time.monotonic() + DEADLINE_S
            while (pool := native.pools.get("base", network_allow=["0.0.0.0/0"])) is None or pool.ready < 1:
                assert time.monotonic() < deadline, pool
                time.sleep(0.05)
            sb = E2BSandbox.create(timeout=120, metadata={"suite": "pools"}, envs={"GREETING": "hi"})
            try:
                info = native.connect(sb.sandbox_id).refresh()
                assert "pool_claim" in info.timings_ms
                assert info.spec.labels["suite"] == "pools"
                assert sb.commands.run("echo $GREETING").stdout == "hi\n"
            finally:
                sb.kill()
            assert native.pools.get("base", network_allow=["0.0.0.0/0"]).claims == 1
    finally:
        server.stop()


def test_an_adaptive_pool_follows_recent_demand(client):
    client.pools.resize("busybox", 1, max_size=3)
    made: list[dsec.Sandbox] = []
    try:
        _wait_ready(client, "busybox", "container", 1)
        made = [client.create("busybox") for _ in range(3)]  # one claim, then two misses: demand of three
        assert sum("pool_claim" in sb.info.timings_ms for sb in made) >= 1
        status = _wait_ready(client, "busybox", "container", 3)
        assert status.target == 3 and status.max_size == 3
    finally:
        for sb in made:
            sb.destroy()
        client.pools.resize("busybox", 0)


def test_demand_decays_to_the_base_size():
    pool = Pool(config=PoolConfig(image="busybox", size=1, max_size=3), spec=dsec.SandboxSpec(), key=None,
                size=1, max_size=3)
    for t in (100.0, 101.0, 102.0, 103.0, 104.0):
        pool.note_demand(t)
    assert pool.target(104.0) == 3  # capped at max_size
    assert pool.target(104.0 + DEMAND_WINDOW_S + 1) == 1  # a quiet minute later: back to size
    assert len(pool.demand) <= 3  # the demand record stays bounded

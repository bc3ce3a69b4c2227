"""The real `e2b` SDK (sync and async) against dsec's E2B control API: lifecycle, metadata listing with
filters and pagination, timeouts that kill, pause/resume, snapshots, fork and the NotFound answers.
Files are checked through dsec's own SDK on the same sandbox, so these tests do not depend on envd."""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid

import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import SandboxException, SandboxNotFoundException

import dsec

DEADLINE_S = 60.0

# (template, extra metadata, internet): the substrate is chosen with metadata `dsec.substrate`.
SUBSTRATE_CASES = [
    pytest.param(("base", {}, None), id="container"),
    pytest.param(("base", {"dsec.substrate": "function"}, None), id="function"),
    pytest.param(("busybox", {"dsec.substrate": "microvm"}, False), id="microvm"),
]


@pytest.fixture(scope="module")
def native(dsec_http):
    client = dsec.Client(dsec_http.grpc_address)
    yield client
    client.close()


def _gone(sandbox_id: str) -> bool:
    try:
        Sandbox.get_info(sandbox_id)
    except SandboxNotFoundException:
        return True
    return False


def _wait_gone(sandbox_id: str) -> None:
    """Poll the control API (each poll is one request) until the sandbox is gone, bounded by a deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not _gone(sandbox_id):
        assert time.monotonic() < deadline, f"{sandbox_id} still alive after {DEADLINE_S}s"


@pytest.mark.parametrize("case", SUBSTRATE_CASES)
def test_create_info_kill_on_each_substrate(e2b_env, native, case):
    template, extra, internet = case
    tag = uuid.uuid4().hex
    sb = Sandbox.create(template=template, timeout=120, metadata={"suite": tag, **extra}, envs={"GREETING": "hi"},
                        allow_internet_access=internet)
    try:
        info = sb.get_info()
        assert info.sandbox_id == sb.sandbox_id
        assert info.template_id == template
        assert info.metadata == {"suite": tag, **extra}
        assert info.state == SandboxState.RUNNING
        assert 100 <= (info.end_at - info.started_at).total_seconds() <= 121
        native_info = native.connect(sb.sandbox_id).refresh()
        assert native_info.spec.substrate == extra.get("dsec.substrate", "container")
        assert native_info.spec.labels["suite"] == tag  # metadata is dsec labels
        result = native.connect(sb.sandbox_id).exec("echo $GREETING")
        assert result.stdout.strip() == b"hi"
    finally:
        assert sb.kill() is True
    assert _gone(sb.sandbox_id)
    assert Sandbox.kill(sb.sandbox_id) is False  # SDK: 404 on kill → False


def test_base_template_has_bash_coreutils_python_and_user(e2b_env, native):
    sb = Sandbox.create(timeout=60)  # the SDK's default template is "base"
    try:
        result = native.connect(sb.sandbox_id).exec(
            ["bash", "-c", "python3 -c 'print(6*7)'; ls --version | head -1; id -u user; echo $HOME"])
        lines = result.stdout.decode().split("\n")
        assert result.exit_code == 0, result.stderr
        assert lines[0] == "42" and "coreutils" in lines[1] and lines[2] == "1000"
    finally:
        sb.kill()


def test_list_metadata_filter_state_filter_and_pagination(e2b_env):
    tag = uuid.uuid4().hex
    sandboxes = [Sandbox.create(timeout=120, metadata={"suite": tag, "i": str(i)}) for i in range(3)]
    try:
        query = SandboxQuery(metadata={"suite": tag})
        paginator = Sandbox.list(query=query, limit=2)
        first = paginator.next_items()
        assert len(first) == 2 and paginator.has_next and paginator.next_token
        second = paginator.next_items()
        assert len(second) == 1 and not paginator.has_next
        assert {s.sandbox_id for s in first + second} == {s.sandbox_id for s in sandboxes}
        # default order is newest first
        assert [s.sandbox_id for s in first + second] == [s.sandbox_id for s in reversed(sandboxes)]
        ascending = Sandbox.list(query=query, order="asc").next_items()
        assert [s.sandbox_id for s in ascending] == [s.sandbox_id for s in sandboxes]

        only_one = Sandbox.list(query=SandboxQuery(metadata={"suite": tag, "i": "1"})).next_items()
        assert [s.sandbox_id for s in only_one] == [sandboxes[1].sandbox_id]
        assert only_one[0].metadata == {"suite": tag, "i": "1"}

        sandboxes[2].pause()
        paused = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [sandboxes[2].sandbox_id]
        running = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.RUNNING])).next_items()
        assert {s.sandbox_id for s in running} == {sandboxes[0].sandbox_id, sandboxes[1].sandbox_id}
    finally:
        for sb in sandboxes:
            sb.kill()
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items() == []


def test_set_timeout_extends_and_a_short_timeout_kills(e2b_env):
    sb = Sandbox.create(timeout=30)
    try:
        sb.set_timeout(600)
        info = sb.get_info()
        assert (info.end_at - info.started_at).total_seconds() > 500
        sb.set_timeout(1)
        _wait_gone(sb.sandbox_id)
        assert sb.is_running() is False  # envd /health answers 502 for an ended sandbox, as E2B's proxy does
    finally:
        sb.kill()


@pytest.mark.parametrize("case", SUBSTRATE_CASES)
def test_pause_resume_keeps_files(e2b_env, native, case):
    template, extra, internet = case
    sb = Sandbox.create(template=template, timeout=120, metadata=extra, allow_internet_access=internet)
    try:
        native.connect(sb.sandbox_id).files.write("/tmp/kept.txt", "before pause")
        assert sb.pause() is True
        assert sb.get_info().state == SandboxState.PAUSED
        assert sb.pause() is False  # SDK: 409 → already paused
        resumed = Sandbox.connect(sb.sandbox_id)
        assert resumed.sandbox_id == sb.sandbox_id
        assert sb.get_info().state == SandboxState.RUNNING
        assert native.connect(sb.sandbox_id).files.read_text("/tmp/kept.txt") == "before pause"
    finally:
        sb.kill()


@pytest.mark.parametrize("case", SUBSTRATE_CASES)
def test_snapshot_create_list_restore_delete(e2b_env, native, case):
    template, extra, internet = case
    sb = Sandbox.create(template=template, timeout=120, metadata=extra, allow_internet_access=internet)
    restored = None
    try:
        native.connect(sb.sandbox_id).files.write("/tmp/snap.txt", "in the snapshot")
        name = f"snap-test-{uuid.uuid4().hex[:8]}"
        snapshot = sb.create_snapshot(name=name)
        assert snapshot.snapshot_id and snapshot.names == [name]
        listed = Sandbox.list_snapshots(sandbox_id=sb.sandbox_id).next_items()
        assert snapshot.snapshot_id in [s.snapshot_id for s in listed]
        restored = Sandbox.create(template=snapshot.snapshot_id, timeout=60)
        assert native.connect(restored.sandbox_id).files.read_text("/tmp/snap.txt") == "in the snapshot"
        by_name = Sandbox.create(template=name, timeout=60)  # a snapshot's name works as a template too
        by_name.kill()
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is False
    finally:
        sb.kill()
        if restored is not None:
            restored.kill()


@pytest.mark.parametrize("case", SUBSTRATE_CASES)
def test_fork(e2b_env, native, case):
    template, extra, internet = case
    sb = Sandbox.create(template=template, timeout=120, metadata={"role": "parent", **extra}, allow_internet_access=internet)
    forks: list[Sandbox] = []
    try:
        native.connect(sb.sandbox_id).files.write("/tmp/forked.txt", "from the parent")
        forks = sb.fork(count=2, timeout=90)
        assert len(forks) == 2 and len({f.sandbox_id for f in forks} | {sb.sandbox_id}) == 3
        for fork in forks:
            assert native.connect(fork.sandbox_id).files.read_text("/tmp/forked.txt") == "from the parent"
            info = fork.get_info()
            left = (info.end_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
            assert info.state == SandboxState.RUNNING and 0 < left <= 91  # the fork's own timeout, not the parent's 120
    finally:
        for fork in forks:
            fork.kill()
        sb.kill()


def test_unknown_template_and_unknown_sandbox_are_not_found(e2b_env):
    with pytest.raises(SandboxException) as caught:
        Sandbox.create(template="no-such-template-" + uuid.uuid4().hex[:6])
    assert caught.value.status_code == 404 and "not found" in str(caught.value)
    missing = "sb-" + "0" * 16
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(missing)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(missing, 30)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(missing)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.pause(missing)
    assert Sandbox.kill(missing) is False


def test_internet_off_is_no_network(e2b_env, native):
    sb = Sandbox.create(timeout=60, allow_internet_access=False)
    try:
        assert sb.get_info().allow_internet_access is False
        spec = native.connect(sb.sandbox_id).refresh().spec
        assert not spec.network and list(spec.network_allow) == []
        on = Sandbox.create(timeout=60)
        try:
            assert list(native.connect(on.sandbox_id).refresh().spec.network_allow) == ["0.0.0.0/0"]
        finally:
            on.kill()
    finally:
        sb.kill()


def test_auto_pause_pauses_at_the_timeout_and_connect_resumes(e2b_env, native):
    sb = Sandbox.create(timeout=60, lifecycle={"on_timeout": "pause"})
    try:
        assert sb.get_info().lifecycle["on_timeout"] == "pause"
        native.connect(sb.sandbox_id).files.write("/tmp/auto.txt", "kept while paused")
        sb.set_timeout(1)
        deadline = time.monotonic() + DEADLINE_S
        while sb.get_info().state != SandboxState.PAUSED:  # one control-API request per poll
            assert time.monotonic() < deadline, "the timeout did not pause the sandbox"
        Sandbox.connect(sb.sandbox_id, timeout=120)
        info = sb.get_info()
        assert info.state == SandboxState.RUNNING and (info.end_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds() > 60
        assert native.connect(sb.sandbox_id).files.read_text("/tmp/auto.txt") == "kept while paused"
    finally:
        sb.kill()


def test_auto_resume_resumes_a_paused_sandbox_on_the_next_call(e2b_env):
    sb = Sandbox.create(timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        assert sb.get_info().lifecycle["auto_resume"] is True
        sb.commands.run("echo kept > /tmp/auto.txt")
        assert sb.pause() is True
        assert sb.get_info().state == SandboxState.PAUSED
        assert sb.commands.run("cat /tmp/auto.txt").stdout == "kept\n", "the command resumed it first"
        assert sb.get_info().state == SandboxState.RUNNING
    finally:
        sb.kill()


def test_async_sdk_lifecycle(e2b_env, native):
    async def scenario() -> None:
        tag = uuid.uuid4().hex
        sb = await AsyncSandbox.create(timeout=60, metadata={"suite": tag})
        try:
            info = await sb.get_info()
            assert info.metadata == {"suite": tag}
            listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
            assert [s.sandbox_id for s in listed] == [sb.sandbox_id]
            await sb.set_timeout(120)
            assert await sb.pause() is True
            await AsyncSandbox.connect(sb.sandbox_id)
            assert (await sb.get_info()).state == SandboxState.RUNNING
            forks = await sb.fork(count=1)
            assert len(forks) == 1
            assert await forks[0].kill() is True
        finally:
            assert await sb.kill() is True
        with pytest.raises(SandboxNotFoundException):
            await AsyncSandbox.get_info(sb.sandbox_id)

    asyncio.run(scenario())


@pytest.mark.parametrize("case", [SUBSTRATE_CASES[0], SUBSTRATE_CASES[2]])
def test_metrics(e2b_env, native, case):
    template, extra, internet = case
    sb = Sandbox.create(template=template, timeout=120, metadata=extra, allow_internet_access=internet)
    try:
        native.connect(sb.sandbox_id).exec("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
        (metric,) = sb.get_metrics()
        assert metric.cpu_count >= 1 and 0 <= metric.cpu_used_pct <= 100
        assert 0 < metric.mem_used < metric.mem_total <= 1 << 40
        assert abs(metric.timestamp.timestamp() - time.time()) < 60
        if extra.get("dsec.substrate") is None:  # containers report their own disk; VMs do not (docs/compat.md)
            assert 0 < metric.disk_used < metric.disk_total
        assert sb.get_metrics(end=datetime.datetime.now() - datetime.timedelta(hours=1)) == []
    finally:
        sb.kill()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_metrics(sb.sandbox_id)


def test_logs_through_the_generated_client(e2b_env, native):
    """The Python SDK has no logs method; its generated API client (the same HTTP code) calls both log routes."""
    from e2b.api.client.api.sandboxes import get_sandboxes_sandbox_id_logs, get_v_2_sandboxes_sandbox_id_logs
    from e2b.api.client.models import LogLevel, LogsDirection
    from e2b.api.client_sync import get_api_client
    from e2b.connection_config import ConnectionConfig

    sb = Sandbox.create(timeout=120)
    try:
        native.connect(sb.sandbox_id).exec("true")
        native.connect(sb.sandbox_id).exec("exit 3")
        sb.pause()
        Sandbox.connect(sb.sandbox_id)
        api = get_api_client(ConnectionConfig())
        v1 = get_sandboxes_sandbox_id_logs.sync_detailed(sb.sandbox_id, client=api)
        assert v1.status_code == 200
        messages = [e.message for e in v1.parsed.log_entries]
        assert messages == ["sandbox created", "exec finished", "exec finished", "sandbox paused", "sandbox resumed"]
        assert "exit_code=3" in v1.parsed.logs[2].line
        warn = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(sb.sandbox_id, client=api, level=LogLevel.WARN)
        assert [(e.message, e.fields["exit_code"]) for e in warn.parsed.logs] == [("exec finished", "3")]
        newest = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(sb.sandbox_id, client=api, direction=LogsDirection.BACKWARD, limit=1)
        assert [e.message for e in newest.parsed.logs] == ["sandbox resumed"]
        missing = get_sandboxes_sandbox_id_logs.sync_detailed("sb-" + "0" * 16, client=api)
        assert missing.status_code == 404
    finally:
        sb.kill()


def test_update_network_is_refused_and_refresh_sets_the_timeout(e2b_env):
    from e2b.api.client.api.sandboxes import post_sandboxes_sandbox_id_refreshes
    from e2b.api.client.models import SandboxRefreshRequest
    from e2b.api.client_sync import get_api_client
    from e2b.connection_config import ConnectionConfig

    sb = Sandbox.create(timeout=60)
    try:
        with pytest.raises(SandboxException) as caught:
            sb.update_network({"allow_out": ["1.1.1.1"]})
        assert caught.value.status_code == 400 and "not supported" in str(caught.value)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.update_network("sb-" + "0" * 16, {"allow_out": ["1.1.1.1"]})
        api = get_api_client(ConnectionConfig())
        reply = post_sandboxes_sandbox_id_refreshes.sync_detailed(sb.sandbox_id, client=api,
                                                                 body=SandboxRefreshRequest(duration=600))
        assert reply.status_code == 204
        left = (sb.get_info().end_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        assert 500 < left <= 600
    finally:
        sb.kill()

"""The real `e2b` SDK (sync and async) driving commands and PTYs through dsec's envd `process.Process` door,
on every substrate that runs bash: foreground runs (stdout/stderr, env, cwd, user, streaming callbacks),
non-zero exits, background handles (wait, kill, list, connect by pid without replay), stdin (send, close),
the Start deadline killing the process, PTYs (create, input, resize, kill), bad selectors; and the same
ProcessService through dsec's own SDK, directly and through a cluster gateway.

Every wait is on a protocol event (an output marker, the end event, a listed pid), never a sleep."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from e2b import AsyncSandbox, CommandExitException, Sandbox
from e2b.exceptions import InvalidArgumentException, NotFoundException, TimeoutException
from e2b.sandbox.commands.command_handle import PtySize

import dsec
from dsec.cluster.gateway import Gateway, serve_gateway
from dsec.cluster.placement import Capacity

pytestmark = pytest.mark.timeout(300)

SUBSTRATES = [
    pytest.param({}, id="container"),
    pytest.param({"dsec.substrate": "function"}, id="function"),
    pytest.param({"dsec.substrate": "microvm"}, id="microvm"),  # the agent runs as the guest agent
]


@pytest.fixture(scope="module", params=SUBSTRATES)
def sandbox(request, dsec_http):
    """One E2B sandbox of the `base` template per substrate, shared by the tests of this module."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dsec_http.env.items():
            patch.setenv(key, value)
        patch.delenv("E2B_DEBUG", raising=False)
        sb = Sandbox.create("base", timeout=600, metadata={"suite": "commands", **request.param}, envs={"SANDBOX_VAR": "sv"})
        try:
            yield sb
        finally:
            sb.kill()


@pytest.fixture
def sb(sandbox, e2b_env):
    return sandbox


def until(handle, marker: str) -> str:
    """Consume a handle's output until `marker` appeared (stdout, stderr or PTY bytes)."""
    seen = ""
    for stdout, stderr, pty in handle:
        seen += stdout or stderr or (pty.decode(errors="replace") if pty else "")
        if marker in seen:
            return seen
    raise AssertionError(f"stream ended before {marker!r}: {seen!r}")


def test_foreground_output_env_cwd_and_user(sb):
    result = sb.commands.run("echo out; echo err >&2; echo $FOO $SANDBOX_VAR; pwd; whoami", envs={"FOO": "bar"})
    assert result.exit_code == 0 and result.error is None
    assert result.stdout == "out\nbar sv\n/home/user\nuser\n"
    assert result.stderr == "err\n"
    assert sb.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    root = sb.commands.run("whoami; echo $HOME; pwd", user="root")
    assert root.stdout == "root\n/root\n/root\n"


def test_on_stdout_streams_before_the_command_ends(sb):
    handle = sb.commands.run("echo first; read line; echo second $line >&2", background=True, stdin=True)
    chunks: list[str] = []
    for stdout, _, _ in handle:
        chunks.append(stdout)
        if "first" in "".join(chunks):
            break  # the process is blocked on stdin: this output was streamed, not buffered to the end
    handle.send_stdin("go\n")
    errors: list[str] = []
    result = handle.wait(on_stderr=errors.append)
    assert "".join(errors) == "second go\n" and result.exit_code == 0


def test_non_zero_exit_raises_the_exit_exception(sb):
    with pytest.raises(CommandExitException) as caught:
        sb.commands.run("echo partial; echo bad >&2; exit 3")
    assert caught.value.exit_code == 3
    assert caught.value.stdout == "partial\n" and caught.value.stderr == "bad\n"
    assert caught.value.error == "exit status 3"


def test_background_list_kill_wait(sb):
    handle = sb.commands.run("sleep 600", background=True)
    listed = {p.pid: p for p in sb.commands.list()}
    assert handle.pid in listed
    assert listed[handle.pid].cmd == "/bin/bash" and listed[handle.pid].args == ["-l", "-c", "sleep 600"]
    assert handle.kill() is True
    with pytest.raises(CommandExitException) as caught:
        handle.wait()
    assert caught.value.exit_code == -1 and caught.value.error == "signal: killed"
    assert handle.pid not in {p.pid for p in sb.commands.list()}
    assert sb.commands.kill(handle.pid) is False  # ended: envd answers NOT_FOUND, the SDK says False


def test_connect_reattaches_without_replay(sb):
    handle = sb.commands.run("echo one; read x; echo two $x", background=True, stdin=True)
    assert "one" in until(handle, "one")
    handle.disconnect()
    again = sb.commands.connect(handle.pid)
    assert again.pid == handle.pid
    sb.commands.send_stdin(handle.pid, "yes\n")
    result = again.wait()
    assert result.stdout == "two yes\n", "a re-attached stream sees what comes next, nothing replayed"
    assert result.exit_code == 0


def test_stdin_send_and_close(sb):
    handle = sb.commands.run("cat; echo done", background=True, stdin=True)
    handle.send_stdin("abc ")
    sb.commands.send_stdin(handle.pid, b"def")
    handle.close_stdin()
    assert handle.wait().stdout == "abc defdone\n"


def test_stream_input_keeps_order(sb):
    handle = sb.commands.run("cat", background=True, stdin=True)
    sb.commands.stream_input(handle.pid, (f"{i}," for i in range(200)))
    handle.close_stdin()
    assert handle.wait().stdout == "".join(f"{i}," for i in range(200))
    terminal = sb.pty.create(PtySize(cols=80, rows=24))
    sb.pty.stream_input(terminal.pid, [b"echo ab", b"c-$((1+1))\n"])
    until(terminal, "abc-2")
    sb.pty.kill(terminal.pid)


def test_the_start_deadline_kills_the_command(sb):
    with pytest.raises(TimeoutException):
        sb.commands.run("sleep 600", timeout=2)
    handle = sb.commands.run("echo started; sleep 600", background=True, timeout=6)
    until(handle, "started")
    handle.disconnect()
    with pytest.raises(CommandExitException) as caught:
        sb.commands.connect(handle.pid, timeout=60).wait()  # the end event comes once dsec killed it
    assert caught.value.error == "signal: killed"


def test_pty_create_input_resize_kill(sb):
    output: list[bytes] = []
    terminal = sb.pty.create(PtySize(cols=80, rows=24))
    sb.pty.send_stdin(terminal.pid, b"stty size; tty; echo $((6*7))-$TERM\n")
    text = until(terminal, "42-xterm-256color")
    assert "24 80" in text and "/dev/pts/" in text
    sb.pty.resize(terminal.pid, PtySize(cols=132, rows=43))
    sb.pty.send_stdin(terminal.pid, b"stty size\n")
    assert "43 132" in until(terminal, "43 132")
    assert terminal.pid in {p.pid for p in sb.commands.list()}
    assert sb.pty.kill(terminal.pid) is True
    with pytest.raises(CommandExitException):
        terminal.wait(on_pty=output.append)
    assert sb.pty.kill(terminal.pid) is False


def test_pty_exit_code_and_ctrl_d(sb):
    terminal = sb.pty.create(PtySize(cols=40, rows=10), cwd="/tmp", envs={"X": "1"})
    sb.pty.send_stdin(terminal.pid, b"echo $X:$(pwd)\n")
    seen = until(terminal, "1:/tmp")
    if "$ " not in seen.split("1:/tmp", 1)[1]:
        until(terminal, "$ ")  # the next prompt: readline owns the terminal again, so ^D reaches it
    sb.pty.send_stdin(terminal.pid, b"\x04")  # Ctrl-D: the interactive shell ends
    assert terminal.wait().exit_code == 0


def test_quiet_streams_get_keepalives(sb):
    """With the SDK's own Connect client and a 1 s keepalive interval, a quiet process's stream carries envd's
    keepalive events (which is also how the door notices a client that went away)."""
    from e2b.envd.process import process_pb
    from protobuf import Oneof

    request = process_pb.StartRequest(
        process=process_pb.ProcessConfig(cmd="/bin/bash", args=["-c", "read x; echo got $x"]), stdin=True
    )
    events = sb.commands._rpc.start(request, headers={"Keepalive-Ping-Interval": "1"}, timeout_ms=120_000)
    kinds = []
    for response in events:
        match response.event.event:
            case Oneof(field="start", value=start):
                pid = start.pid
            case Oneof(field="keepalive"):
                if "keepalive" not in kinds:
                    sb.commands.send_stdin(pid, "ping\n")
            case Oneof(field="data", value=data):
                assert data.output.value == b"got ping\n"
            case Oneof(field="end", value=end):
                assert end.exit_code == 0
        kinds.append(response.event.event.field)
    assert kinds[0] == "start" and kinds[-1] == "end" and "keepalive" in kinds


def test_unknown_pids_users_and_closed_stdin(sb):
    assert sb.commands.kill(999_999) is False
    with pytest.raises(NotFoundException):
        sb.commands.send_stdin(999_999, "x")
    with pytest.raises(NotFoundException):
        sb.commands.connect(999_999).wait()
    with pytest.raises(InvalidArgumentException, match="does not exist"):
        sb.commands.run("true", user="nobody-here")
    with pytest.raises(InvalidArgumentException, match="cannot start in /no/such/dir"):
        sb.commands.run("true", cwd="/no/such/dir")
    handle = sb.commands.run("sleep 600", background=True)  # stdin=False (the SDK's default)
    try:
        with pytest.raises(InvalidArgumentException, match="without stdin"):
            handle.send_stdin("x")
    finally:
        handle.kill()


def test_async_sdk_commands_and_pty(e2b_env):
    async def scenario() -> None:
        sb = await AsyncSandbox.create("base", timeout=120, metadata={"suite": uuid.uuid4().hex})
        try:
            result = await sb.commands.run("echo async $((1+1))")
            assert result.stdout == "async 2\n"
            with pytest.raises(CommandExitException):
                await sb.commands.run("exit 4")
            seen: list[str] = []
            printed = asyncio.Event()

            def on_stdout(text: str) -> None:
                seen.append(text)
                printed.set()

            handle = await sb.commands.run("echo bg; sleep 600", background=True, on_stdout=on_stdout)
            await asyncio.wait_for(printed.wait(), 60)  # the background handle streams while the command runs
            assert handle.pid in {p.pid for p in await sb.commands.list()}
            assert await handle.kill() is True
            with pytest.raises(CommandExitException):
                await handle.wait()
            assert "".join(seen) == "bg\n", "on_stdout of a background handle got the output"
            chunks: list[bytes] = []
            terminal = await sb.pty.create(PtySize(cols=80, rows=24), on_data=chunks.append)
            await sb.pty.send_stdin(terminal.pid, b"echo pty-$((40+2)); exit 9\n")
            with pytest.raises(CommandExitException) as caught:
                await terminal.wait()
            assert caught.value.exit_code == 9 and b"pty-42" in b"".join(chunks)
        finally:
            await sb.kill()

    asyncio.run(scenario())


# -- the same service through dsec's own SDK ---------------------------------------------------------------


def _exercise_native(client: dsec.Client, driver: str = "") -> None:
    with client.create("base", "container", driver=driver) as sb:
        done = sb.processes.start(["bash", "-c", "echo $HOME; id -un"], user="user", tag="who").wait()
        assert done.stdout == b"/home/user\nuser\n" and done.exit_code == 0
        assert sb.processes.connect(tag="who").wait().status == "exit status 0", "the end is kept for late connectors"
        reader = sb.processes.start(["sh", "-c", "read line; echo got-$line"], stdin=True, tag="fan")
        second = sb.processes.connect(tag="fan")  # attached before the output: both streams see it
        second.send_input("x\n")
        assert reader.wait().stdout == second.wait().stdout == b"got-x\n"
        terminal = sb.processes.start(["sh"], pty=(80, 24), tag="tty")
        terminal.send_input("stty size; echo mark-$((2*21))\n")
        seen = b""
        for output in terminal:
            assert output.stream == "pty"
            seen += output.data
            if b"mark-42" in seen:
                break
        assert b"24 80" in seen
        sb.processes.resize(100, 30, tag="tty")
        assert [p.tag for p in sb.processes.list()] == ["tty"]
        sb.processes.kill(tag="tty")
        assert terminal.wait().signal == 9
        with pytest.raises(dsec.ProcessNotFound):
            sb.processes.send_input("x", tag="tty")
        with pytest.raises(dsec.InvalidSpec):
            sb.processes.start(["true"], pty=(0, 10))


@pytest.mark.parametrize("driver", ["crun", "docker"])
def test_native_sdk_processes(dsec_http, driver):
    with dsec.Client(dsec_http.grpc_address) as client:
        _exercise_native(client, driver)


def test_native_async_sdk_processes(dsec_http):
    async def scenario() -> None:
        client = dsec.Client(dsec_http.grpc_address)
        sb = await dsec.AsyncSandbox.create("base", "container", client=client)
        try:
            process = await sb.processes.start(["sh", "-c", "echo one; read x; echo two-$x"], stdin=True)
            outputs = process.__aiter__()
            assert (await outputs.__anext__()).data == b"one\n"
            await process.send_input("y\n")
            assert (await process.wait()).stdout == b"one\ntwo-y\n"
            sleeper = await sb.processes.start("sleep 600", tag="s")
            assert [p.tag for p in await sb.processes.list()] == ["s"]
            await sb.processes.kill(tag="s")
            assert (await sleeper.wait()).signal == 9
        finally:
            await sb.destroy()
            client.close()

    asyncio.run(scenario())


def test_native_sdk_processes_through_a_gateway(dsec_http):
    gateway = Gateway()
    gateway.add_node("node-0", dsec_http.grpc_address, Capacity(cpus=8, memory_mb=8192, sandboxes=64))
    running = serve_gateway(gateway, probe_interval_s=0.5)
    try:
        with dsec.Client(running.address) as client:
            _exercise_native(client)
    finally:
        running.stop()


def test_e2b_commands_through_a_door_in_front_of_a_gateway(dsec_http, monkeypatch):
    """The door as a cluster runs it: e2b SDK → door → gateway (its ProcessService forwarder) → the node's ProcessService."""
    from dsec.compat.http_server import start_http_door

    gateway = Gateway()
    gateway.add_node("node-0", dsec_http.grpc_address, Capacity(cpus=8, memory_mb=8192, sandboxes=64))
    running = serve_gateway(gateway, probe_interval_s=0.5)
    door = start_http_door("127.0.0.1:0", running.address)
    try:
        for key, value in {"E2B_API_URL": door.url, "E2B_SANDBOX_URL": door.url, "E2B_API_KEY": "k"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        sb = Sandbox.create("base", timeout=120)
        try:
            assert running.gateway.node_of(sb.sandbox_id) == "node-0"
            assert sb.commands.run("echo via-$((1+1))").stdout == "via-2\n"
            handle = sb.commands.run("sleep 600", background=True)
            assert handle.pid in {p.pid for p in sb.commands.list()}
            assert handle.kill() is True
            terminal = sb.pty.create(PtySize(cols=80, rows=24))
            sb.pty.send_stdin(terminal.pid, b"echo tty-$((3*3))\n")
            until(terminal, "tty-9")
            sb.pty.resize(terminal.pid, PtySize(cols=100, rows=30))
            assert sb.pty.kill(terminal.pid) is True
        finally:
            sb.kill()
    finally:
        door.stop()
        running.stop()


def test_processes_die_with_their_sandbox(dsec_http):
    with dsec.Client(dsec_http.grpc_address) as client:
        sb = client.create("base", "container")
        process = sb.processes.start("echo up; sleep 600")
        assert next(iter(process)).data == b"up\n"
        started = time.monotonic()
        sb.destroy()
        result = process.wait()  # the stream ends with the sandbox instead of hanging
        assert result.exit_code == -1 and time.monotonic() - started < 60


# -- bad input on the raw Connect routes ---------------------------------------------------------------------

PROCESS_METHODS = ["List", "Connect", "Start", "Update", "StreamInput", "SendInput", "SendSignal", "CloseStdin"]


def _post(url: str, sandbox_id: str, method: str, body: bytes, content_type: str = "application/json"):
    import httpx

    headers = {"E2b-Sandbox-Id": sandbox_id, "Content-Type": content_type}
    return httpx.post(f"{url}/process.Process/{method}", content=body, headers=headers, timeout=60)


def test_malformed_requests_get_client_errors(dsec_http):
    with dsec.Client(dsec_http.grpc_address) as client, client.create("base", "container") as sb:
        url = dsec_http.http_url
        assert _post(url, sb.id, "List", b"not json").status_code == 400
        assert _post(url, sb.id, "List", b"\xff\x00", "application/proto").status_code == 400
        assert _post(url, "sb-nothere", "List", b"{}").status_code == 404
        assert _post(url, sb.id, "Update", b"{}").status_code == 400  # no process selector
        assert _post(url, sb.id, "SendSignal", b'{"process": {"pid": 1}}').status_code == 400  # unspecified signal
        assert _post(url, sb.id, "SendInput", b'{"process": {"pid": 999999}, "input": {"stdin": "eA=="}}').status_code == 404
        assert _post(url, sb.id, "Nope", b"{}").status_code == 404
        listed = _post(url, sb.id, "List", b"{}")
        assert listed.status_code == 200 and listed.json() == {}


def test_fuzzed_bodies_never_get_a_server_error(dsec_http):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    with dsec.Client(dsec_http.grpc_address) as client, client.create("base", "container") as sb:
        url = dsec_http.http_url
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
                ["process", "pid", "tag", "cmd", "args", "envs", "cwd", "pty", "size", "cols", "rows", "input", "stdin",
                 "signal", "start", "data"]), inner, max_size=4),
            max_leaves=12,
        )

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(method=st.sampled_from(["List", "Update", "SendInput", "SendSignal", "CloseStdin", "Connect"]),
               body=json_values | st.binary(max_size=64))
        def check(method, body):
            import json

            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            assert _post(url, sb.id, method, raw).status_code < 500

        check()


def test_attached_streams_are_capped_with_a_typed_error():
    """Each attached stream holds one of the server's RPC threads; past half of them a new stream is refused
    (CapacityExceeded) instead of every other call hanging behind streams that never end."""
    from dsec.config import ServerConfig
    from dsec.server.main import serve

    running = serve(ServerConfig(listen="127.0.0.1:0", workers=4))  # room for 2 attached streams
    try:
        with dsec.Client(running.address) as client, client.create("base", "container") as sb:
            first = sb.processes.start("sleep 600")
            second = sb.processes.start("sleep 600")
            with pytest.raises(dsec.CapacityExceeded, match="process streams attached"):
                sb.processes.start("true")
            assert len(sb.processes.list()) == 2, "unary calls still get a thread"
            first.disconnect()
            deadline = time.monotonic() + 30
            while True:  # the server notices the detach at its next liveness check (one poll per attempt)
                try:
                    assert sb.processes.start("echo again").wait().stdout == b"again\n"
                    break
                except dsec.CapacityExceeded:
                    assert time.monotonic() < deadline, "a detached stream never gave its slot back"
            second.kill()
    finally:
        running.stop()

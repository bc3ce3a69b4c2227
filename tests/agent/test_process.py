"""Processes through a real agent: output, stdin, exit status, signals, groups, concurrency, throughput."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest

from dsec.agent.client import AgentClient
from dsec.errors import CommandNotFound, FileNotFoundInSandbox, InvalidSpec, PermissionDeniedInSandbox
from dsec.substrates.base import Exited, Output

from .conftest import PATH_ENV, collect, drain, kill_quietly, wait_dead

pytestmark = pytest.mark.timeout(120)


def test_stdout_stderr_separated_and_exit_code(client: AgentClient) -> None:
    assert collect(client, ["sh", "-c", "echo out; echo err >&2; exit 3"]) == (b"out\n", b"err\n", Exited(3, 0))


def test_cat_echoes_stdin(client: AgentClient) -> None:
    assert collect(client, ["cat"], stdin=b"hello agent")[0] == b"hello agent"


def test_without_stdin_reads_dev_null(client: AgentClient) -> None:
    assert collect(client, ["cat"]) == (b"", b"", Exited(0, 0))


def test_binary_and_non_utf8_output(client: AgentClient) -> None:
    blob = bytes(range(256)) * 64
    out, _, exited = collect(client, ["cat"], stdin=blob)
    assert out == blob and exited.exit_code == 0
    out, err, _ = collect(client, ["printf", r"\377\376\000abc"])
    assert out == b"\xff\xfe\x00abc"


def test_env_is_exactly_what_was_given_and_path_comes_from_it(client: AgentClient) -> None:
    out, _, _ = collect(client, ["env"], env={"PATH": "/usr/bin:/bin", "FOO": "bar baz"})
    assert sorted(out.decode().splitlines()) == ["FOO=bar baz", "PATH=/usr/bin:/bin"]
    with pytest.raises(CommandNotFound):
        client.spawn(["env"], {"PATH": "/nonexistent"}, "/")


def test_cwd_uid_gid(client: AgentClient, tmp_path) -> None:
    assert collect(client, ["pwd"], cwd=str(tmp_path))[0] == f"{tmp_path}\n".encode()
    out, _, _ = collect(client, ["sh", "-c", "id -u; id -g; id -G"], uid=65534, gid=65534)
    assert out.split() == [b"65534", b"65534", b"65534"]


def test_spawn_errors_are_typed(client: AgentClient, tmp_path) -> None:
    with pytest.raises(CommandNotFound) as info:
        client.spawn(["no-such-command-xyz"], PATH_ENV, "/")
    assert "sb-test" in str(info.value) and "no-such-command-xyz" in str(info.value)
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionDeniedInSandbox):
        client.spawn([str(script)], PATH_ENV, "/")
    with pytest.raises(FileNotFoundInSandbox, match="chdir"):
        client.spawn(["true"], PATH_ENV, str(tmp_path / "missing"))


def test_exit_by_signal(client: AgentClient) -> None:
    assert collect(client, ["sh", "-c", "kill -TERM $$"])[2] == Exited(-signal.SIGTERM, signal.SIGTERM)
    proc = client.spawn(["sleep", "100"], PATH_ENV, "/")
    with pytest.raises(InvalidSpec):
        proc.signal(99)
    proc.signal(signal.SIGKILL)
    assert drain(proc)[2] == Exited(-signal.SIGKILL, signal.SIGKILL)
    proc.signal(signal.SIGKILL)  # after the exit: a no-op


def test_signal_kills_the_whole_process_group(client: AgentClient) -> None:
    proc = client.spawn(["sh", "-c", "sleep 100 & echo $!; exec sleep 100"], PATH_ENV, "/")
    events = proc.events()
    first = next(events)
    assert isinstance(first, Output)
    background = int(first.data.split()[0])
    try:
        proc.signal(signal.SIGTERM)
        exited = [e for e in events if isinstance(e, Exited)]
        assert exited == [Exited(-signal.SIGTERM, signal.SIGTERM)]
        assert wait_dead(background), "the background sleep survived SIGNAL to its group"
    finally:
        kill_quietly(background)


def test_background_grandchild_holding_stdout_does_not_hang_exit(client: AgentClient) -> None:
    started = time.monotonic()
    out, _, exited = collect(client, ["sh", "-c", "sleep 30 & echo $!; echo done"])
    background = int(out.split()[0])
    try:
        assert exited == Exited(0, 0) and out.endswith(b"done\n")
        assert time.monotonic() - started < 5
    finally:
        kill_quietly(background)


def test_large_output_through_cat(client: AgentClient) -> None:
    """50 MB in through stdin and out through stdout, concurrently, byte for byte."""
    block = os.urandom(1 << 20)
    total = 50
    proc = client.spawn(["cat"], PATH_ENV, "/", stdin=True)

    def feed() -> None:
        for _ in range(total):
            proc.write_stdin(block)
        proc.close_stdin()

    feeder = threading.Thread(target=feed)
    feeder.start()
    digest, size, exited = hashlib.sha256(), 0, None
    for event in proc.events():
        if isinstance(event, Output):
            assert event.stream == "stdout"
            digest.update(event.data)
            size += len(event.data)
        else:
            exited = event
    feeder.join()
    assert exited == Exited(0, 0)
    assert size == total << 20
    assert digest.digest() == hashlib.sha256(block * total).digest()


def test_large_output_without_stdin(client: AgentClient) -> None:
    out, _, exited = collect(client, ["head", "-c", "20000000", "/dev/zero"])
    assert exited == Exited(0, 0) and len(out) == 20_000_000 and not out.strip(b"\0")


def test_hundred_concurrent_processes_on_one_connection(client: AgentClient) -> None:
    procs = [client.spawn(["sh", "-c", f"sleep 0.5; echo {i}; exit {i % 7}"], PATH_ENV, "/") for i in range(100)]
    results = [drain(p) for p in procs]
    for i, (out, err, exited) in enumerate(results):
        assert (out, err, exited) == (f"{i}\n".encode(), b"", Exited(i % 7, 0))


def test_concurrent_callers_from_many_threads(client: AgentClient) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(10):
                assert collect(client, ["echo", str(i)])[0] == f"{i}\n".encode()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_fd_mode_serves_a_socketpair(fd_agent) -> None:
    client, _ = fd_agent
    assert collect(client, ["echo", "over a socketpair"])[0] == b"over a socketpair\n"
    assert client.ping() < 5


def test_script_without_shebang_runs_under_sh(client: AgentClient, tmp_path) -> None:
    script = tmp_path / "plain-script"
    script.write_text("echo from sh \"$1\"\n")
    script.chmod(0o755)
    assert collect(client, [str(script), "arg1"])[0] == b"from sh arg1\n"

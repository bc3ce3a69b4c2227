"""Spawn, output, exit codes and the basic file operations against a real agent process."""

from __future__ import annotations

import pytest

from dsec.agent.client import AgentClient
from dsec.errors import CommandNotFound, FileNotFoundInSandbox
from dsec.substrates.base import Exited, Output

from .conftest import PATH_ENV

pytestmark = pytest.mark.timeout(60)


def run(client: AgentClient, argv: list[str], stdin: bytes | None = None) -> tuple[bytes, bytes, Exited]:
    proc = client.spawn(argv, PATH_ENV, "/", stdin=stdin is not None)
    if stdin is not None:
        proc.write_stdin(stdin)
        proc.close_stdin()
    out, err, exited = bytearray(), bytearray(), None
    for event in proc.events():
        if isinstance(event, Output):
            (out if event.stream == "stdout" else err).extend(event.data)
        else:
            exited = event
    assert exited is not None
    return bytes(out), bytes(err), exited


def test_echo_stdout_stderr_exit_code(client: AgentClient) -> None:
    out, err, exited = run(client, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out, err, exited) == (b"out\n", b"err\n", Exited(3, 0))


def test_cat_stdin(client: AgentClient) -> None:
    assert run(client, ["cat"], stdin=b"hello agent")[0] == b"hello agent"


def test_command_not_found(client: AgentClient) -> None:
    with pytest.raises(CommandNotFound) as info:
        client.spawn(["no-such-command-xyz"], PATH_ENV, "/")
    assert "sb-test" in str(info.value)


def test_file_round_trip(client: AgentClient, tmp_path) -> None:
    path = str(tmp_path / "a" / "b" / "f.bin")
    assert client.write_file(path, [b"\x00\xff" * 10]) == 20
    assert b"".join(client.read_file(path)) == b"\x00\xff" * 10
    assert client.stat(path).size == 20
    assert [e.name for e in client.list_dir(str(tmp_path / "a" / "b"))] == ["f.bin"]
    with pytest.raises(FileNotFoundInSandbox):
        client.read_file(str(tmp_path / "missing"))


def test_fd_mode(fd_agent) -> None:
    client, _ = fd_agent
    assert run(client, ["echo", "over a socketpair"])[0] == b"over a socketpair\n"

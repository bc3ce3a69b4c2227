"""PTY processes through a real agent: a controlling terminal of the asked size, input, resize (SIGWINCH),
signals to the group or to the process alone, and malformed PTY frames."""

from __future__ import annotations

import signal
import socket
import struct

import pytest

from dsec.agent.client import RESIZE, AgentClient, AgentProcess
from dsec.errors import InvalidSpec
from dsec.substrates.base import Exited, Output

from .conftest import PATH_ENV, ListeningAgent, collect, drain, kill_quietly, pid_alive, wait_dead

pytestmark = pytest.mark.timeout(120)


def read_until(proc: AgentProcess, marker: bytes, events=None) -> tuple[bytes, object]:
    """Output up to and including `marker` (the PTY echoes input too, so markers are computed by the shell)."""
    events = events or proc.events()
    seen = bytearray()
    for event in events:
        assert isinstance(event, Output), f"exited before {marker!r} appeared: {bytes(seen)!r}"
        assert event.stream == "stdout", "a PTY process has one output stream"
        seen += event.data
        if marker in seen:
            return bytes(seen), events
    raise AssertionError(f"stream ended before {marker!r}")


def test_pty_is_the_controlling_terminal_of_the_given_size(client: AgentClient) -> None:
    script = "[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && tty && stty size && echo err >&2"
    out, err, exited = collect(client, ["sh", "-c", script], pty=(100, 40))
    assert exited == Exited(0, 0)
    assert err == b"", "stderr of a PTY process arrives on the terminal (stdout)"
    lines = out.replace(b"\r\n", b"\n").splitlines()
    assert lines[0].startswith(b"/dev/pts/")
    assert lines[1:] == [b"40 100", b"err"]


def test_pty_input_is_a_terminal_line(client: AgentClient) -> None:
    proc = client.spawn(["sh"], PATH_ENV | {"PS1": "$ "}, "/", pty=(80, 24))
    proc.write_stdin(b"echo sum-$((40+2))\n")
    _, events = read_until(proc, b"sum-42")
    proc.write_stdin(b"exit 7\n")
    exited = [e for e in events if isinstance(e, Exited)]
    assert exited == [Exited(7, 0)]


def test_resize_delivers_sigwinch_with_the_new_size(client: AgentClient) -> None:
    script = "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 60 & wait $!; done"
    proc = client.spawn(["sh", "-c", script], PATH_ENV, "/", pty=(80, 24))
    _, events = read_until(proc, b"ready")
    proc.resize(132, 43)
    out, err, exited = drain_rest(events)
    assert b"43 132" in out and exited == Exited(0, 0)


def drain_rest(events) -> tuple[bytes, bytes, Exited]:
    out, exited = bytearray(), None
    for event in events:
        if isinstance(event, Output):
            out += event.data
        else:
            exited = event
    assert exited is not None
    return bytes(out), b"", exited


def test_ctrl_c_on_the_terminal_interrupts_the_foreground_group(client: AgentClient) -> None:
    proc = client.spawn(["sh", "-c", "echo ready; exec sleep 600"], PATH_ENV, "/", pty=(80, 24))
    _, events = read_until(proc, b"ready")
    proc.write_stdin(b"\x03")  # the line discipline turns ^C into SIGINT for the foreground process group
    assert [e for e in events if isinstance(e, Exited)] == [Exited(-signal.SIGINT, signal.SIGINT)]


def test_signal_group_or_process_alone(client: AgentClient) -> None:
    proc = client.spawn(["sh", "-c", "sleep 600 & echo $!; wait"], PATH_ENV, "/")
    events = proc.events()
    first = next(events)
    assert isinstance(first, Output)
    child = int(first.data.split()[0])
    try:
        proc.signal(signal.SIGKILL, group=False)
        rest = list(events)
        assert rest[-1] == Exited(-signal.SIGKILL, signal.SIGKILL)
        assert pid_alive(child), "group=False must signal the process alone, not its group"
    finally:
        kill_quietly(child)
    assert wait_dead(child)

    proc = client.spawn(["sh", "-c", "sleep 600 & echo $!; wait"], PATH_ENV, "/")
    events = proc.events()
    child = int(next(events).data.split()[0])  # type: ignore[union-attr]
    proc.signal(signal.SIGTERM)
    assert list(events)[-1] == Exited(-signal.SIGTERM, signal.SIGTERM)
    assert wait_dead(child), "the default signals the whole process group"


def test_resize_without_pty_and_bad_sizes_are_refused(client: AgentClient) -> None:
    proc = client.spawn(["cat"], PATH_ENV, "/", stdin=True)
    with pytest.raises(InvalidSpec, match="no PTY"):
        proc.resize(80, 24)
    proc.close_stdin()
    assert drain(proc)[2] == Exited(0, 0)
    for size in [(0, 24), (80, 0), (70000, 24)]:
        with pytest.raises(InvalidSpec, match="out of range"):
            client.spawn(["true"], PATH_ENV, "/", pty=size)
    assert collect(client, ["sh", "-c", "exit 3"], pty=(1, 1))[2] == Exited(3, 0)


def frame(ftype: int, rid: int, payload: bytes) -> bytes:
    return struct.pack(">BII", ftype, rid, len(payload)) + payload


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    header = b""
    while len(header) < 9:
        header += sock.recv(9 - len(header))
    ftype, rid, length = struct.unpack(">BII", header)
    payload = b""
    while len(payload) < length:
        payload += sock.recv(length - len(payload))
    return ftype, rid, payload


def test_malformed_pty_frames_get_einval(listening: ListeningAgent) -> None:
    sock = listening.raw()
    try:
        spawn_bad = b"arg\0true\0pty_cols\x0080\0"  # cols without rows
        sock.sendall(frame(0x01, 1, spawn_bad))
        ftype, rid, payload = read_frame(sock)
        assert (ftype, rid) == (0x8F, 1) and payload.startswith(b"22\0")
        sock.sendall(frame(RESIZE, 2, b"80\0"))
        ftype, rid, payload = read_frame(sock)
        assert (ftype, rid) == (0x8F, 2) and payload.startswith(b"22\0")
        sock.sendall(frame(0x20, 3, b"alive"))
        assert read_frame(sock) == (0xA0, 3, b"alive")
    finally:
        sock.close()

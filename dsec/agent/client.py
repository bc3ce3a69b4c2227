"""Host side of the agent protocol (docs/agent-protocol.md), shared by every substrate driver.

One `AgentClient` owns one byte stream to one agent. A reader thread splits incoming frames by request id into
per-request queues, so any number of processes and file transfers run over the stream at once and each caller
only ever waits on its own queue. When the stream dies every waiting caller gets `RuntimeFailure` at once: a
dead sandbox never turns into a hung RPC.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import os
import queue
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from dsec.errors import (
    CommandNotFound,
    DiskFull,
    DsecError,
    FileExistsInSandbox,
    FileNotFoundInSandbox,
    InvalidPath,
    InvalidSpec,
    PermissionDeniedInSandbox,
    RuntimeFailure,
)
from dsec.models import FileEntry, FileInfo
from dsec.agent.events import DirWatch, Exited, FsEvent, Output, ProcessEvent, ProcessHandle

HEADER = struct.Struct(">BII")
MAX_PAYLOAD = 1 << 20
CHUNK = 256 * 1024  # STDIN / file content frames sent to the agent
READ_SIZE = 256 * 1024

SPAWN, STDIN, STDIN_EOF, SIGNAL, RESIZE = 0x01, 0x02, 0x03, 0x04, 0x05
READ_FILE, WRITE_FILE, LIST_DIR, STAT, PING = 0x10, 0x11, 0x12, 0x13, 0x20
STDOUT, STDERR, EXIT, SPAWNED, DATA, END, ENTRY, OK, ERROR, PONG = (
    0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x8F, 0xA0,
)
# filesystem operations and directory watches (docs/agent-protocol.md, "Filesystem operations")
MKDIR, MOVE, REMOVE, STATX, LIST_DIRX, CHOWN, WATCH, CANCEL = 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1B
EVENT = 0x89
# a host detaching from an agent it will checkpoint, and reattaching to the restored one (docs/agent-protocol.md)
DETACH, ATTACH = 0x1C, 0x1D

DEFAULT_REQUEST_TIMEOUT_S = 120.0
"""How long a control request (spawn, stat, one file chunk) may wait for the agent before it is declared stuck
(a frozen or wedged sandbox); process output has no such limit: commands may be silent for hours."""
# waiting for an agent's socket to appear: the first retry pause, doubled up to the second
CONNECT_FIRST_PAUSE_S = 0.0005
CONNECT_MAX_PAUSE_S = 0.01

_LOST = object()
T = TypeVar("T")


def _strings(*values: str | bytes) -> bytes:
    """The agent's string list: each value NUL-terminated (a spawn has a dozen or more: joined once, not appended
    one by one); a value holding a NUL itself would shift every field after it, so it is refused."""
    raws = [value.encode() if isinstance(value, str) else value for value in values]
    if not raws:
        return b""
    joined = b"\0".join(raws) + b"\0"
    if joined.count(0) != len(raws):
        raw = next(raw for raw in raws if b"\0" in raw)
        raise InvalidPath(f"NUL byte in {raw[:60]!r}: paths, arguments and environment cannot contain NUL")
    return joined


def _split(payload: bytes) -> list[str]:
    return [part.decode("utf-8", "surrogateescape") for part in payload.split(b"\0")[:-1]]


def _parsed(what: str, payload: bytes, parse: Callable[[list[str]], T]) -> T:
    """Parse an agent reply's fields. The agent runs inside the sandbox, whose root can reach its socket, so a
    reply is untrusted input: a malformed one is a typed RuntimeFailure, never a raw ValueError (bench/fuzz.py)."""
    try:
        return parse(_split(payload))
    except (ValueError, IndexError, TypeError) as exc:
        raise RuntimeFailure(
            f"the agent sent a malformed {what} ({payload[:80]!r}): agent version mismatch or a tampered sandbox; "
            "destroy and recreate it"
        ) from exc


def _entry(payload: bytes) -> FileEntry:
    def parse(fields: list[str]) -> FileEntry:
        name, kind, size, mode, mtime = fields[:5]
        return FileEntry(name=name, type=kind, size=int(size), mode=int(mode, 8), mtime=float(mtime))

    return _parsed("directory entry", payload, parse)


def _entry_info(payload: bytes) -> FileInfo:
    def parse(fields: list[str]) -> FileInfo:
        name, kind, size, mode, mtime, uid, gid, target = fields[:8]
        return FileInfo(
            name=name, type=kind, size=int(size), mode=int(mode, 8), mtime=float(mtime), uid=int(uid), gid=int(gid),
            symlink_target=target,
        )  # fmt: skip

    return _parsed("file info", payload, parse)


def _owner_fields(owner: tuple[int, int] | None) -> list[str]:
    return [str(owner[0]), str(owner[1])] if owner is not None else ["-1", "-1"]


def error_for(err: int, message: str, *, op: str, sandbox_id: str = "") -> DsecError:
    """The typed error for an agent ERROR frame, with the sandbox named and a hint of what to do next."""
    where = f" (sandbox {sandbox_id})" if sandbox_id else ""
    details = {"sandbox_id": sandbox_id, "errno": err}
    if op == "spawn" and not message.startswith("chdir"):
        if err == errno_mod.ENOENT:
            return CommandNotFound(f"{message}{where}: check the command name and PATH", **details)
        if err in (errno_mod.EACCES, errno_mod.EPERM):
            return PermissionDeniedInSandbox(f"{message}{where}: the file is not executable by this user", **details)
        if err == errno_mod.ENOEXEC:
            return CommandNotFound(f"{message}{where}: not an executable for this machine", **details)
        if err == errno_mod.EAGAIN:
            return RuntimeFailure(f"{message}{where}: the sandbox's process limit (resources.pids) is reached", **details)
    if err in (errno_mod.ENOENT,):
        return FileNotFoundInSandbox(f"{message}{where}", **details)
    if err == errno_mod.EEXIST:
        return FileExistsInSandbox(f"{message}{where}", **details)
    if err in (errno_mod.EACCES, errno_mod.EPERM, errno_mod.EROFS):
        return PermissionDeniedInSandbox(f"{message}{where}", **details)
    if err in (errno_mod.ENOSPC, errno_mod.EDQUOT):
        return DiskFull(f"{message}{where}: free space in the sandbox or create it with a larger disk_mb", **details)
    if err in (
        errno_mod.EISDIR, errno_mod.ENOTDIR, errno_mod.EINVAL, errno_mod.ENAMETOOLONG, errno_mod.ELOOP,
        errno_mod.EEXIST, errno_mod.ENOTEMPTY,
    ):
        return InvalidPath(f"{message}{where}", **details)
    return RuntimeFailure(f"agent {op} failed{where}: {message} (errno {err})", **details)


class _Request:
    """One request id and the queue its replies land in."""

    def __init__(self, client: AgentClient, rid: int, quiet_spawned: bool = False) -> None:
        self.client = client
        self.id = rid
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        # a spawn whose caller does not wait for SPAWNED (`AgentClient.launch`): the reader keeps the reply here
        # instead of queueing it, so the caller's thread wakes once, for the output or the exit
        self.quiet_spawned = quiet_spawned
        self.spawned: bytes | None = None

    def get(self, timeout: float | None, what: str) -> tuple[int, bytes]:
        item = self.poll(timeout)
        if item is None:
            raise self.client.no_answer(what, timeout)
        return item

    def poll(self, timeout: float | None) -> tuple[int, bytes] | None:
        """The next reply, or None when `timeout` passes first."""
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _LOST:
            raise self.client.lost_error()
        return item

    def deliver(self, ftype: int, payload: bytes) -> None:
        """Called by the reader thread for each frame of this request."""
        if ftype == SPAWNED and self.quiet_spawned and self.spawned is None:
            self.spawned = payload
        else:
            self.queue.put((ftype, payload))

    def done(self) -> None:
        self.client._pending.pop(self.id, None)


class AgentProcess(ProcessHandle):
    """A process started through the agent; its output arrives on the request's queue."""

    timed_events = True

    def __init__(self, request: _Request, pid: int, pty: bool = False, argv0: str = "") -> None:
        self._request = request
        self._client = request.client
        self._pid = pid  # 0 until the agent's SPAWNED reply is read, for a process from `AgentClient.launch`
        self.pty = pty
        self._argv0 = argv0
        self._launched_at = time.monotonic()
        self._exited: Exited | None = None
        self._stdin_error: str = ""

    @property
    def pid(self) -> int:
        """The process id inside the sandbox; 0 while the agent has not yet confirmed the start (`launch`)."""
        if not self._pid and self._request.spawned is not None:
            self._pid = _parsed("spawn reply", self._request.spawned, lambda f: int(f[0]))
        return self._pid

    def _frame_within(self, timeout: float | None) -> tuple[int, bytes] | None:
        """The next frame, or None when `timeout` passes first. Before the agent confirmed the start (`launch`)
        the wait is also bounded by the control-request timeout, so a frozen sandbox is an error, not a hang (a
        started process may then be silent for any time)."""
        request = self._request
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pid and request.spawned is None:
            give_up = self._launched_at + self._client.request_timeout_s
            wait = give_up - time.monotonic() if deadline is None else min(deadline, give_up) - time.monotonic()
            item = request.poll(max(wait, 0.0))
            if item is not None:
                return item
            if request.spawned is None and time.monotonic() >= give_up:
                request.done()
                raise self._client.no_answer(f"spawn of {self._argv0}", self._client.request_timeout_s)
            if deadline is not None and time.monotonic() >= deadline:
                return None
        if deadline is None:
            return request.get(None, "process output")
        return request.poll(max(deadline - time.monotonic(), 0.0))

    def _event(self, ftype: int, payload: bytes) -> ProcessEvent | None:
        """What a frame means to the caller; None for the frames that only update this handle."""
        if ftype == STDOUT:
            return Output("stdout", payload)
        if ftype == STDERR:
            return Output("stderr", payload)
        if ftype == EXIT:
            self._exited = _parsed("exit status", payload, lambda f: Exited(int(f[0]), int(f[1])))
            self._request.done()
            return self._exited
        if ftype == ERROR:
            if not self._pid and self._request.spawned is None:  # `launch`: the spawn itself failed
                self._request.done()
                self._client._raise(payload, "spawn")
            self._stdin_error = _parsed("stdin error", payload, lambda f: f[1])
        elif ftype == SPAWNED:  # `launch`: a SPAWNED the reader queued anyway
            self._request.spawned = payload
        return None

    def events(self) -> Iterator[ProcessEvent]:
        if self._exited is not None:
            yield self._exited
            return
        while True:
            frame = self._frame_within(None)
            assert frame is not None  # no timeout: a frame or an exception
            event = self._event(*frame)
            if event is not None:
                yield event
                if event is self._exited:
                    return

    def next_event(self, timeout: float | None) -> ProcessEvent | None:
        if self._exited is not None:
            return self._exited
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            frame = self._frame_within(None if deadline is None else max(deadline - time.monotonic(), 0.0))
            if frame is None:
                return None
            event = self._event(*frame)
            if event is not None:
                return event

    def write_stdin(self, data: bytes) -> None:
        if self._stdin_error:
            raise RuntimeFailure(f"stdin of process {self.pid}{self._client.where} was closed: {self._stdin_error}")
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            self._client._send(STDIN, self._request.id, view[start : start + CHUNK])

    def close_stdin(self) -> None:
        self._client._send(STDIN_EOF, self._request.id, b"")

    def signal(self, sig: int, group: bool = True) -> None:
        if not 0 <= int(sig) < 65:
            raise InvalidSpec(f"signal {sig} is not a Linux signal number (0-64)")
        if self._exited is not None or self._client.closed:
            return  # gone already; on a lost connection the agent killed it
        try:
            # the scope is sent only when it is not the default, so an agent older than it (one running in a
            # restored memory snapshot) still gets the frame it knows
            scope = () if group else ("pid",)
            self._client._send(SIGNAL, self._request.id, _strings(str(int(sig)), *scope))
        except RuntimeFailure:
            return

    def resize(self, cols: int, rows: int) -> None:
        if not self.pty:
            raise InvalidSpec(f"process {self.pid}{self._client.where} has no PTY to resize; start it with a PTY")
        if not (1 <= cols <= 65535 and 1 <= rows <= 65535):
            raise InvalidSpec(f"PTY size {cols}x{rows} out of range: cols and rows must be 1-65535")
        if self._exited is not None or self._client.closed:
            return
        try:
            self._client._send(RESIZE, self._request.id, _strings(str(cols), str(rows)))
        except RuntimeFailure:
            return


class AgentDirWatch(DirWatch):
    """A WATCH request: EVENT frames until CANCEL (or the directory's removal) ends it with END."""

    def __init__(self, request: _Request) -> None:
        self._request = request
        self._client = request.client
        self._cancelled = False

    def events(self) -> Iterator[FsEvent]:
        try:
            while True:
                ftype, payload = self._request.get(None, "watch events")
                if ftype == EVENT:
                    yield _parsed("watch event", payload, lambda f: FsEvent(f[0], f[1]))
                elif ftype == ERROR:
                    self._client._raise(payload, "watch")
                else:  # END
                    return
        finally:
            self._request.done()

    def cancel(self) -> None:
        """Stop watching (idempotent); the events iterator ends once the agent confirms."""
        if self._cancelled or self._client.closed:
            self._request.queue.put((END, b""))
            return
        self._cancelled = True
        try:
            self._client._send(CANCEL, self._request.id, b"")
        except RuntimeFailure:
            self._request.queue.put((END, b""))


def connect_socket(path: str | Path, timeout_s: float = 30.0, sandbox_id: str = "") -> socket.socket:
    """A connected unix socket to an agent, waiting for its listening socket to appear while the sandbox starts."""
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    pause = CONNECT_FIRST_PAUSE_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            last = exc
        except OSError:
            sock.close()
            raise
        if time.monotonic() >= deadline:
            where = f" of sandbox {sandbox_id}" if sandbox_id else ""
            raise RuntimeFailure(
                f"the agent{where} did not listen on {path} within {timeout_s:.0f}s ({last}): the sandbox "
                "failed to start; see its runtime log",
                sandbox_id=sandbox_id,
            ) from None
        time.sleep(pause)  # the agent listens ~1 ms after its runtime returns: short first, then backing off
        pause = min(pause * 2, CONNECT_MAX_PAUSE_S)


class AgentClient:
    """One connected stream to one agent: a socket, or a (read_fd, write_fd) pair for a char device or pipe."""

    def __init__(
        self,
        stream: socket.socket | tuple[int, int],
        sandbox_id: str = "",
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.request_timeout_s = request_timeout_s
        if isinstance(stream, socket.socket):
            self._sock: socket.socket | None = stream
            self._rfd = self._wfd = stream.fileno()
        else:
            self._sock = None
            self._rfd, self._wfd = stream
        # non-blocking so a sandbox that stops reading (frozen, wedged) fails a write after request_timeout_s
        # instead of blocking the write lock, and every caller behind it, forever
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._pending: dict[int, _Request] = {}
        # From a random point: an agent restored from a memory snapshot (VM, CRIU) still holds the ids of the
        # processes that ran at the snapshot, and a fresh count from 1 would reuse them ("id already in use")
        self._ids = itertools.count(1 + secrets.randbelow(1 << 30))
        self._id_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self.closed = False
        self._lost_reason = ""
        self._buf = bytearray()  # bytes read but not yet a whole frame; kept across detach/attach
        self._detached = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="dsec-agent-reader")
        self._reader.start()

    # -- connecting ---------------------------------------------------------------------------------------
    @classmethod
    def connect_unix(cls, path: str | Path, timeout_s: float = 30.0, sandbox_id: str = "") -> AgentClient:
        """Connect to an agent's socket, waiting for it to appear while the sandbox starts; then ping it."""
        deadline = time.monotonic() + timeout_s
        client = cls(connect_socket(path, timeout_s, sandbox_id), sandbox_id=sandbox_id)
        try:
            client.ping(timeout=max(deadline - time.monotonic(), 1.0))
        except BaseException:
            client.close()
            raise
        return client

    connect = connect_unix

    @classmethod
    def detached(cls, sandbox_id: str = "") -> AgentClient:
        """A client with no stream until `attach`: the host side of a sandbox re-adopted while saved to disk."""
        ours, theirs = socket.socketpair()
        client = cls(ours, sandbox_id=sandbox_id)
        client.detach()
        theirs.close()
        return client

    @classmethod
    def from_fds(cls, read_fd: int, write_fd: int, sandbox_id: str = "") -> AgentClient:
        """Talk over already open descriptors (a virtio-serial chardev socket, a pipe pair); the client owns them."""
        return cls((read_fd, write_fd), sandbox_id=sandbox_id)

    # -- plumbing -----------------------------------------------------------------------------------------
    @property
    def where(self) -> str:
        return f" (sandbox {self.sandbox_id})" if self.sandbox_id else ""

    def lost_error(self) -> RuntimeFailure:
        return RuntimeFailure(
            f"agent connection lost{self.where}: {self._lost_reason or 'closed'}; the sandbox probably died "
            "(out of memory, destroyed, or its runtime crashed): check it and recreate it",
            sandbox_id=self.sandbox_id,
        )

    def no_answer(self, what: str, timeout: float | None) -> RuntimeFailure:
        return RuntimeFailure(
            f"agent did not answer {what} within {timeout or 0:.0f}s{self.where}: the sandbox may be frozen "
            "or overloaded; retry, or destroy and recreate it",
            sandbox_id=self.sandbox_id,
        )

    def _request(self, quiet_spawned: bool = False) -> _Request:
        with self._id_lock:
            rid = next(self._ids) & 0xFFFFFFFF
            while rid == 0 or rid in self._pending:
                rid = next(self._ids) & 0xFFFFFFFF
            request = _Request(self, rid, quiet_spawned)
            self._pending[rid] = request
        if self.closed:
            request.queue.put(_LOST)
        return request

    def _send(self, ftype: int, rid: int, payload: bytes | memoryview) -> None:
        if len(payload) > MAX_PAYLOAD:
            raise InvalidPath(f"request of {len(payload)} bytes exceeds the agent's 1 MiB frame limit{self.where}")
        data = HEADER.pack(ftype, rid, len(payload)) + bytes(payload)
        with self._write_lock:
            if self.closed:
                raise self.lost_error()
            if self._detached:
                raise RuntimeFailure(f"the sandbox is paused{self.where}: resume it first", sandbox_id=self.sandbox_id)
            try:
                self._write_all(memoryview(data))
            except OSError as exc:
                self._lose(f"write failed: {exc}")
                if self._sock is not None:
                    # a partial frame went out: the stream is unusable; let the agent see the disconnect now
                    self._sock.shutdown(socket.SHUT_RDWR)
                raise self.lost_error() from exc

    def _write_all(self, view: memoryview) -> None:
        poller = None  # made only when the stream is full: a frame almost always goes out in one write
        while view:
            try:
                view = view[os.write(self._wfd, view) :]
                continue
            except BlockingIOError:
                pass
            if poller is None:
                poller = select.poll()
                poller.register(self._wfd, select.POLLOUT)
            if not poller.poll(self.request_timeout_s * 1000):
                raise TimeoutError(f"the agent read nothing for {self.request_timeout_s:.0f}s (sandbox frozen?)")

    def _lose(self, reason: str) -> None:
        """Mark the stream dead and wake every waiter with the loss."""
        with self._id_lock:
            if self.closed:
                return
            self.closed = True
            self._lost_reason = reason
            waiting = list(self._pending.values())
        for request in waiting:
            request.queue.put(_LOST)

    def _read_loop(self) -> None:
        buf = self._buf
        reason = "the agent closed the stream"
        poller = select.poll()
        poller.register(self._rfd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        draining = False  # detach: read what the stream already holds, then stop without failing anyone
        try:
            while True:
                ready = {fd for fd, _ in poller.poll(0 if draining else None)}
                if self._wake_r in ready and not draining:
                    if not self._detached:
                        reason = "closed by the host"
                        return
                    draining = True
                    poller.unregister(self._wake_r)
                try:
                    chunk = os.read(self._rfd, READ_SIZE)
                except BlockingIOError:
                    if draining:
                        return
                    continue
                if not chunk:
                    return
                buf += chunk
                pos = 0
                while len(buf) - pos >= HEADER.size:
                    ftype, rid, length = HEADER.unpack_from(buf, pos)
                    if length > MAX_PAYLOAD:
                        reason = f"the agent sent a {length} byte frame (protocol mismatch: rebuild the agent)"
                        return
                    end = pos + HEADER.size + length
                    if len(buf) < end:
                        break
                    request = self._pending.get(rid)
                    if request is not None:
                        request.deliver(ftype, bytes(buf[pos + HEADER.size : end]))
                    pos = end
                del buf[:pos]
        except OSError as exc:
            reason = f"read failed: {exc}"
        finally:
            if not self._detached:
                self._lose(reason)

    def detach(self) -> None:
        """Stop using the stream without failing any request or process waiting on it: the agent's end is being
        saved with its sandbox (a VM's memory pause, QEMU about to exit). What the stream already delivered is
        read, a partial frame kept; sends fail until `attach` continues the same conversation on a new stream."""
        with self._write_lock:
            self._detached = True
        os.write(self._wake_w, b"d")
        self._reader.join()
        os.read(self._wake_r, 16)
        with self._write_lock:
            if self._sock is not None:
                self._sock.close()
            self._rfd = self._wfd = -1

    def attach(self, stream: socket.socket) -> None:
        """Continue after `detach` on `stream`, a new connection to the same agent (restored with its state)."""
        with self._write_lock:
            self._sock, self._rfd, self._wfd = stream, stream.fileno(), stream.fileno()
            os.set_blocking(self._rfd, False)
            self._detached = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="dsec-agent-reader")
        self._reader.start()

    def park(self) -> None:
        """Detach for a checkpoint of the agent's sandbox (a container's memory pause): the agent is told to keep
        every process and transfer this connection started (DETACH) instead of killing them when it closes; its
        OK comes after all output queued before it, so nothing is lost. Then `detach`; `reattach` continues."""
        request, rtype, reply = self._simple(DETACH, b"", "detach")
        request.done()
        if rtype != OK:
            self._raise(reply, "detach")
        self.detach()

    def reattach(self, stream: socket.socket) -> None:
        """After `park` (or on a `detached` placeholder): continue on `stream`, a connection to the restored agent,
        which hands this connection what the parked one started (ATTACH); their streams carry on."""
        self.attach(stream)
        request, rtype, reply = self._simple(ATTACH, b"", "attach")
        request.done()
        if rtype != OK:
            self._raise(reply, "attach")

    # -- requests -----------------------------------------------------------------------------------------
    def _simple(self, ftype: int, payload: bytes, what: str) -> tuple[_Request, int, bytes]:
        request = self._request()
        try:
            self._send(ftype, request.id, payload)
            rtype, reply = request.get(self.request_timeout_s, what)
        except BaseException:
            request.done()
            raise
        return request, rtype, reply

    def _raise(self, reply: bytes, op: str) -> None:
        parts = _split(reply)
        err = int(parts[0]) if parts and parts[0].lstrip("-").isdigit() else 0
        raise error_for(err, parts[1] if len(parts) > 1 else "", op=op, sandbox_id=self.sandbox_id)

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: str = "/",
        stdin: bool = False,
        uid: int | None = None,
        gid: int | None = None,
        pty: tuple[int, int] | None = None,
    ) -> AgentProcess:
        """Start `argv` (PATH of `env` is searched) in its own process group; `env` is the whole environment.
        With `pty=(cols, rows)` it runs on a new terminal of that size (its controlling tty: stdin, stdout and
        stderr), so output arrives as stdout only and `stdin` is always open."""
        payload = self._spawn_payload(argv, env, cwd, stdin, uid, gid, pty)
        request, rtype, reply = self._simple(SPAWN, payload, f"spawn of {argv[0]}")
        if rtype == SPAWNED:
            return AgentProcess(request, _parsed("spawn reply", reply, lambda f: int(f[0])), pty=pty is not None)
        request.done()
        self._raise(reply, "spawn")
        raise AssertionError("unreachable")

    def launch(
        self, argv: list[str], env: dict[str, str] | None = None, cwd: str = "/", uid: int | None = None,
        gid: int | None = None,
    ) -> AgentProcess:
        """`spawn` without stdin or PTY that returns once the request is sent: a failed start (CommandNotFound...)
        is raised by the first `events()` step instead of here, and `pid` is 0 until the agent confirms. The
        caller's thread then wakes once for a short command (its exit) instead of twice (start, then exit):
        what one exec round trip costs (bench/sandbox_latency.py, docs/benchmarks.md)."""
        payload = self._spawn_payload(argv, env, cwd, False, uid, gid, None)
        request = self._request(quiet_spawned=True)
        try:
            self._send(SPAWN, request.id, payload)
        except BaseException:
            request.done()
            raise
        return AgentProcess(request, 0, argv0=argv[0])

    def _spawn_payload(
        self, argv: list[str], env: dict[str, str] | None, cwd: str, stdin: bool, uid: int | None, gid: int | None,
        pty: tuple[int, int] | None,
    ) -> bytes:
        if not argv:
            raise InvalidPath(f"empty argv{self.where}: give at least the command")
        fields: list[str] = []
        for arg in argv:
            fields += ["arg", arg]
        for key, value in (env or {}).items():
            fields += ["env", f"{key}={value}"]
        fields += ["cwd", cwd or "/", "stdin", "1" if stdin else "0"]
        if uid is not None:
            fields += ["uid", str(uid)]
        if gid is not None:
            fields += ["gid", str(gid)]
        if pty is not None:
            cols, rows = pty
            if not (1 <= cols <= 65535 and 1 <= rows <= 65535):
                raise InvalidSpec(f"PTY size {cols}x{rows} out of range: cols and rows must be 1-65535")
            fields += ["pty_cols", str(cols), "pty_rows", str(rows)]
        return _strings(*fields)

    def read_file(self, path: str) -> Iterator[bytes]:
        """Stream a file's bytes; a missing file raises here, before the first chunk is asked for."""
        request, rtype, reply = self._simple(READ_FILE, _strings(path), f"read of {path}")
        if rtype == ERROR:
            request.done()
            self._raise(reply, "read_file")
        return self._read_rest(request, rtype, reply, path)

    def _read_rest(self, request: _Request, rtype: int, reply: bytes, path: str) -> Iterator[bytes]:
        try:
            while rtype == DATA:
                yield reply
                rtype, reply = request.get(self.request_timeout_s, f"read of {path}")
            if rtype == ERROR:
                self._raise(reply, "read_file")
        finally:
            request.done()

    def write_file(self, path: str, chunks: Iterable[bytes], mode: int = 0o644, make_parents: bool = True) -> int:
        """Create or truncate `path` with `mode` and write `chunks` into it; returns the bytes written."""
        request = self._request()
        try:
            self._send(WRITE_FILE, request.id, _strings(path, f"{mode & 0o7777:o}", "1" if make_parents else "0"))
            for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(view), CHUNK):
                    self._send(STDIN, request.id, view[start : start + CHUNK])
            self._send(STDIN_EOF, request.id, b"")
            rtype, reply = request.get(self.request_timeout_s, f"write of {path}")
        finally:
            request.done()
        if rtype == ERROR:
            self._raise(reply, "write_file")
        return _parsed("write reply", reply, lambda f: int(f[0]))

    def _listing(self, ftype: int, path: str, parse: Callable[[bytes], T]) -> list[T]:
        """ENTRY replies until END (LIST_DIR / LIST_DIRX), each parsed by `parse`."""
        request, rtype, reply = self._simple(ftype, _strings(path), f"listing of {path}")
        entries = []
        try:
            while rtype == ENTRY:
                entries.append(parse(reply))
                rtype, reply = request.get(self.request_timeout_s, f"listing of {path}")
        finally:
            request.done()
        if rtype == ERROR:
            self._raise(reply, "list_dir")
        return entries

    def _stat(self, ftype: int, path: str, parse: Callable[[bytes], T]) -> T:
        """The one ENTRY reply of STAT / STATX, parsed by `parse`."""
        request, rtype, reply = self._simple(ftype, _strings(path), f"stat of {path}")
        request.done()
        if rtype == ERROR:
            self._raise(reply, "stat")
        return parse(reply)

    def list_dir(self, path: str) -> list[FileEntry]:
        return self._listing(LIST_DIR, path, _entry)

    def stat(self, path: str) -> FileEntry:
        """Metadata of `path` itself (a symlink is reported as a symlink, not followed)."""
        return self._stat(STAT, path, _entry)

    # -- filesystem operations ------------------------------------------------------------------------------
    def _expect_ok(self, ftype: int, fields: list[str], op: str, what: str) -> None:
        request, rtype, reply = self._simple(ftype, _strings(*fields), what)
        request.done()
        if rtype == ERROR:
            self._raise(reply, op)

    def stat_info(self, path: str) -> FileInfo:
        """lstat of `path` with owner ids and the link target."""
        return self._stat(STATX, path, _entry_info)

    def list_dir_info(self, path: str) -> list[FileInfo]:
        return self._listing(LIST_DIRX, path, _entry_info)

    def make_dir(self, path: str, mode: int = 0o755, parents: bool = True, owner: tuple[int, int] | None = None) -> None:
        """mkdir (-p with `parents`); EEXIST when `path` is a directory already, ENOTDIR when it is something else.
        Directories it creates get `owner` (uid, gid)."""
        fields = [path, f"{mode & 0o7777:o}", "1" if parents else "0", *_owner_fields(owner)]
        self._expect_ok(MKDIR, fields, "make_dir", f"mkdir of {path}")

    def move(self, source: str, destination: str, make_parents: bool = True, owner: tuple[int, int] | None = None) -> None:
        """rename(2); with `make_parents` the destination's missing parents are created first (owned by `owner`)."""
        fields = [source, destination, "1" if make_parents else "0", *_owner_fields(owner)]
        self._expect_ok(MOVE, fields, "move", f"move of {source}")

    def remove(self, path: str, recursive: bool = True) -> None:
        """Remove a file, a symlink (never its target) or a directory (with `recursive`, and all below it)."""
        self._expect_ok(REMOVE, [path, "1" if recursive else "0"], "remove", f"remove of {path}")

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._expect_ok(CHOWN, [path, str(uid), str(gid)], "chown", f"chown of {path}")

    def watch_dir(self, path: str, recursive: bool = False) -> AgentDirWatch:
        """Watch a directory with inotify; returns once the watch is armed (so later changes are all seen)."""
        request, rtype, reply = self._simple(WATCH, _strings(path, "1" if recursive else "0"), f"watch of {path}")
        if rtype == ERROR:
            request.done()
            self._raise(reply, "watch")
        return AgentDirWatch(request)

    def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the agent in seconds (a liveness check)."""
        request = self._request()
        started = time.perf_counter()
        try:
            self._send(PING, request.id, b"ping")
            request.get(timeout, "ping")
        finally:
            request.done()
        return time.perf_counter() - started

    def close(self) -> None:
        """Close the stream; the agent kills the processes this connection started. Idempotent."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)
        self._lose("closed by the host")
        with self._write_lock:
            if self._sock is not None:
                self._sock.close()
            else:
                for fd in {self._rfd, self._wfd}:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._rfd = self._wfd = self._wake_r = self._wake_w = -1

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The sandbox end of a PortService connection: a socket in the sandbox's netns, or a relay process inside it.

Why two: a container's network is a host network namespace, so the host makes the TCP connection itself
(`SocketEnd`: nothing runs in the sandbox). A VM's network lives in its guest kernel, out of the host's reach;
there a small relay process started through the agent (`ProcessEnd`: python3 in the guest connects to
127.0.0.1:PORT and copies bytes between the socket and its stdin/stdout) carries the connection over the
agent channel the sandbox already has. Both offer the same four calls, so the RPC glue does not care which.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from dsec.errors import CommandNotFound, PortUnreachable, Unsupported
from dsec.substrates.base import DriverSandbox, Exited, Output, ProcessHandle

CONNECT_TIMEOUT_S = 10.0
CHUNK = 64 << 10
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class SandboxEnd:
    """A connected byte stream to a port inside a sandbox."""

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def close_write(self) -> None:
        """Half-close: the server in the sandbox reads EOF."""
        raise NotImplementedError

    def chunks(self) -> Iterator[bytes]:
        """What the server in the sandbox sends, until it closes (or `close` is called)."""
        raise NotImplementedError

    def close(self) -> None:
        """Tear the connection down; idempotent and safe from any thread."""
        raise NotImplementedError


# -- containers: a socket created in the sandbox's network namespace ------------------------------------------
def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def socket_in_netns(netns: Path, family: int) -> socket.socket:
    """A TCP socket created inside the network namespace `netns`.

    Done in a thread of its own that is discarded afterwards: network namespaces are per thread, so the
    server's other threads never see the switch, and a thread that failed to switch back simply ends.
    """
    outcome: dict[str, object] = {}

    def enter_and_create() -> None:
        try:
            target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
                try:
                    outcome["socket"] = socket.socket(family, socket.SOCK_STREAM)
                finally:
                    _setns(home)
            finally:
                os.close(target)
                os.close(home)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=enter_and_create, name="dsec-port-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        sock = outcome.get("socket")
        if isinstance(sock, socket.socket):
            sock.close()
        raise outcome["error"]  # type: ignore[misc]
    return outcome["socket"]  # type: ignore[return-value]


def connect_in_netns(netns: Path, port: int, sandbox_id: str, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """Connect to `port` on the sandbox's loopback: 127.0.0.1 first, then ::1 (servers bound to IPv6 only)."""
    reasons: list[str] = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket_in_netns(netns, family)
        except FileNotFoundError as exc:
            raise PortUnreachable(f"sandbox {sandbox_id} has no network namespace any more ({exc})", sandbox_id=sandbox_id) from exc
        try:
            sock.settimeout(timeout_s)
            sock.connect((host, port))
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            reasons.append(f"{host}: {exc.strerror or exc}")
            if exc.errno not in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EAFNOSUPPORT):
                break  # a timeout or reset: IPv6 would not fare better
    raise PortUnreachable(
        f"nothing accepts connections on port {port} in sandbox {sandbox_id} ({'; '.join(reasons)}); "
        "start the server first, or retry until it listens",
        sandbox_id=sandbox_id,
        port=port,
    )


class SocketEnd(SandboxEnd):
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._closed = threading.Lock()

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def close_write(self) -> None:
        self._sock.shutdown(socket.SHUT_WR)

    def chunks(self) -> Iterator[bytes]:
        while True:
            try:
                data = self._sock.recv(CHUNK)
            except OSError:
                return
            if not data:
                return
            yield data

    def close(self) -> None:
        if self._closed.acquire(blocking=False):
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()


# -- VMs: a relay process in the guest, over the agent channel -------------------------------------------------
# Prints one byte ("+") once connected, then copies stdin → socket (EOF = half-close) and socket → stdout.
RELAY = r"""
import os, socket, sys, threading
port = int(sys.argv[1])
for host in ("127.0.0.1", "::1"):
    try:
        s = socket.create_connection((host, port), timeout=10)
        break
    except OSError as e:
        error = e
else:
    sys.stderr.write(f"{error.strerror or error}")
    sys.exit(3)
s.settimeout(None)
os.write(1, b"+")
def up():
    while True:
        d = os.read(0, 65536)
        if not d:
            break
        s.sendall(d)
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=up, daemon=True).start()
while True:
    d = s.recv(65536)
    if not d:
        break
    os.write(1, d)
"""


class ProcessEnd(SandboxEnd):
    def __init__(self, process: ProcessHandle, events: Iterator, first: bytes) -> None:
        self._process = process
        self._events = events
        self._first = first
        self._closed = threading.Event()

    @classmethod
    def connect(cls, handle: DriverSandbox, port: int, sandbox_id: str) -> ProcessEnd:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        try:
            process = handle.spawn(["python3", "-u", "-c", RELAY, str(port)], env, "/", stdin=True)
        except CommandNotFound as exc:
            raise Unsupported(
                f"reaching ports inside sandbox {sandbox_id} (a VM) needs python3 in its image: {exc.message}",
                sandbox_id=sandbox_id,
            ) from exc
        events = process.events()
        stderr = b""
        for event in events:
            if isinstance(event, Output) and event.stream == "stdout":
                return cls(process, events, event.data[1:])  # the first byte is the relay's "connected"
            if isinstance(event, Output):
                stderr += event.data
            elif isinstance(event, Exited):
                break
        raise PortUnreachable(
            f"nothing accepts connections on port {port} in sandbox {sandbox_id} "
            f"({stderr.decode(errors='replace').strip() or 'the relay exited'}); start the server first, or retry",
            sandbox_id=sandbox_id,
            port=port,
        )

    def send(self, data: bytes) -> None:
        self._process.write_stdin(data)

    def close_write(self) -> None:
        self._process.close_stdin()

    def chunks(self) -> Iterator[bytes]:
        if self._first:
            yield self._first
        for event in self._events:
            if self._closed.is_set() or isinstance(event, Exited):
                return
            if event.stream == "stdout" and event.data:
                yield event.data

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            try:
                self._process.signal(9)
            except Exception:  # noqa: BLE001 - already gone
                pass


def open_end(handle: DriverSandbox, port: int, sandbox_id: str) -> SandboxEnd:
    """Connect to `port` inside the sandbox the best way its substrate allows."""
    try:
        netns = handle.netns_path()
    except Unsupported:
        return ProcessEnd.connect(handle, port, sandbox_id)
    return SocketEnd(connect_in_netns(netns, port, sandbox_id))

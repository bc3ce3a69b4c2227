"""PortService: a TCP connection from the host to a port inside a sandbox, relayed over one bidi gRPC stream.

Why from the host and not through the agent: a container sandbox's network is a Linux network namespace, so
the host can create a socket *in* that namespace (a short-lived thread `setns`es into it, creates the socket
and leaves; a socket keeps the namespace it was created in) and connect to 127.0.0.1:PORT there. Nothing runs
inside the sandbox, nothing listens on the host, and a sandbox without network (`network=False`) is reachable
all the same. VMs have no host-side network namespace; their drivers answer `Unsupported` (docs/ports.md).

Stream shape: the client's first message names sandbox + port; the server answers `opened` once connected (or
a typed error: PortUnreachable when nothing accepts connections), then bytes flow both ways. `close_write`
(or the end of the client's stream) half-closes the sandbox side; the RPC ends when the sandbox side has
closed and the client has stopped sending, or when the client cancels. The socket is closed in every case.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc

from dsec.errors import DsecError, InvalidSpec, PortUnreachable
from dsec.server.auth import Authenticator
from dsec.server.errors import rpc_errors
from dsec.server.manager import SandboxManager
from dsec.server.metrics import PORT_BYTES, PORT_CONNECTIONS
from dsec.v1 import ports_pb2 as ppb
from dsec.v1 import ports_pb2_grpc as ppb_grpc

log = logging.getLogger("dsec.server.ports")

CONNECT_TIMEOUT_S = 10.0
CHUNK = 64 << 10
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


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


def _pump_to_sandbox(requests: Iterator[ppb.PortChunk], sock: socket.socket, done: threading.Event) -> None:
    """Client → sandbox. The end of the client's stream or `close_write` half-closes the sandbox side."""
    try:
        for message in requests:
            kind = message.WhichOneof("kind")
            if kind == "data":
                sock.sendall(message.data)
                PORT_BYTES.labels("in").inc(len(message.data))
            elif kind == "close_write":
                break
            else:
                log.warning("ForwardPort: unexpected %s message after the stream was opened; closing", kind)
                sock.shutdown(socket.SHUT_RDWR)
                return
        sock.shutdown(socket.SHUT_WR)
        for _ in requests:  # drain until the client ends its stream or cancels; no more data may follow
            pass
    except (OSError, grpc.RpcError, ValueError):
        pass  # the sandbox side reset the connection, or the client went away: the reader ends the RPC
    finally:
        done.set()


class PortService(ppb_grpc.PortServiceServicer):
    def __init__(self, manager: SandboxManager, auth: Authenticator | None = None) -> None:
        self.manager = manager
        self.auth = auth or Authenticator({})

    @rpc_errors
    def ForwardPort(self, request_iterator: Iterator[ppb.PortChunk], context: grpc.ServicerContext) -> Iterator[ppb.PortChunk]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            raise InvalidSpec("ForwardPort stream must start with an `open` message naming sandbox_id and port")
        sandbox_id, port = first.open.sandbox_id, first.open.port
        if not 0 < port < 65536:
            raise InvalidSpec(f"port must be 1..65535, got {port}")
        try:
            sandbox = self.manager.running(sandbox_id, self.auth.tenant(context))
            sock = connect_in_netns(sandbox.handle.netns_path(), port, sandbox_id)
        except DsecError as exc:
            PORT_CONNECTIONS.labels(type(exc).__name__).inc()
            raise
        PORT_CONNECTIONS.labels("opened").inc()
        log.debug("sandbox %s: port %d connected", sandbox_id, port)
        closed = threading.Lock()

        def close() -> None:
            if closed.acquire(blocking=False):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

        context.add_callback(close)  # the client cancelled or the RPC ended: the recv below returns
        client_done = threading.Event()
        writer = threading.Thread(
            target=_pump_to_sandbox, args=(request_iterator, sock, client_done), name=f"dsec-port-{sandbox_id}", daemon=True
        )
        writer.start()
        try:
            yield ppb.PortChunk(opened=ppb.PortOpened())
            while True:
                try:
                    data = sock.recv(CHUNK)
                except OSError:
                    break
                if not data:
                    break
                PORT_BYTES.labels("out").inc(len(data))
                yield ppb.PortChunk(data=data)
            if context.is_active():
                yield ppb.PortChunk(close_write=True)
                while not client_done.wait(1.0) and context.is_active():
                    pass  # TCP half-close: the client may still be sending
        finally:
            close()


def add_port_service(server: grpc.Server, manager: SandboxManager, auth: Authenticator | None = None) -> None:
    ppb_grpc.add_PortServiceServicer_to_server(PortService(manager, auth), server)

"""`PortConnection`: a TCP connection to a port inside a sandbox, over the server's PortService.

Why socket-like (`sendall`, `recv`, `shutdown_write`, `close`): code that talks to a server started in the
sandbox (an HTTP app, a kernel gateway, a database) can use it where it would use a socket, without the
sandbox having a network route to the caller or a port published on the host.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from dsec.errors import RuntimeFailure
from dsec.sdk.errors import to_dsec_error
from dsec.v1 import ports_pb2 as ppb
from dsec.v1 import ports_pb2_grpc as ppb_grpc

if TYPE_CHECKING:
    from dsec.sdk.client import Client

MAX_CHUNK = 1 << 20
_END = None


class PortConnection:
    """A connected byte stream to `127.0.0.1:port` inside a sandbox. Not thread-safe per direction: one
    sender and one receiver thread at a time (like a socket used from two threads)."""

    def __init__(self, client: Client, sandbox_id: str, port: int, connect_timeout_s: float | None = 30.0) -> None:
        self.sandbox_id = sandbox_id
        self.port = port
        self._outgoing: queue.Queue[ppb.PortChunk | None] = queue.Queue()
        self._outgoing.put(ppb.PortChunk(open=ppb.PortOpen(sandbox_id=sandbox_id, port=port)))
        self._buffer = b""
        self._eof = False
        self._write_closed = False
        self._lock = threading.Lock()
        stub = ppb_grpc.PortServiceStub(client.channel)
        self._call = stub.ForwardPort(self._requests(), metadata=client.metadata)
        try:
            first = self._next(connect_timeout_s)
            if first is None or first.WhichOneof("kind") != "opened":
                raise RuntimeFailure(f"port {port} of sandbox {sandbox_id}: the server did not confirm the connection")
        except BaseException:
            self.close()  # ends the request stream too: gRPC's thread reading it must not wait forever
            raise

    def _requests(self) -> Iterator[ppb.PortChunk]:
        while (message := self._outgoing.get()) is not _END:
            yield message

    def _next(self, timeout_s: float | None = None) -> ppb.PortChunk | None:
        """The next message from the server; None when its stream ended."""
        try:
            if timeout_s is None:
                return next(self._call)
            # a first message that never comes (a hung server) must not block the caller forever
            holder: dict = {}
            done = threading.Event()

            def read() -> None:
                try:
                    holder["message"] = next(self._call)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    holder["error"] = exc
                done.set()

            threading.Thread(target=read, daemon=True).start()
            if not done.wait(timeout_s):
                self._call.cancel()
                raise RuntimeFailure(f"port {self.port} of sandbox {self.sandbox_id}: no answer in {timeout_s}s")
            if "error" in holder:
                raise holder["error"]
            return holder["message"]
        except StopIteration:
            return None
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return None
            raise to_dsec_error(exc) from None

    # -- socket-like API ----------------------------------------------------------------------------------
    def sendall(self, data: bytes) -> None:
        if self._write_closed:
            raise BrokenPipeError(f"port {self.port} of sandbox {self.sandbox_id}: writing side is closed")
        view = memoryview(data)
        for start in range(0, len(view), MAX_CHUNK):
            self._outgoing.put(ppb.PortChunk(data=bytes(view[start : start + MAX_CHUNK])))

    def recv(self, bufsize: int = 65536) -> bytes:
        """Up to `bufsize` bytes; b"" once the sandbox side has closed its end."""
        with self._lock:
            while not self._buffer and not self._eof:
                message = self._next()
                kind = message.WhichOneof("kind") if message is not None else None
                if kind == "data":
                    self._buffer = message.data
                elif kind in (None, "close_write"):
                    self._eof = True
            out, self._buffer = self._buffer[:bufsize], self._buffer[bufsize:]
            return out

    def recv_all(self) -> bytes:
        """Everything until the sandbox side closes."""
        parts = []
        while chunk := self.recv(MAX_CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def shutdown_write(self) -> None:
        """Half-close: the server in the sandbox reads EOF; its reply can still be received."""
        if not self._write_closed:
            self._write_closed = True
            self._outgoing.put(_END)

    def close(self) -> None:
        self.shutdown_write()
        self._call.cancel()

    def __enter__(self) -> PortConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


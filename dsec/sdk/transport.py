"""`Connection`: one gRPC channel to a dsec server (remote via address/DSEC_ADDRESS, or embedded), with the auth
metadata, typed errors and capacity retries every SDK call goes through; and the process-wide default one.

Why a module of its own: `Sandbox` needs a channel and `Client` builds `Sandbox` objects, so the channel sits
below both. `Client` (dsec/sdk/client.py) is the `Connection` with the server's collections on it; it installs
itself as the default's factory when imported (always: `dsec/__init__.py` imports it before any SDK call can run),
so `Sandbox.create()` and `dsec.default_client()` share one connection without sandbox.py importing client.py.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc.experimental import ChannelOptions

from dsec.errors import ERROR_METADATA_KEY, CapacityExceeded
from dsec.sdk.embedded import EmbeddedServer
from dsec.sdk.errors import to_dsec_error
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

T = TypeVar("T")
MAX_MESSAGE = 64 << 20
CAPACITY_RETRY_S = 600.0
DEFAULT_RETRY_AFTER_S = 0.5  # when gRPC itself sheds load (concurrent-RPC limit) it sends no retry-after


def _retry_after(error: CapacityExceeded) -> float | None:
    """Seconds to wait before retrying a capacity rejection, or None if it is not retryable (oversized message)."""
    if error.details.get("retry_after_s") is not None:
        return float(error.details["retry_after_s"])
    if "concurrent rpc limit" in error.message.lower():
        return DEFAULT_RETRY_AFTER_S
    return None


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class Connection:
    """A channel to a dsec server. With no address and no $DSEC_ADDRESS, starts an embedded server."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        http_listen: str | None = None,
    ) -> None:
        """`token` (or $DSEC_TOKEN) authenticates; `tls_ca` (or $DSEC_TLS_CA) switches to TLS, and
        `tls_cert`/`tls_key` add a client certificate for servers that require mutual TLS. `http_listen`
        (or $DSEC_HTTP_LISTEN) makes the embedded server also serve the E2B/SandboxFusion HTTP front door."""
        address = address or os.environ.get("DSEC_ADDRESS") or None
        self._embedded: EmbeddedServer | None = None
        if address is None:
            self._embedded = EmbeddedServer.start(http_listen=http_listen)
            address = self._embedded.address
        self.address = address
        self._token = token or os.environ.get("DSEC_TOKEN") or None
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        tls_ca = tls_ca or os.environ.get("DSEC_TLS_CA") or None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca),
            private_key=_read(tls_key) if tls_key else None,
            certificate_chain=_read(tls_cert) if tls_cert else None,
        ) if tls_ca else None

        def open_channel(extra: list[tuple[str, Any]]) -> grpc.Channel:
            if credentials is not None:
                return grpc.secure_channel(address, credentials, options=options + extra)
            return grpc.insecure_channel(address, options=options + extra)

        self.channel = open_channel([])
        self.sandboxes = pb_grpc.SandboxServiceStub(self.channel)
        # Exec's stream is read to its end on the caller's thread, so it goes through a channel whose server
        # streams are polled on that thread: the default channel starts a thread for each stream opened while no
        # other call is in flight, about 0.3 ms of a 2 ms exec. Streams other threads cancel (process output,
        # watches) stay on the default channel. Same target and options: grpc shares the connection.
        self._exec_channel = open_channel([(ChannelOptions.SingleThreadedUnaryStream, 1)])
        self.execs = pb_grpc.SandboxServiceStub(self._exec_channel)
        self._unserved: set[object] = set()  # stub methods the server answered UNIMPLEMENTED for (unary_if_served)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self._token}")] if self._token else []

    def rpc(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        """Unary call with typed errors; honours the server's retry-after when it is at capacity."""
        deadline = time.monotonic() + CAPACITY_RETRY_S
        while True:
            try:
                return method(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                error = to_dsec_error(exc)
                retry_after = _retry_after(error) if isinstance(error, CapacityExceeded) else None
                if retry_after is not None and time.monotonic() < deadline:
                    jitter = random.uniform(0.8, 1.2)  # spread a thundering herd of retries
                    time.sleep(min(retry_after * jitter, max(deadline - time.monotonic(), 0)))
                    continue
                raise error from None

    def unary_if_served(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T | None:
        """A unary call the server may not serve: None when it answers UNIMPLEMENTED, which it does before doing
        anything, so the caller takes its other path (an older server or gateway lacks the method: remembered,
        not asked again; a refusal of this request, such as ExecCollect's for a large output cap, is per call)."""
        if method in self._unserved:
            return None
        try:
            return method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise to_dsec_error(exc) from None
            if not any(key == ERROR_METADATA_KEY for key, _ in exc.trailing_metadata() or ()):
                self._unserved.add(method)  # grpc's own answer, no dsec error class: the method does not exist there
            return None

    def stream(self, method: Callable[..., Iterable[T]], request: Any, timeout: float | None = None) -> Iterable[T]:
        try:
            yield from method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise to_dsec_error(exc) from None

    def client_stream(self, method: Callable[..., T], requests: Iterable[Any], timeout: float | None = None) -> T:
        try:
            return method(iter(requests), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise to_dsec_error(exc) from None

    def close(self) -> None:
        """Close the channel; an embedded server destroys its sandboxes and exits."""
        self._exec_channel.close()
        self.channel.close()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None


_default: Connection | None = None
_default_factory: Callable[[], Connection] = Connection
_default_lock = threading.Lock()


def set_default_factory(factory: Callable[[], Connection]) -> None:
    """What builds the process-wide connection on first use (dsec/sdk/client.py installs `Client`)."""
    global _default_factory
    _default_factory = factory


def default_connection() -> Connection:
    """The process-wide connection used when none is passed (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = _default_factory()
        return _default

"""What every compat sub-app shares: the dsec gRPC backend it calls and the per-sandbox keys it remembers.

The door holds no sandbox logic: each HTTP request becomes gRPC calls on the backend (the server's own
address, or a Ray cluster gateway), carrying the caller's API key as `authorization: Bearer <key>`, so
tenancy, admission control, metrics and logs are exactly those of the gRPC API.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from dsec.errors import ERROR_METADATA_KEY

MAX_MESSAGE = 64 << 20
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]

# Keys the dispatcher puts into `scope["state"]` for the sub-apps.
STATE_SANDBOX_ID = "dsec_sandbox_id"
STATE_SANDBOX_PORT = "dsec_sandbox_port"
STATE_API_KEY = "dsec_api_key"
# The label that keeps a door-created sandbox's envd access token (so a restarted door still enforces it).
ENVD_TOKEN_LABEL = "e2b.envd_token"
# The label every sandbox created through the door's E2B API carries (its template): what `owner_of` answers for.
DOOR_CREATED_LABEL = "e2b.template"

# sandbox id -> (its labels, a key of its owner; None with auth off), or None when there is no such sandbox
OwnerLookup = Callable[[str], "tuple[dict[str, str], str | None] | None"]


class BoundStub:
    """A gRPC stub whose every method call carries the caller's bearer token (and any extra metadata)."""

    def __init__(self, stub: Any, metadata: list[tuple[str, str]]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(request: Any, **kwargs: Any) -> Any:
            metadata = list(self._metadata) + list(kwargs.pop("metadata", None) or ())
            return method(request, metadata=metadata, **kwargs)

        return call


@dataclass
class CompatContext:
    """Shared by the front door's sub-apps; one per HTTP listener."""

    backend_address: str
    tls: grpc.ChannelCredentials | None = None  # set when the backend serves TLS
    # where the door runs inside the server (`dsec serve --http-listen`): who owns a sandbox it has not seen
    owner_of: OwnerLookup | None = None
    _channels: dict[int, grpc.aio.Channel] = field(default_factory=dict, repr=False)
    _keys: dict[str, str] = field(default_factory=dict, repr=False)
    _envd_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    _known: set[str] = field(default_factory=set, repr=False)  # sandboxes whose token (or lack of one) is known
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- gRPC -----------------------------------------------------------------------------------------
    def channel(self) -> grpc.aio.Channel:
        """The asyncio channel of the running event loop (aio channels are bound to the loop that made them)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.get(id(loop))
            if channel is None:
                if self.tls is not None:
                    channel = grpc.aio.secure_channel(self.backend_address, self.tls, options=_CHANNEL_OPTIONS)
                else:
                    channel = grpc.aio.insecure_channel(self.backend_address, options=_CHANNEL_OPTIONS)
                self._channels[id(loop)] = channel
            return channel

    def stub(self, service_stub_cls: type, api_key: str | None) -> BoundStub:
        """An asyncio stub of `service_stub_cls` (e.g. `SandboxServiceStub`) calling as the owner of `api_key`."""
        return BoundStub(service_stub_cls(self.channel()), bearer(api_key))

    async def aclose(self) -> None:
        """Close the channels of the current loop (the HTTP server calls it on shutdown)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.pop(id(loop), None)
        if channel is not None:
            await channel.close()

    # -- per-sandbox keys ---------------------------------------------------------------------------------
    def remember_sandbox(self, sandbox_id: str, api_key: str | None, envd_token: str | None = None) -> None:
        """Record the key a sandbox was created with (envd calls carry none and run as that tenant) and,
        for `secure` sandboxes, the envd access token that envd calls must present."""
        with self._lock:
            self._known.add(sandbox_id)
            if api_key:
                self._keys[sandbox_id] = api_key
            if envd_token:
                self._envd_tokens[sandbox_id] = envd_token

    def forget_sandbox(self, sandbox_id: str) -> None:
        with self._lock:
            self._keys.pop(sandbox_id, None)
            self._envd_tokens.pop(sandbox_id, None)
            self._known.discard(sandbox_id)

    def knows(self, sandbox_id: str) -> bool:
        """Whether this door has seen the sandbox (created, connected, or looked up for its envd token)."""
        with self._lock:
            return sandbox_id in self._known

    def owner_key(self, sandbox_id: str) -> str | None:
        """A key of the tenant owning a sandbox created through this door's E2B API, for a request that carried
        none (envd and port requests never do) after the door forgot it: a restarted server re-adopts its
        sandboxes, and E2B clients holding them keep working. Sandboxes created otherwise are not answered for:
        a key-less request reaches only what was created or connected through the door, restart or not."""
        found = self.owner_of(sandbox_id) if self.owner_of is not None else None
        if found is None:
            return None
        labels, key = found
        return key if DOOR_CREATED_LABEL in labels else None

    def key_for(self, sandbox_id: str) -> str | None:
        with self._lock:
            return self._keys.get(sandbox_id)

    def envd_token_for(self, sandbox_id: str) -> str | None:
        with self._lock:
            return self._envd_tokens.get(sandbox_id)


def bearer(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def error_name(exc: grpc.RpcError) -> str:
    """The dsec error class name a gRPC error carries (trailing metadata `dsec-error`), or ""."""
    try:
        trailing = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a channel-level error may carry no metadata at all
        return ""
    for key, value in trailing:
        if key == ERROR_METADATA_KEY:
            return value if isinstance(value, str) else value.decode()
    return ""


def grpc_code(exc: grpc.RpcError) -> grpc.StatusCode:
    try:
        return exc.code()
    except Exception:  # noqa: BLE001
        return grpc.StatusCode.UNKNOWN


def grpc_message(exc: grpc.RpcError) -> str:
    try:
        return exc.details() or ""
    except Exception:  # noqa: BLE001
        return ""


HTTP_STATUS_FOR_GRPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}


def http_status_for(exc: grpc.RpcError) -> int:
    """The HTTP status a REST client expects for a gRPC error (500 only for a genuine server fault). A sandbox that
    ended (SandboxExpired: timeout, idle, destroyed, lost) is E2B's 404, as for a sandbox it never had."""
    if error_name(exc) == "SandboxExpired":
        return 404
    return HTTP_STATUS_FOR_GRPC.get(grpc_code(exc), 500)

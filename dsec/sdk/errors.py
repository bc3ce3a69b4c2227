"""Map gRPC errors back to the typed exceptions of dsec.errors."""

from __future__ import annotations

import grpc

from dsec import errors as E

_BY_CODE: dict[grpc.StatusCode, type[E.DsecError]] = {
    grpc.StatusCode.NOT_FOUND: E.SandboxNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: E.InvalidSpec,
    grpc.StatusCode.DEADLINE_EXCEEDED: E.ExecTimeout,
    grpc.StatusCode.RESOURCE_EXHAUSTED: E.CapacityExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: E.SandboxStateError,
    grpc.StatusCode.UNIMPLEMENTED: E.Unsupported,
    grpc.StatusCode.UNAVAILABLE: E.ServerUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: E.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: E.PermissionDenied,
}


def to_dsec_error(exc: grpc.RpcError) -> E.DsecError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = exc.details() if hasattr(exc, "details") else str(exc)
    name, retry_after, reason = "", None, ""
    for key, value in (exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else ():
        if key == E.ERROR_METADATA_KEY:
            name = value
        elif key == E.RETRY_AFTER_METADATA_KEY:
            retry_after = float(value)
        elif key == E.EXPIRED_REASON_METADATA_KEY:
            reason = value
    cls = E.error_class(name) if name else None
    if cls is None:
        cls = _BY_CODE.get(code, E.RuntimeFailure)
        if message and code == grpc.StatusCode.INVALID_ARGUMENT and "message larger than max" in message:
            cls = E.InvalidSpec
    details: dict[str, object] = {"retry_after_s": retry_after} if retry_after is not None else {}
    if issubclass(cls, E.SandboxExpired):
        details["reason"] = reason or "destroyed"
    return cls(message or code.name, grpc_code=code.name, **details)

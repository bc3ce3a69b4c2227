"""Turn `DsecError`s raised inside servicer methods into typed gRPC statuses.

Why a decorator and not an interceptor: grpc's Python interceptors see handlers, not the generator a
streaming method returns, so an error raised mid-stream would escape them. Wrapping each method catches
errors in unary and streaming methods alike.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from dsec.errors import (
    ERROR_METADATA_KEY,
    EXPIRED_REASON_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    CapacityExceeded,
    DsecError,
    SandboxExpired,
)

log = logging.getLogger("dsec.server")

F = TypeVar("F", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, error: DsecError) -> None:
    metadata = [(ERROR_METADATA_KEY, type(error).__name__)]
    if isinstance(error, CapacityExceeded) and "retry_after_s" in error.details:
        metadata.append((RETRY_AFTER_METADATA_KEY, str(error.details["retry_after_s"])))
    if isinstance(error, SandboxExpired):
        metadata.append((EXPIRED_REASON_METADATA_KEY, error.reason))
    context.set_trailing_metadata(tuple(metadata))
    context.abort(error.code, error.message or type(error).__name__)


def _unexpected(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    log.exception("internal error in %s", method)
    context.set_trailing_metadata(((ERROR_METADATA_KEY, "RuntimeFailure"),))
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}")


def rpc_errors(method: F) -> F:
    """Map DsecError → its status code, anything else → INTERNAL with the cause (never a silent hang)."""
    name = method.__name__

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self, request, context):  # type: ignore[no-untyped-def]
            try:
                yield from method(self, request, context)
            except DsecError as error:
                _abort(context, error)
            except Exception as exc:  # noqa: BLE001 - last line of defence: report, don't crash the server
                if context.is_active() is False and isinstance(exc, (BrokenPipeError, ConnectionError)):
                    return
                _unexpected(context, name, exc)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def unary_wrapper(self, request, context):  # type: ignore[no-untyped-def]
        try:
            return method(self, request, context)
        except DsecError as error:
            _abort(context, error)
        except Exception as exc:  # noqa: BLE001
            _unexpected(context, name, exc)

    return unary_wrapper  # type: ignore[return-value]

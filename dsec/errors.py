"""Typed errors shared by the server and the SDK.

The server raises a `DsecError` subclass; the gRPC layer turns it into a status code plus the trailing
metadata key ``dsec-error`` (the class name), and the SDK turns that back into the same class. So a user
catches `dsec.SandboxNotFound` whether the server is embedded or remote.
"""

from __future__ import annotations

import grpc

ERROR_METADATA_KEY = "dsec-error"
RETRY_AFTER_METADATA_KEY = "dsec-retry-after"
EXPIRED_REASON_METADATA_KEY = "dsec-expired-reason"


class DsecError(Exception):
    """Base class of every error dsec raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidSpec(DsecError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidPath(InvalidSpec):
    """A file path that is malformed or would leave the sandbox."""


class SandboxNotFound(DsecError):
    code = grpc.StatusCode.NOT_FOUND


class SessionNotFound(DsecError):
    code = grpc.StatusCode.NOT_FOUND


class ProcessNotFound(DsecError):
    """No running (or recently ended) process with that pid or tag in the sandbox."""

    code = grpc.StatusCode.NOT_FOUND


class SnapshotNotFound(DsecError):
    code = grpc.StatusCode.NOT_FOUND


class ImageNotFound(DsecError):
    code = grpc.StatusCode.NOT_FOUND


class FileNotFoundInSandbox(DsecError):
    code = grpc.StatusCode.NOT_FOUND


class FileExistsInSandbox(InvalidPath):
    """The path exists already (e.g. make_dir of an existing directory)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class CommandNotFound(DsecError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDeniedInSandbox(DsecError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ExecTimeout(DsecError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CallTimeout(ExecTimeout):
    pass


class OutOfMemory(DsecError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class CapacityExceeded(DsecError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DiskFull(DsecError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SandboxStateError(DsecError):
    """The sandbox is in a state that does not allow the operation (destroyed, paused, lost)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SandboxExpired(SandboxStateError):
    """The sandbox existed and has ended; `reason` says why: timeout | idle | destroyed | lost.

    Distinct from SandboxNotFound (an id this server never had, or whose end was long ago): a caller can tell
    "my sandbox timed out, create a new one" from "wrong id". A subclass of SandboxStateError, so code written
    against the older error still catches it."""

    REASONS = ("timeout", "idle", "destroyed", "lost")

    def __init__(self, message: str = "", reason: str = "destroyed", **details: object) -> None:
        super().__init__(message, reason=reason if reason in self.REASONS else "destroyed", **details)

    @property
    def reason(self) -> str:
        return str(self.details["reason"])


class VolumeNotFound(DsecError):
    code = grpc.StatusCode.NOT_FOUND


class VolumeExists(DsecError):
    code = grpc.StatusCode.ALREADY_EXISTS


class VolumeInUse(DsecError):
    """A volume held read-write by a sandbox (or read-only, for a writer), or deleted while mounted."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class TemplateNotFound(DsecError):
    code = grpc.StatusCode.NOT_FOUND


class TemplateExists(DsecError):
    code = grpc.StatusCode.ALREADY_EXISTS


class SandboxNotReady(DsecError):
    """A readiness probe did not pass within its deadline (or the start command exited non-zero first): the
    half-made sandbox was destroyed; the message carries the probe's last output."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unsupported(DsecError):
    code = grpc.StatusCode.UNIMPLEMENTED


class TrajectoryDiverged(DsecError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class StepIndeterminate(DsecError):
    """A logged step started but the server died before its result was logged: its effect is unknown."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(DsecError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DsecError):
    code = grpc.StatusCode.PERMISSION_DENIED


class PortUnreachable(DsecError):
    """Nothing accepts TCP connections on that port inside the sandbox (not started yet, or crashed)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class RuntimeFailure(DsecError):
    """The substrate (OCI runtime, Docker, QEMU) failed; the message says which and why."""

    code = grpc.StatusCode.INTERNAL


class ServerUnavailable(DsecError):
    code = grpc.StatusCode.UNAVAILABLE


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_class(name: str) -> type[DsecError] | None:
    """Find an error class by name (for the SDK side of the wire)."""
    for cls in [DsecError, *_all_subclasses(DsecError)]:
        if cls.__name__ == name:
            return cls
    return None

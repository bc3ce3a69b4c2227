"""dsec: a self-hostable RL sandbox platform — one SDK over function, container, microVM and VM sandboxes.

    from dsec import Sandbox
    with Sandbox.create(image="python", substrate="container") as sb:
        print(sb.exec("python3 -c 'print(2**100)'").text)
"""

from dsec.errors import (
    CallTimeout,
    CapacityExceeded,
    CommandNotFound,
    DiskFull,
    DsecError,
    ExecTimeout,
    FileNotFoundInSandbox,
    ImageNotFound,
    InvalidPath,
    InvalidSpec,
    OutOfMemory,
    PermissionDenied,
    PermissionDeniedInSandbox,
    ProcessNotFound,
    RuntimeFailure,
    SandboxExpired,
    SandboxNotFound,
    SandboxStateError,
    ServerUnavailable,
    SessionNotFound,
    SnapshotNotFound,
    StepIndeterminate,
    TrajectoryDiverged,
    Unauthenticated,
    Unsupported,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
)
from dsec.models import ExecResult, FileEntry, Resources, SandboxSpec, VolumeMount
from dsec.sdk.aio import AsyncSandbox
from dsec.sdk.client import Client, default_client
from dsec.sdk.sandbox import Sandbox, Session

__all__ = [
    "AsyncSandbox", "CallTimeout", "CapacityExceeded", "Client", "CommandNotFound", "default_client", "DiskFull",
    "DsecError", "ExecResult", "ExecTimeout", "FileEntry", "FileNotFoundInSandbox", "ImageNotFound", "InvalidPath",
    "InvalidSpec", "OutOfMemory", "PermissionDenied", "PermissionDeniedInSandbox", "ProcessNotFound", "Resources", "RuntimeFailure",
    "Sandbox", "SandboxExpired", "SandboxNotFound", "SandboxSpec", "SandboxStateError", "ServerUnavailable", "Session",
    "SessionNotFound", "SnapshotNotFound", "StepIndeterminate", "trajectory", "TrajectoryDiverged",
    "Unauthenticated", "Unsupported", "VolumeExists", "VolumeInUse", "VolumeMount", "VolumeNotFound",
]  # fmt: skip


def __getattr__(name: str):
    # `dsec.trajectory` lives with the trajectory log; imported lazily so the SDK works without it.
    if name == "trajectory":
        from dsec.sdk.trajectory import trajectory

        return trajectory
    raise AttributeError(name)

"""dsec: a self-hostable RL sandbox platform — one SDK over function, container, microVM and VM sandboxes.

    from dsec import Sandbox
    with Sandbox.create(image="python", substrate="container") as sb:
        print(sb.exec("python3 -c 'print(2**100)'").text)
"""

import types
from typing import Any

import dsec.trajectory as _trajectory_package
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
from dsec.sdk.trajectory import trajectory as _sdk_trajectory

__all__ = [
    "AsyncSandbox", "CallTimeout", "CapacityExceeded", "Client", "CommandNotFound", "default_client", "DiskFull",
    "DsecError", "ExecResult", "ExecTimeout", "FileEntry", "FileNotFoundInSandbox", "ImageNotFound", "InvalidPath",
    "InvalidSpec", "OutOfMemory", "PermissionDenied", "PermissionDeniedInSandbox", "ProcessNotFound", "Resources", "RuntimeFailure",
    "Sandbox", "SandboxExpired", "SandboxNotFound", "SandboxSpec", "SandboxStateError", "ServerUnavailable", "Session",
    "SessionNotFound", "SnapshotNotFound", "StepIndeterminate", "trajectory", "TrajectoryDiverged",
    "Unauthenticated", "Unsupported", "VolumeExists", "VolumeInUse", "VolumeMount", "VolumeNotFound",
]  # fmt: skip



class _CallableModule(types.ModuleType):
    """`dsec.trajectory` names both the trajectory-log package (server side) and the SDK's context manager
    `dsec.trajectory("run-7/prompt-42/sample-3")`. Importing any module of the package binds the package to the
    attribute `dsec.trajectory`, so the package module itself is made callable here, at the top level (the
    package must not import the SDK above it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _sdk_trajectory(*args, **kwargs)


_trajectory_package.__class__ = _CallableModule

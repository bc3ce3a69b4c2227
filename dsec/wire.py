"""The one wire boundary: protobuf messages <-> the public pydantic models (dsec/models.py), both directions.

The server turns what it knows into a model and the model into a message here; the SDK turns messages back into
models here, so users never hold a protobuf. Shapes spelled alike on both sides convert by reflection over the
message descriptor: a field added to a .proto needs only its attribute on the model (tests/core/test_wire.py
fails until it has one). The shapes that differ have their own functions below: a spec (a zero on the wire means
"the default"), a pool (a nested shape on the wire, flat for users) and an exec result (a status beside output).
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError

from dsec import models as m
from dsec.config import PoolConfig
from dsec.errors import InvalidSpec
from dsec.v1 import filesystem_pb2 as fpb
from dsec.v1 import image_pb2 as ipb
from dsec.v1 import process_pb2 as ppb
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import template_pb2 as tmpb
from dsec.v1 import snapshot_registry_pb2 as srpb
from dsec.v1 import trajectory_pb2 as tpb
from dsec.v1 import volume_pb2 as vpb

ModelT = TypeVar("ModelT", bound=BaseModel)

PAIRS: tuple[tuple[type[BaseModel], type[Message]], ...] = (
    (m.Resources, pb.Resources),
    (m.VolumeMount, pb.VolumeMount),
    (m.ReadyProbe, pb.ReadyProbe),
    (m.SandboxSpec, pb.SandboxSpec),
    (m.SandboxInfo, pb.SandboxInfo),
    (m.SnapshotInfo, pb.SnapshotRef),
    (m.SandboxMetrics, pb.SandboxMetrics),
    (m.SandboxLogEntry, pb.SandboxLogEntry),
    (m.PoolInfo, pb.PoolInfo),
    (m.ExecResult, pb.ExecRecord),
    (m.FileEntry, pb.FileEntry),
    (m.VolumeInfo, vpb.VolumeInfo),
    (m.ImageLayer, ipb.ImageLayer),
    (m.ImageConfig, ipb.ImageRuntimeConfig),
    (m.ImageInfo, ipb.Image),
    (m.BuildResult, ipb.BuildImageResponse),
    (m.PruneResult, ipb.PruneResponse),
    (m.DiskUsage, ipb.DiskUsageResponse),
    (m.PathInfo, fpb.FsEntry),
    (m.FsChange, fpb.WatchEvent.Change),
    (m.ProcessInfo, ppb.ProcessInfo),
    (m.TrajectorySnapshot, tpb.Snapshot),
    (m.TrajectoryInfo, tpb.TrajectoryInfo),
    (m.LoggedStep, tpb.LoggedStep),
    (m.TemplateInfo, tmpb.TemplateInfo),
    (m.CollectedSnapshot, tmpb.CollectedSnapshot),
    (m.PushedSnapshot, srpb.PushSnapshotResponse),
)
"""Every public shape and its message: what `to_pb` and `from_pb` accept."""

_MESSAGE_OF = dict(PAIRS)
_MODEL_OF = {message: model for model, message in PAIRS}
_ZERO_IS_DEFAULT = (m.Resources, m.SandboxSpec, m.ReadyProbe)
"""Request shapes: a field left at its zero on the wire takes the model's (or the server's) default."""


def _invalid(shape: str, exc: ValidationError) -> InvalidSpec:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return InvalidSpec(f"invalid {shape}: {problems}")


# -- generic: fields spelled alike ---------------------------------------------------------------------------
def _value_to_pb(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return to_pb(value) if _message_class(type(value)) else value.model_dump()
    if isinstance(value, list):
        return [_value_to_pb(item) for item in value]
    return value


def _message_class(model: type[BaseModel]) -> type[Message] | None:
    return next((_MESSAGE_OF[cls] for cls in model.__mro__ if cls in _MESSAGE_OF), None)


def _fields_to_pb(model: BaseModel, message_class: type[Message]) -> Message:
    values = {}
    for field in message_class.DESCRIPTOR.fields:
        value = getattr(model, field.name, None)
        if value is not None:
            values[field.name] = _value_to_pb(value)
    return message_class(**values)


def _value_from_pb(value: Any) -> Any:
    if not isinstance(value, Message):
        return value
    if type(value) in _MODEL_OF:
        return from_pb(value)
    return {f.name: _value_from_pb(v) for f, v in value.ListFields()}  # a nested shape the model validates itself


def _fields_from_pb(
    message: Message, model: type[BaseModel], zero_is_default: bool, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.name not in model.model_fields or field.name in skip:
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = {k: _value_from_pb(v) for k, v in value.items()}
        elif field.is_repeated:
            value = [_value_from_pb(item) for item in value]
        elif field.message_type is not None:
            if not message.HasField(field.name):
                continue
            value = _value_from_pb(value)
        if zero_is_default and not value:
            continue
        values[field.name] = value
    return values


def to_pb(model: BaseModel) -> Message:
    """The message for a public model (a subclass converts as its registered base: FileInfo as FileEntry)."""
    if isinstance(model, m.PoolInfo):
        return pool_to_pb(model)
    if isinstance(model, m.ExecResult):
        return exec_record(model)
    message_class = _message_class(type(model))
    if message_class is None:
        raise TypeError(f"{type(model).__name__} has no wire message (dsec.wire.PAIRS)")
    return _fields_to_pb(model, message_class)


def from_pb(message: Message) -> BaseModel:
    """The public model for a message; a message that does not validate is InvalidSpec."""
    if isinstance(message, pb.SandboxSpec):
        return spec_from_pb(message)
    if isinstance(message, pb.PoolInfo):
        return pool_from_pb(message)
    if isinstance(message, pb.ExecRecord):
        return exec_result(message)
    model = _MODEL_OF[type(message)]
    try:
        return model(**_fields_from_pb(message, model, model in _ZERO_IS_DEFAULT))
    except ValidationError as exc:
        raise _invalid(model.__name__, exc) from None


def from_pb_as(model: type[ModelT], message: Message) -> ModelT:
    """`from_pb`, typed: the SDK states which model it expects back."""
    result = from_pb(message)
    if not isinstance(result, model):
        raise TypeError(f"{type(message).__name__} converts to {type(result).__name__}, not {model.__name__}")
    return result


# -- sandbox specs: zero = default --------------------------------------------------------------------------
def spec_from_pb(
    message: pb.SandboxSpec, default_resources: m.Resources | None = None, default_timeout_s: float | None = None
) -> m.SandboxSpec:
    """Validate a wire spec. Zeros take the model's defaults, or the server's when it passes its own."""
    values = _fields_from_pb(message, m.SandboxSpec, zero_is_default=True, skip=("resources",))
    wire_resources = _fields_from_pb(message.resources, m.Resources, zero_is_default=True)
    try:
        base = default_resources.model_dump() if default_resources is not None else {}
        values["resources"] = m.Resources(**(base | wire_resources))
        if "timeout_s" not in values and default_timeout_s is not None:
            values["timeout_s"] = default_timeout_s
        return m.SandboxSpec(**values)
    except ValidationError as exc:
        raise _invalid("sandbox spec", exc) from None


def spec_to_pb(spec: m.SandboxSpec, *, leave_defaults_to_server: bool = False) -> pb.SandboxSpec:
    """The wire spec; with `leave_defaults_to_server`, resources and timeout the caller did not set travel as 0
    so the server applies its own defaults (what `client.create` wants)."""
    message = _fields_to_pb(spec, pb.SandboxSpec)
    if leave_defaults_to_server:
        for name in set(m.Resources.model_fields) - spec.resources.model_fields_set:
            message.resources.ClearField(name)
        if "timeout_s" not in spec.model_fields_set:
            message.ClearField("timeout_s")
    return message  # type: ignore[return-value]


# -- pools: a nested shape on the wire, flat for users ------------------------------------------------------
_SHAPE = ("image", "substrate", "driver", "network_allow")
_RESOURCES = ("cpu", "memory_mb", "pids", "disk_mb")


def pool_to_pb(info: m.PoolInfo) -> pb.PoolInfo:
    shape = pb.PoolShape(**{k: getattr(info, k) for k in _SHAPE},
                         resources=pb.Resources(**{k: getattr(info, k) for k in _RESOURCES}))
    status = {f.name: getattr(info, f.name) for f in pb.PoolInfo.DESCRIPTOR.fields if f.name != "shape"}
    return pb.PoolInfo(shape=shape, **status)


def pool_from_pb(message: pb.PoolInfo) -> m.PoolInfo:
    shape, resources = message.shape, message.shape.resources
    values: dict[str, Any] = {k: getattr(shape, k) for k in _SHAPE} | {k: getattr(resources, k) for k in _RESOURCES}
    values["network_allow"] = list(shape.network_allow)
    values |= {f.name: getattr(message, f.name) for f in pb.PoolInfo.DESCRIPTOR.fields if f.name != "shape"}
    return m.PoolInfo(**values)


def pool_config_from_pb(message: pb.ResizePoolRequest) -> PoolConfig:
    """A ResizePool request as the server's pool config (resources left at 0 take the server's defaults)."""
    shape, resources = message.shape, message.shape.resources
    try:
        return PoolConfig(image=shape.image, substrate=shape.substrate or "container", driver=shape.driver,
                          network_allow=list(shape.network_allow), size=message.size, max_size=message.max_size,
                          **{k: getattr(resources, k) for k in _RESOURCES})
    except ValidationError as exc:
        raise _invalid("pool", exc) from None


# -- exec results: output beside a status -------------------------------------------------------------------
_STATUS = tuple(f.name for f in pb.ExecStatus.DESCRIPTOR.fields if f.name in m.ExecResult.model_fields)


def exec_result(record: pb.ExecRecord) -> m.ExecResult:
    return m.ExecResult(stdout=record.stdout, stderr=record.stderr, **{k: getattr(record.status, k) for k in _STATUS})


def exec_record(result: m.ExecResult) -> pb.ExecRecord:
    status = pb.ExecStatus(**{k: getattr(result, k) for k in _STATUS})
    return pb.ExecRecord(stdout=result.stdout, stderr=result.stderr, status=status)

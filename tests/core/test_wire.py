"""dsec/wire.py is the one protobuf <-> pydantic boundary: every public shape survives a round trip both ways, no
field of a message is dropped on the way to its model, and nothing the SDK hands to users is a protobuf."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from google.protobuf.message import Message
from pydantic import BaseModel

import dsec.sdk
from dsec import models as m
from dsec import wire
from dsec.config import ServerConfig
from dsec.errors import InvalidSpec
from dsec.v1 import sandbox_pb2 as pb

pytestmark = pytest.mark.timeout(300)

_CUSTOM = {m.PoolInfo, m.ExecResult}  # flattened or split on the wire: checked by their own tests below
_SPEC = m.SandboxSpec(
    image="python", substrate="vm", resources=m.Resources(cpu=2, memory_mb=300, pids=64, disk_mb=50), timeout_s=60,
    env={"A": "1"}, labels={"team": "rl"}, network_allow=["1.2.3.4:80"], driver="tcg", workdir="/w",
    on_timeout="pause", idle_timeout_s=5, volumes=[m.VolumeMount(name="data", mount_path="/data", read_only=True)],
)  # fmt: skip
_OVERRIDES: dict[type[BaseModel], BaseModel] = {
    m.SandboxSpec: _SPEC,
    m.Resources: _SPEC.resources,
    m.VolumeMount: _SPEC.volumes[0],
    m.FileEntry: m.FileEntry(name="a.txt", type="symlink", size=3, mode=0o644, mtime=1.5),
    m.ReadyProbe: m.ReadyProbe(tcp_port=8000, interval_s=0.5, timeout_s=9),
}
_OVERRIDES[m.TemplateInfo] = m.TemplateInfo(
    name="web", image="python", image_digest="sha256:ab", substrate="vm", driver="tcg", resources=_SPEC.resources,
    start=["python3", "-m", "http.server"], ready=_OVERRIDES[m.ReadyProbe], snapshot_id="snap-1",
    snapshot_kind="memory+disk", created_at=3.5, build_ms=120.0,
)  # fmt: skip


def _value(annotation: Any, name: str) -> Any:
    """A non-default value of this type, so a dropped field shows up as a difference."""
    origin = get_origin(annotation)
    if origin is Literal:
        return get_args(annotation)[-1]
    if origin is list:
        return [_value(get_args(annotation)[0], name)]
    if origin is dict:
        return {"key": _value(get_args(annotation)[1], name)}
    if origin in (Union, types.UnionType):
        return _value(next(a for a in get_args(annotation) if a is not type(None)), name)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return sample(annotation)
    return {str: f"{name}-value", int: 7, float: 2.5, bool: True, bytes: b"\x00\xffraw"}[annotation]


def sample(model: type[BaseModel]) -> BaseModel:
    if model in _OVERRIDES:
        return _OVERRIDES[model]
    return model(**{name: _value(field.annotation, name) for name, field in model.model_fields.items()})


@pytest.mark.parametrize("model", [model for model, _ in wire.PAIRS], ids=lambda model: model.__name__)
def test_round_trip_both_ways(model: type[BaseModel]) -> None:
    original = sample(model)
    message = wire.to_pb(original)
    assert type(message) is dict(wire.PAIRS)[model]
    assert wire.from_pb(message) == original
    assert wire.to_pb(wire.from_pb(message)) == message


@pytest.mark.parametrize("pair", [p for p in wire.PAIRS if p[0] not in _CUSTOM], ids=lambda p: p[0].__name__)
def test_every_message_field_has_a_model_attribute(pair: tuple[type[BaseModel], type[Message]]) -> None:
    model, message = pair
    missing = [f.name for f in message.DESCRIPTOR.fields if f.name not in model.model_fields]
    assert not missing, f"{message.__name__} fields {missing} would be dropped on the way to {model.__name__}"


def test_pool_and_exec_result_carry_every_field() -> None:
    pool_fields = {f.name for f in pb.PoolInfo.DESCRIPTOR.fields} - {"shape"}
    pool_fields |= {f.name for f in pb.PoolShape.DESCRIPTOR.fields} - {"resources"}
    pool_fields |= {f.name for f in pb.Resources.DESCRIPTOR.fields}
    assert pool_fields <= set(m.PoolInfo.model_fields)
    status = {f.name for f in pb.ExecStatus.DESCRIPTOR.fields} - {"memory_limit_mb"}  # the error names it instead
    assert status | {"stdout", "stderr"} <= set(m.ExecResult.model_fields)


def test_a_zero_on_the_wire_takes_the_default() -> None:
    assert wire.from_pb(pb.SandboxSpec()) == m.SandboxSpec()
    config = ServerConfig(default_resources=m.Resources(memory_mb=128), default_timeout_s=42.0)
    spec = wire.spec_from_pb(pb.SandboxSpec(resources=pb.Resources(cpu=3)), config.default_resources, 42.0)
    assert (spec.resources.cpu, spec.resources.memory_mb, spec.timeout_s) == (3, 128, 42.0)


def test_the_sdk_leaves_unset_resources_and_timeout_to_the_server() -> None:
    chosen = m.SandboxSpec(image="python", resources={"memory_mb": 64})
    message = wire.spec_to_pb(chosen, leave_defaults_to_server=True)
    assert (message.resources.memory_mb, message.resources.cpu, message.timeout_s) == (64, 0, 0)
    assert wire.spec_to_pb(chosen).timeout_s == chosen.timeout_s


def test_a_bad_message_is_a_typed_error() -> None:
    from dsec.substrates import registry  # noqa: F401 - installs the registered-names check, as in the server

    with pytest.raises(InvalidSpec, match="registered substrates: .*container"):
        wire.spec_from_pb(pb.SandboxSpec(substrate="mainframe"))
    with pytest.raises(InvalidSpec, match="cpu"):
        wire.spec_from_pb(pb.SandboxSpec(resources=pb.Resources(cpu=-1)))


class _Unregistered(BaseModel):
    x: int = 0


def test_a_model_without_a_message_is_refused() -> None:
    with pytest.raises(TypeError, match="no wire message"):
        wire.to_pb(_Unregistered())


def _sdk_namespace() -> tuple[list[type], dict[str, Any]]:
    """Every class defined in dsec.sdk, and the names their annotations use (incl. TYPE_CHECKING-only imports)."""
    classes: list[type] = []
    namespace: dict[str, Any] = {}
    for info in pkgutil.iter_modules(dsec.sdk.__path__):
        module = importlib.import_module(f"dsec.sdk.{info.name}")
        namespace |= vars(module)
        classes += [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
    return classes, namespace


def _protobufs_in(annotation: Any) -> list[Any]:
    if inspect.isclass(annotation) and issubclass(annotation, Message):
        return [annotation]
    return [found for arg in get_args(annotation) for found in _protobufs_in(arg)]


def test_no_public_sdk_method_is_annotated_to_return_a_protobuf() -> None:
    classes, namespace = _sdk_namespace()
    offenders = []
    for cls in classes:
        for name, function in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_"):
                continue
            returned = typing.get_type_hints(function, globalns=namespace).get("return")
            if _protobufs_in(returned):
                offenders.append(f"{cls.__name__}.{name} -> {returned}")
    assert not offenders


def _results(client: Any, sb: Any) -> dict[str, Any]:
    sb.exec("mkdir -p /tmp/w && echo hi > /tmp/w/a")
    return {
        "create": sb, "info": sb.info, "refresh": sb.refresh(), "metrics": sb.metrics(), "logs": sb.logs(),
        "list": client.list(), "files.list": sb.files.list("/tmp/w"), "stat": sb.files.stat("/tmp/w/a"),
        "list_tree": sb.files.list_tree("/tmp/w"), "processes": sb.processes.list(), "exec": sb.exec("true"),
        "snapshots": client.snapshots(), "images": client.images.ls(), "du": client.images.du(),
        "pools": client.pools.list(), "volumes": client.volumes.list(),
    }  # fmt: skip


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [item for element in value for item in _flatten(element)]
    return [value]


def test_a_live_sandbox_hands_back_models_not_protobufs(client: Any) -> None:
    sb = client.create("busybox", "container", driver="crun", memory_mb=128, timeout_s=300)
    try:
        results = _results(client, sb)
    finally:
        sb.destroy()
    protobufs = {name: type(v).__name__ for name, value in results.items() for v in _flatten(value) if isinstance(v, Message)}
    assert not protobufs
    assert isinstance(results["info"], m.SandboxInfo) and results["info"].state == "running"
    assert results["info"].spec.resources.memory_mb == 128 and results["info"].id == sb.id
    assert [e.name for e in results["files.list"]] == ["a"] and results["stat"].size == 3
    assert results["images"] and all(image.size_bytes > 0 and image.created_at > 0 for image in results["images"])
    assert results["metrics"].sampled_at > 0 and results["logs"][0].logged_at > 0


def test_the_sdk_imports_without_grpc_tools() -> None:
    """The stubs are made at setup/build; nothing generates them on import, so grpcio-tools is not a run-time need."""
    code = ("import sys; sys.modules['grpc_tools'] = None\n"
            "import dsec, dsec.sdk, dsec.sdk.client, dsec.sdk.sandbox, dsec.sdk.trajectory, dsec.server.main\n"
            "assert 'dsec.codegen' not in sys.modules, 'something still generates stubs on import'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

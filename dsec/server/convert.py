"""Conversions between wire messages and the pydantic models the server works with."""

from __future__ import annotations

import time

from pydantic import ValidationError

from dsec.config import PoolConfig, ServerConfig
from dsec.errors import InvalidSpec
from dsec.models import Resources, SandboxSpec, VolumeMount
from dsec.v1 import sandbox_pb2 as pb


def spec_from_pb(message: pb.SandboxSpec, config: ServerConfig) -> SandboxSpec:
    """Validate a wire spec, filling zeros with the server's defaults."""
    defaults = config.default_resources
    r = message.resources
    try:
        resources = Resources(
            cpu=r.cpu or defaults.cpu,
            memory_mb=r.memory_mb or defaults.memory_mb,
            pids=r.pids or defaults.pids,
            disk_mb=r.disk_mb or defaults.disk_mb,
        )
        return SandboxSpec(
            image=message.image or "busybox",
            substrate=message.substrate or "container",
            resources=resources,
            timeout_s=message.timeout_s or config.default_timeout_s,
            env=dict(message.env),
            labels=dict(message.labels),
            network=message.network,
            network_allow=list(message.network_allow),
            driver=message.driver,
            workdir=message.workdir,
            on_timeout=message.on_timeout or "destroy",
            idle_timeout_s=message.idle_timeout_s,
            volumes=[VolumeMount(name=v.name, mount_path=v.mount_path, read_only=v.read_only) for v in message.volumes],
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidSpec(f"invalid sandbox spec: {problems}") from None


def spec_to_pb(spec: SandboxSpec) -> pb.SandboxSpec:
    return pb.SandboxSpec(
        image=spec.image,
        substrate=spec.substrate,
        resources=pb.Resources(**spec.resources.model_dump()),
        timeout_s=spec.timeout_s,
        env=spec.env,
        labels=spec.labels,
        network=spec.network,
        network_allow=spec.network_allow,
        driver=spec.driver,
        workdir=spec.workdir,
        on_timeout=spec.on_timeout,
        idle_timeout_s=spec.idle_timeout_s,
        volumes=[pb.VolumeMount(name=v.name, mount_path=v.mount_path, read_only=v.read_only) for v in spec.volumes],
    )


def info_to_pb(sandbox) -> pb.SandboxInfo:  # sandbox: ManagedSandbox
    return pb.SandboxInfo(
        id=sandbox.sandbox_id,
        spec=spec_to_pb(sandbox.spec),
        state=sandbox.state,
        created_at=sandbox.created_at,
        expires_at=sandbox.expires_at,
        driver=sandbox.driver_name,
        accel=getattr(sandbox.handle, "accel", "") or "",
        timings_ms=sandbox.timings_ms,
        image_digest=sandbox.image.digest,
        start_command=sandbox.image.config.start_command,
    )


def pool_config_from_pb(message: pb.ResizePoolRequest) -> PoolConfig:
    shape, r = message.shape, message.shape.resources
    try:
        return PoolConfig(image=shape.image, substrate=shape.substrate or "container", driver=shape.driver,
                          cpu=r.cpu, memory_mb=r.memory_mb, pids=r.pids, disk_mb=r.disk_mb,
                          network_allow=list(shape.network_allow), size=message.size, max_size=message.max_size)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidSpec(f"invalid pool: {problems}") from None


def pool_to_pb(pool) -> pb.PoolInfo:  # pool: dsec.server.pools.Pool
    spec = pool.spec
    return pb.PoolInfo(
        shape=pb.PoolShape(image=pool.config.image, substrate=spec.substrate, driver=pool.key.driver,
                           resources=pb.Resources(**spec.resources.model_dump()), network_allow=spec.network_allow),
        size=pool.size, ready=len(pool.ready), filling=pool.filling, claims=pool.claims, misses=pool.misses,
        last_error=pool.last_error, image_digest=pool.key.digest, max_size=pool.max_size,
        target=pool.target(time.monotonic()),
    )  # fmt: skip

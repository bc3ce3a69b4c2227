"""Public pydantic models: what users pass to and get from the SDK, validated before any RPC."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dsec.allowlist import parse_allowlist

# Which substrate names exist is the substrate registry's to say (dsec/substrates/registry.py, a layer above this
# one): importing the registry installs its check here, so the server (and any process that loaded the plug-ins)
# answers a typo with the registered list. A process without it (the SDK of a client-only install) accepts any
# non-empty name and leaves the check to the server, which runs it when the spec arrives (dsec/wire.py).
_substrate_check: Callable[[str], None] | None = None


def check_substrates_with(check: Callable[[str], None]) -> None:
    """Install the registry's check: `check(name)` raises ValueError (listing the registered names) for an unknown one."""
    global _substrate_check
    _substrate_check = check


def _registered_substrate(name: str) -> str:
    if not name:
        raise ValueError("substrate must be named")
    if _substrate_check is not None:
        _substrate_check(name)
    return name


# A substrate is a plug-in: the names are whatever is registered, checked at validation (see above).
Substrate = Annotated[
    str,
    AfterValidator(_registered_substrate),
    Field(description="a registered substrate: built in are function, container, microvm and vm"),
]

# What a pause keeps (docs/lifecycle.md): freeze = processes stopped in place, RAM held; memory = processes and
# memory written to disk (CRIU / QEMU migrate to file), no CPU and no RAM held; files = files only, processes end.
PauseKind = Literal["freeze", "memory", "files"]
PAUSE_KINDS: tuple[str, ...] = ("freeze", "memory", "files")


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu: float = Field(1.0, gt=0, le=256, description="CPU cores (CFS quota)")
    memory_mb: int = Field(512, ge=16, le=1 << 20)
    pids: int = Field(256, ge=8, le=1 << 22)
    disk_mb: int = Field(1024, ge=1, le=1 << 24, description="writable layer budget")


class VolumeMount(BaseModel):
    """A named volume (`client.volumes`) mounted into the sandbox at `mount_path`: read-write in one sandbox at a
    time, or read-only in many."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    mount_path: str = Field(min_length=2, max_length=512)
    read_only: bool = False

    @field_validator("mount_path")
    @classmethod
    def _path(cls, path: str) -> str:
        parts = path.strip("/").split("/")
        if not path.startswith("/") or "\0" in path or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"mount_path must be a normalised absolute path other than /: {path!r}")
        return "/" + "/".join(parts)


class ReadyProbe(BaseModel):
    """When a sandbox counts as ready (docs/lifecycle.md, templates): `command` exits 0 inside it, or something
    accepts TCP connections on `tcp_port` on its loopback. Tried every `interval_s` until `timeout_s` has passed;
    a create returns only once it passes (Modal's lesson: started is not ready)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[str] = Field(default_factory=list, max_length=256)
    tcp_port: int = Field(0, ge=0, le=65535)
    interval_s: float = Field(0.2, gt=0, le=60)
    timeout_s: float = Field(60.0, gt=0, le=3600, description="deadline from the start command's start")

    @model_validator(mode="after")
    def _one_check(self) -> ReadyProbe:
        if bool(self.command) == bool(self.tcp_port):
            raise ValueError("a readiness probe is either a command or a tcp_port, exactly one of them")
        if self.command and not self.command[0]:
            raise ValueError("the probe command's argv[0] is empty")
        return self


TEMPLATE_NAME = r"^[a-z0-9][a-z0-9_.-]*$"


class SandboxSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field("busybox", min_length=1, max_length=512)
    substrate: Substrate = "container"
    resources: Resources = Field(default_factory=Resources)
    timeout_s: float = Field(3600.0, gt=0, le=7 * 24 * 3600, description="time to live")
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    network: bool = False
    network_allow: list[str] = Field(
        default_factory=list, description="egress allowlist: host-or-ipv4[:port] or ipv4-cidr[:port]; [] = none"
    )
    driver: str = ""
    workdir: str = ""
    on_timeout: Literal["destroy", "pause"] = Field(
        "destroy",
        description="when timeout_s expires: destroy, or pause (memory pause where the substrate can, else freeze; "
        "kept paused for the server's paused_ttl_s)",
    )
    auto_resume: bool = Field(
        False, description="a call (exec, files, session, process) on the paused sandbox resumes it first; off: the "
        "call fails with SandboxStateError, as E2B's default",
    )
    idle_timeout_s: float = Field(
        0.0, ge=0, le=7 * 24 * 3600, description="end the sandbox (reason idle) after this long without a call; 0 = never"
    )
    volumes: list[VolumeMount] = Field(default_factory=list, max_length=16)
    template: str = Field(
        "", max_length=63, pattern=r"^([a-z0-9][a-z0-9_.-]*)?$",
        description="start from this ready template's snapshot (its image, substrate, driver and resources win)",
    )
    ready: ReadyProbe | None = Field(
        None, description="return from create only once this passes (after the image's start command, if any)"
    )

    @field_validator("volumes")
    @classmethod
    def _distinct_volumes(cls, volumes: list[VolumeMount]) -> list[VolumeMount]:
        if len({v.name for v in volumes}) != len(volumes) or len({v.mount_path for v in volumes}) != len(volumes):
            raise ValueError("each volume and each mount_path may appear once")
        return volumes

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"invalid environment variable name or value: {key!r}")
        return env

    @field_validator("network_allow")
    @classmethod
    def _allowlist(cls, entries: list[str], info: ValidationInfo) -> list[str]:
        if entries and info.data.get("network"):
            raise ValueError("network=True gives the host network; an egress allowlist needs network=False")
        parse_allowlist(entries)
        return entries


class ExecResult(BaseModel):
    """Outcome of one command: output (possibly truncated) and how it ended."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0
    signal: int = 0
    timed_out: bool = False
    oom_killed: bool = False
    duration_s: float = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.oom_killed

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")


class FileEntry(BaseModel):
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int = 0
    mode: int = 0
    mtime: float = 0.0


class FileInfo(FileEntry):
    """A FileEntry plus ownership and link target: what E2B-style stat/list calls report."""

    uid: int = 0
    gid: int = 0
    symlink_target: str = ""


class TemplateInfo(BaseModel):
    """A ready template (client.templates): an image started once, waited on until its probe passed, and
    snapshotted; creates with `template=name` start from that snapshot."""

    name: str
    image: str  # the reference it was built from
    image_digest: str
    substrate: Substrate
    driver: str
    resources: Resources
    start: list[str]  # the start command ([] = none)
    ready: ReadyProbe | None
    snapshot_id: str
    snapshot_kind: str  # "memory+disk": sandboxes resume with the service running; else the start command re-runs
    created_at: float
    build_ms: float


class CollectedSnapshot(BaseModel):
    """One snapshot a GC pass removed, and why (expired | over_count | over_bytes | fork_leftover)."""

    snapshot_id: str
    reason: str
    size_bytes: int = 0


class PushedSnapshot(BaseModel):
    """A snapshot pushed to a registry as an OCI artifact (docs/lifecycle.md "Portable snapshots")."""

    digest: str = Field(description="the artifact manifest's digest: pull host/repo@digest to pin it")
    image_digest: str = Field("", description="the base image, pushed to the same repository by digest")
    blobs_uploaded: int = Field(0, description="chunks and config sent by this push")
    blobs_present: int = Field(0, description="chunks the registry already had: not sent again")
    bytes_uploaded: int = 0


# -- what the server reports back: the SDK returns these (converted from the wire by dsec/wire.py) -----------
# State, kind and substrate fields stay `str` here: a newer server may report a value this client does not know
# (e.g. the gateway's `lost`), and an old client must still read the rest of the record.


class SandboxInfo(BaseModel):
    """A sandbox as the server reports it (create, connect, list, pause/resume, restore, fork)."""

    id: str
    spec: SandboxSpec
    state: str = Field(description="running | paused | destroyed | lost")
    created_at: float = 0.0
    expires_at: float = 0.0
    driver: str = Field("", description="the driver actually used")
    accel: str = Field("", description="VM acceleration actually used (kvm | tcg), '' for others")
    timings_ms: dict[str, float] = Field(default_factory=dict, description="create phases, for benchmarks")
    image_digest: str = ""
    start_command: list[str] = Field(default_factory=list, description="the image's service start command")


class SnapshotInfo(BaseModel):
    snapshot_id: str
    sandbox_id: str
    created_at: float = 0.0
    kind: str = ""
    name: str = ""
    size_bytes: int = 0
    expires_at: float = Field(0.0, description="when the snapshot GC removes it; 0 = no ttl")
    pinned: bool = Field(False, description="a template uses it: never collected, delete is refused")


class SandboxMetrics(BaseModel):
    """Resource use of one sandbox now; CPU % is since the previous sample (or the create)."""

    sampled_at: float = 0.0
    cpu_count: int = 0
    cpu_used_pct: float = 0.0
    mem_used_bytes: int = 0
    mem_total_bytes: int = 0
    mem_cache_bytes: int = 0
    disk_used_bytes: int = 0
    disk_total_bytes: int = 0


class SandboxLogEntry(BaseModel):
    logged_at: float = 0.0
    level: str = "info"
    message: str = ""
    fields: dict[str, str] = Field(default_factory=dict)


class PoolInfo(BaseModel):
    """A warm pool: its shape (flattened) and how it is doing."""

    image: str
    substrate: str
    driver: str = ""
    cpu: float = 0.0
    memory_mb: int = 0
    pids: int = 0
    disk_mb: int = 0
    network_allow: list[str] = Field(default_factory=list, description="the egress allowlist its sandboxes get")
    size: int = Field(0, description="ready sandboxes the server keeps")
    ready: int = 0
    filling: int = Field(0, description="being created now")
    claims: int = Field(0, description="creates served from the pool")
    misses: int = Field(0, description="creates of this shape that found it empty")
    last_error: str = Field("", description="why the last refill failed")
    image_digest: str = ""
    max_size: int = Field(0, description="> size: follows recent demand up to this")
    target: int = Field(0, description="ready sandboxes it aims for now")


class VolumeInfo(BaseModel):
    name: str
    size_mb: int = Field(0, description="the quota: writing past it is ENOSPC inside the sandbox")
    created_at: float = 0.0
    mode: str = Field("", description="'' (not mounted) | rw | ro")
    holders: list[str] = Field(default_factory=list, description="ids of the sandboxes it is mounted in now")


class ImageLayer(BaseModel):
    blob_digest: str
    diff_id: str
    media_type: str = ""
    size_bytes: int = 0


class ImageConfig(BaseModel):
    env: list[str] = Field(default_factory=list)
    cmd: list[str] = Field(default_factory=list)
    entrypoint: list[str] = Field(default_factory=list)
    workdir: str = ""
    user: str = ""


class ImageInfo(BaseModel):
    digest: str
    tags: list[str] = Field(default_factory=list)
    config_digest: str = ""
    layers: list[ImageLayer] = Field(default_factory=list, description="bottom first")
    size_bytes: int = Field(0, description="manifest + config + layer blobs")
    created_at: float = 0.0
    last_used_at: float = 0.0
    config: ImageConfig = Field(default_factory=ImageConfig)
    holders: int = Field(0, description="sandboxes pinning it")


class BuildResult(BaseModel):
    image: ImageInfo
    steps_cached: int = 0
    steps_run: int = 0


class PruneResult(BaseModel):
    images_removed: list[str] = Field(default_factory=list)
    layers_removed: list[str] = Field(default_factory=list)
    bytes_freed: int = 0


class DiskUsage(BaseModel):
    images: int = 0
    layers: int = 0
    layer_bytes: int = 0
    blob_bytes: int = 0
    partial_bytes: int = 0
    held_images: int = 0


class PathInfo(BaseModel):
    """What `files.stat`, `list_tree`, `make_dir` and `rename` report about one path in the sandbox."""

    model_config = ConfigDict(frozen=True)  # hashable, as the dataclass it replaced was

    name: str
    path: str
    type: str = Field(description="file | dir | symlink | other")
    size: int = 0
    mode: int = 0
    mtime: float = 0.0
    owner: str = ""
    group: str = ""
    symlink_target: str = ""


class FsChange(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: str = Field(description="create | write | remove | rename | chmod")
    name: str = Field(description="relative to the watched directory")


class ProcessInfo(BaseModel):
    pid: int
    tag: str = ""
    argv: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="what the caller passed")
    cwd: str = ""
    pty: bool = False


class TrajectorySnapshot(BaseModel):
    after_step: int
    snapshot_id: str


class TrajectoryInfo(BaseModel):
    trajectory_id: str
    parent_id: str = Field("", description="set for a fork: steps [0, fork_step) are the parent's")
    fork_step: int = 0
    sandbox_id: str = Field("", description="the sandbox the trajectory last ran in")
    created_at: float = 0.0
    updated_at: float = 0.0
    steps: int = 0
    done_steps: int = 0
    snapshots: list[TrajectorySnapshot] = Field(default_factory=list)


class LoggedStep(BaseModel):
    step: int
    kind: str = Field(description="exec | session | write_file | upload | call")
    request_hash: str = ""
    sandbox_id: str = ""
    state: str = Field(description="done | intent | abandoned")
    started_at: float = 0.0
    finished_at: float = 0.0
    result: bytes = Field(b"", description="the serialized result the caller got (ExecRecord, CallResponse, ...)")
    stored_in: str = ""
    error: str = ""

"""Public pydantic models: what users pass to and get from the SDK, validated before any RPC."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dsec.allowlist import parse_allowlist

Substrate = Literal["function", "container", "microvm", "vm"]
SUBSTRATES: tuple[str, ...] = ("function", "container", "microvm", "vm")


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
        "destroy", description="when timeout_s expires: destroy, or pause (kept paused for the server's paused_ttl_s)"
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

"""Server configuration (pydantic), read from environment variables and/or a YAML/TOML file.

Every path the server touches hangs off `home` so one directory holds the image store, the per-server
state used for crash cleanup, compiled helpers and the trajectory log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dsec.models import Resources, Substrate


def default_home() -> Path:
    env = os.environ.get("DSEC_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/dsec")
    return Path.home() / ".local" / "share" / "dsec"


class PoolConfig(BaseModel):
    """One warm pool: `size` ready sandboxes of one (image, substrate, driver, resources) shape (docs/lifecycle.md).
    Resources left at 0 take the server's defaults, as a create's do, so a plain `client.create(image)` matches."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(min_length=1, max_length=512)
    substrate: Substrate = "container"
    driver: str = ""
    cpu: float = Field(0.0, ge=0, le=256)
    memory_mb: int = Field(0, ge=0, le=1 << 20)
    pids: int = Field(0, ge=0, le=1 << 22)
    disk_mb: int = Field(0, ge=0, le=1 << 24)
    network_allow: list[str] = Field(default_factory=list)  # built in at create, so part of the shape
    size: int = Field(ge=0, le=1024)
    max_size: int = Field(0, ge=0, le=1024)  # > size: keep up to this many when recent creates ask for them


def parse_pool(text: str) -> PoolConfig:
    """`--pool image=busybox,substrate=container,size=4[,driver=crun,cpu=1,memory_mb=256,pids=..,disk_mb=..,
    network_allow=0.0.0.0/0 pypi.org:443]` (allowlist entries separated by spaces)."""
    fields: dict[str, object] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"pool {text!r}: expected comma-separated key=value pairs, got {part!r}")
        fields[key.strip()] = value.strip().split() if key.strip() == "network_allow" else value.strip()
    return PoolConfig.model_validate(fields)


class ServerConfig(BaseModel):
    home: Path = Field(default_factory=default_home)
    listen: str = "127.0.0.1:0"
    container_driver: str = Field(default_factory=lambda: os.environ.get("DSEC_CONTAINER_DRIVER", "crun"))
    default_resources: Resources = Field(default_factory=Resources)
    default_timeout_s: float = 3600.0
    paused_ttl_s: float = 86400.0  # a sandbox with on_timeout=pause stays paused this long after its timeout, then goes
    # A sandbox that ended stays answerable (SandboxExpired with its reason) this long, at most `max_tombstones` of them
    tombstone_ttl_s: float = 3600.0
    max_tombstones: int = 4096
    # Warm pools (docs/lifecycle.md), refilled by one background thread at most this many sandboxes a second
    pools: list[PoolConfig] = Field(default_factory=list)
    pool_refill_per_s: float = Field(8.0, gt=0)
    # A server started after a crash re-attaches the healthy sandboxes dead servers left (docs/lifecycle.md);
    # off (DSEC_READOPT=0, `dsec serve --no-readopt`) = reap them all, as before
    readopt: bool = Field(default_factory=lambda: os.environ.get("DSEC_READOPT", "1") != "0")
    # Snapshot GC (docs/lifecycle.md): a pass every interval (0 = only on demand) removes expired snapshots, and of
    # the snapshots of sandboxes that are gone keeps per tenant the newest `snapshot_keep` within `snapshot_max_bytes`
    snapshot_gc_interval_s: float = Field(600.0, ge=0)
    snapshot_keep: int = Field(64, ge=0)
    snapshot_max_bytes: int = Field(16 << 30, ge=0)
    max_output_bytes: int = 16 << 20
    max_sandboxes: int = 1024
    workers: int = 64
    trajectory_dsn: str = Field(default_factory=lambda: os.environ.get("DSEC_TRAJECTORY_DSN", ""))  # "" = file log
    parent_pid: int = 0  # embedded mode: exit when this process dies
    # Admission control: creates run at most this many at a time; more wait in a bounded queue.
    max_concurrent_creates: int = 4
    create_queue_limit: int = 48  # waiting creates hold RPC threads: keep this well under `workers`
    tenant_max_sandboxes: int = 0  # 0 = no per-tenant quota
    # Auth: {token: tenant} from a YAML file and/or DSEC_TOKENS="tok:tenant,…"; none = open server.
    tokens_file: Path | None = None
    tokens: str = Field(default_factory=lambda: os.environ.get("DSEC_TOKENS", ""))
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set → mutual TLS
    metrics_listen: str = ""  # e.g. "127.0.0.1:9464"; "" = no metrics endpoint
    http_listen: str = ""  # e.g. "127.0.0.1:3000": the E2B/SandboxFusion HTTP front door (docs/compat.md); "" = off
    # Image layers as overlay lower dirs: extracted directories, or loop-mounted erofs images (docs/images.md).
    layer_format: Literal["dir", "erofs"] = Field(
        default_factory=lambda: os.environ.get("DSEC_LAYER_FORMAT", "dir"), validate_default=True
    )

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def volumes_dir(self) -> Path:
        """Named volumes (dsec/server/volumes.py): never swept, they outlive sandboxes and servers."""
        return self.home / "volumes"

    @property
    def templates_dir(self) -> Path:
        """Ready templates' index (dsec/server/templates.py); their snapshots live with the others."""
        return self.home / "templates"

    @property
    def run_root(self) -> Path:
        return self.home / "run"

    @property
    def bin_dir(self) -> Path:
        return self.home / "bin"

    @property
    def trajectory_dir(self) -> Path:
        return self.home / "trajectories"

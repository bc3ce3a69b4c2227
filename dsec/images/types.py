"""The image store's value types: an image record and its layers, its runtime config, and its resolved read-only
layers (what the store hands a driver).

Defined in images/ (which produces them) rather than the driver protocol, so the store needs nothing from the
substrate layer above it; `dsec.substrates.base` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an OCI image config."""

    env: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = ""
    start_command: list[str] = field(default_factory=list)  # OCI label dev.dsec.start-command (docs/ports.md)


@dataclass(frozen=True)
class ImageRootfs:
    """An image resolved by the layer store: read-only extracted layers, top-most first (overlay order)."""

    reference: str
    digest: str
    lower_dirs: list[Path]
    config: ImageConfig


@dataclass(frozen=True)
class LayerInfo:
    """One layer as the store keeps it: its blob (as shipped, maybe gzip) and its uncompressed diff_id."""

    blob_digest: str
    diff_id: str
    media_type: str
    size: int  # blob bytes


@dataclass(frozen=True)
class ImageRecord:
    """One image in the store: its manifest digest, tags, layers (bottom first) and runtime config."""

    digest: str
    tags: list[str]
    config_digest: str
    layers: list[LayerInfo]
    size: int
    created: float
    last_used: float
    config: ImageConfig
    holders: int = 0

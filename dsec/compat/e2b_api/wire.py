"""E2B's REST wire shapes (the `e2b` SDK's generated models, e2b/api/client/models) built from dsec's protobufs.

Kept apart from the routes so the mapping — what an E2B field means in dsec — reads in one place:
template ↔ image (label `e2b.template` keeps the name the caller used), metadata ↔ labels (the door's own
labels start with `e2b.` and are never shown as metadata), timeout ↔ expires_at, envd access token ↔ label.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dsec.compat.context import DOOR_CREATED_LABEL, ENVD_TOKEN_LABEL
from dsec.v1 import sandbox_pb2 as pb

ENVD_VERSION = "0.6.4"  # the envd API the door's envd app speaks (dsec/compat/envd); gates SDK features
CLIENT_ID = "dsec"
LABEL_PREFIX = "e2b."
LABEL_TEMPLATE = DOOR_CREATED_LABEL
LABEL_ENVD_TOKEN = ENVD_TOKEN_LABEL
LABEL_INTERNET = "e2b.internet"
SUBSTRATE_METADATA_KEY = "dsec.substrate"  # metadata that picks the substrate (default container); docs/compat.md
DEFAULT_TIMEOUT_S = 15  # E2B's API default when the request has no timeout (the SDK sends 300)
MAX_TIMEOUT_S = 86_400
MAX_PAGE = 100


class _Body(BaseModel):
    """Unknown fields are ignored (newer SDKs add some); known ones are type-checked strictly."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NetworkBody(_Body):
    allowPublicTraffic: bool | None = None
    allowOut: list[str] | None = None
    denyOut: list[str] | None = None
    dnsServers: list[str] | None = None
    egressProxy: Any = None
    maskRequestHost: str | None = None
    httpsPorts: list[int] | None = None
    rules: Any = None


class NewSandboxBody(_Body):
    templateID: str = Field(min_length=1, max_length=512)
    timeout: int | None = Field(default=None, ge=0, le=MAX_TIMEOUT_S)
    autoPause: bool | None = None
    autoPauseMemory: bool | None = None
    autoResume: Any = None
    allow_internet_access: bool | None = None
    secure: bool | None = None
    network: NetworkBody | None = None
    metadata: dict[str, str] | None = None
    envVars: dict[str, str] | None = None
    mcp: Any = None
    iam: Any = None
    volumeMounts: list[Any] | None = None


class TimeoutBody(_Body):
    timeout: int = Field(ge=0, le=MAX_TIMEOUT_S)


class RefreshBody(_Body):
    duration: int | None = Field(default=None, ge=0, le=3600)


class ConnectBody(_Body):
    timeout: int | None = Field(default=None, ge=0, le=MAX_TIMEOUT_S)
    memory: bool | None = None


class ResumeBody(_Body):
    timeout: int | None = Field(default=None, ge=0, le=MAX_TIMEOUT_S)
    autoPause: bool | None = None
    memory: bool | None = None


class PauseBody(_Body):
    memory: bool | None = None
    requireHealthyGuest: bool | None = None


class SnapshotBody(_Body):
    name: str | None = Field(default=None, max_length=256)
    memory: bool | None = None


class ForkBody(_Body):
    timeout: int | None = Field(default=None, ge=0, le=MAX_TIMEOUT_S)
    count: int | None = Field(default=None, ge=1, le=20)


def iso(ts: float) -> str:
    """RFC 3339 with a Z, as the SDK's isoparse expects."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def metadata_of(info: pb.SandboxInfo) -> dict[str, str]:
    return {k: v for k, v in info.spec.labels.items() if not k.startswith(LABEL_PREFIX)}


def template_of(info: pb.SandboxInfo) -> str:
    return info.spec.labels.get(LABEL_TEMPLATE) or info.spec.image


def state_of(info: pb.SandboxInfo) -> str:
    return "paused" if info.state == "paused" else "running"


def _resources(info: pb.SandboxInfo) -> dict[str, int]:
    res = info.spec.resources
    return {
        "cpuCount": max(1, int(round(res.cpu))) if res.cpu else 1,
        "memoryMB": int(res.memory_mb),
        "diskSizeMB": int(res.disk_mb),
    }


def created(info: pb.SandboxInfo) -> dict[str, Any]:
    """`Sandbox` (create, connect, resume, fork): what the SDK needs to reach envd."""
    body: dict[str, Any] = {
        "templateID": template_of(info),
        "sandboxID": info.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
    }
    token = info.spec.labels.get(LABEL_ENVD_TOKEN)
    if token:
        body["envdAccessToken"] = token
    return body


def listed(info: pb.SandboxInfo) -> dict[str, Any]:
    """`ListedSandbox` (GET /v2/sandboxes)."""
    return {
        "templateID": template_of(info),
        "sandboxID": info.id,
        "clientID": CLIENT_ID,
        "startedAt": iso(info.created_at),
        "endAt": iso(info.expires_at),
        **_resources(info),
        "state": state_of(info),
        "envdVersion": ENVD_VERSION,
        "metadata": metadata_of(info),
    }


def detail(info: pb.SandboxInfo) -> dict[str, Any]:
    """`SandboxDetail` (GET /sandboxes/{id})."""
    body = listed(info)
    token = info.spec.labels.get(LABEL_ENVD_TOKEN)
    if token:
        body["envdAccessToken"] = token
    internet = info.spec.labels.get(LABEL_INTERNET)
    if internet:
        body["allowInternetAccess"] = internet == "1"
    body["lifecycle"] = {"autoResume": info.spec.auto_resume, "onTimeout": "pause" if info.spec.on_timeout == "pause" else "kill"}
    return body


def snapshot_info(ref: pb.SnapshotRef) -> dict[str, Any]:
    """`SnapshotInfo`: the id is what `Sandbox.create(template=...)` takes back."""
    return {"snapshotID": ref.snapshot_id, "names": [ref.name] if ref.name else []}


def encode_cursor(created_at: float, item_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{item_id}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[float, str] | None:
    """None for a token this server did not issue (the route answers 400)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created_at, _, item_id = raw.partition("|")
        return float(created_at), item_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None

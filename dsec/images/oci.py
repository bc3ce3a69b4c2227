"""OCI image-spec documents: parse manifests/configs we receive, build the ones we write.

Only the fields dsec uses are interpreted; everything else in a config is kept verbatim so an image
round-trips through the store unchanged (same digests out as in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dsec.errors import InvalidSpec
from dsec.images.digest import check_digest
from dsec.images.types import ImageConfig

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES = (MT_MANIFEST, MT_DOCKER_MANIFEST)
INDEX_TYPES = (MT_INDEX, MT_DOCKER_LIST)
LAYER_TYPES = (MT_LAYER, MT_LAYER_GZIP, MT_DOCKER_LAYER, MT_DOCKER_LAYER_GZIP)
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_DOC_BYTES = 4 << 20  # manifests and configs are small JSON; refuse anything bigger


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    @classmethod
    def from_json(cls, obj: Any, what: str) -> "Descriptor":
        if not isinstance(obj, dict):
            raise InvalidSpec(f"{what}: descriptor is not an object")
        size = obj.get("size")
        if not isinstance(size, int) or size < 0:
            raise InvalidSpec(f"{what}: descriptor has no valid size")
        return cls(str(obj.get("mediaType", "")), check_digest(obj.get("digest", "")), size)


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]


def load_json(data: bytes, what: str) -> Any:
    if len(data) > MAX_DOC_BYTES:
        raise InvalidSpec(f"{what} is {len(data)} bytes (limit {MAX_DOC_BYTES}): rejected")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidSpec(f"{what} is not valid JSON: {exc}") from exc


def parse_manifest(data: bytes) -> Manifest:
    doc = load_json(data, "image manifest")
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise InvalidSpec("image manifest: only schemaVersion 2 manifests are supported")
    media_type = doc.get("mediaType", MT_MANIFEST)
    if media_type not in MANIFEST_TYPES:
        raise InvalidSpec(f"image manifest: unsupported media type {media_type!r}")
    layers = [Descriptor.from_json(layer, "image manifest layer") for layer in doc.get("layers") or []]
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise InvalidSpec(f"image manifest: unsupported layer media type {layer.media_type!r} (tar or tar+gzip only)")
    return Manifest(Descriptor.from_json(doc.get("config"), "image manifest config"), layers)


def diff_ids(config: dict[str, Any]) -> list[str]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise InvalidSpec("image config has no rootfs.diff_ids")
    return [check_digest(d) for d in ids]


def image_config(config: dict[str, Any]) -> ImageConfig:
    """The runtime part drivers need (env, cmd, entrypoint, workdir, user) and a template's start command."""
    inner = config.get("config") or {}
    return ImageConfig(
        env=list(inner.get("Env") or []),
        cmd=list(inner.get("Cmd") or []),
        entrypoint=list(inner.get("Entrypoint") or []),
        workdir=inner.get("WorkingDir") or "/",
        user=inner.get("User") or "",
        start_command=start_command(inner.get("Labels")),
    )


START_COMMAND_LABEL = "dev.dsec.start-command"


def start_command(labels: Any) -> list[str]:
    """The argv in the label `dev.dsec.start-command` (a JSON list of strings), or [] when absent or malformed.

    Why a label and not ENTRYPOINT: an image's ENTRYPOINT usually runs its service in the foreground forever;
    a start command must daemonize the service and exit once it is ready, which only an image built for it does.
    """
    text = labels.get(START_COMMAND_LABEL) if isinstance(labels, dict) else None
    try:
        argv = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return []
    return argv if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv) else []


def dumps(doc: Any) -> bytes:
    """Canonical JSON for documents we create (stable bytes → stable digests across runs)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def build_manifest(config: Descriptor, layers: list[Descriptor]) -> bytes:
    return dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
    )


def build_index(manifest: Descriptor, ref_name: str | None) -> bytes:
    desc = manifest.to_json()
    if ref_name:
        desc["annotations"] = {REF_NAME_ANNOTATION: ref_name}
    return dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [desc]})


def oci_layer_type(compressed: bool) -> str:
    return MT_LAYER_GZIP if compressed else MT_LAYER

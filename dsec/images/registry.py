"""Pull from and push to an OCI distribution registry (the /v2/ HTTP API), lazily and resumably.

Why this shape: a pull only fetches the manifest and config; each layer is fetched on first use (the first
`resolve` that needs it), under the store's per-layer lock, so 50 concurrent creates on a cold node download a
layer once. Downloads stream to `partial/<hex>` (never a whole layer in memory) and resume with an HTTP Range
request after an interruption; the digest is verified by the same pass that extracts the layer, and a
mismatch deletes the partial file, so a bad download is never cached.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from dsec.errors import ImageNotFound, InvalidSpec, RuntimeFailure
from dsec.images import oci
from dsec.images.digest import CHUNK, check_digest, hex_of, sha256_bytes
from dsec.images.blobs import disk_errors
from dsec.images.types import ImageRecord, LayerInfo

if TYPE_CHECKING:  # the store calls fetch_layer for lazy layers: a runtime import would be a cycle
    from dsec.images.store import LayerStore

ACCEPT = ", ".join([oci.MT_MANIFEST, oci.MT_INDEX, oci.MT_DOCKER_MANIFEST, oci.MT_DOCKER_LIST])
TIMEOUT_S = 60.0
SOURCE_PREFIX = "registry:"
_REF_RE = re.compile(r"^(?P<host>[A-Za-z0-9.-]+(?::\d+)?)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class RemoteRef:
    """`host[:port]/repo[:tag][@digest]`; plain HTTP for loopback registries, HTTPS otherwise."""

    host: str
    repo: str
    tag: str
    digest: str | None

    @classmethod
    def parse(cls, ref: str) -> "RemoteRef":
        match = _REF_RE.match(ref or "")
        if not match:
            raise InvalidSpec(f"invalid registry reference {ref!r}: expected host[:port]/repository[:tag][@sha256:…]")
        return cls(match["host"], match["repo"], match["tag"] or "latest", match["digest"])

    @property
    def manifest_ref(self) -> str:
        return self.digest or self.tag

    def __str__(self) -> str:
        return f"{self.host}/{self.repo}:{self.tag}" + (f"@{self.digest}" if self.digest else "")


class RegistryClient:
    """Minimal /v2/ client on http.client: streaming bodies both ways, Range requests, no redirects to follow."""

    def __init__(self, host: str) -> None:
        self.host = host
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host
        self.secure = hostname not in _LOOPBACK

    def _conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.secure else http.client.HTTPConnection
        return cls(self.host, timeout=TIMEOUT_S)

    @contextlib.contextmanager
    def request(self, method: str, path: str, body: BinaryIO | bytes | None = None, headers: dict[str, str] | None = None,
                ok: tuple[int, ...] = (200,)) -> Iterator[http.client.HTTPResponse]:
        conn = self._conn()
        try:
            try:
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise RuntimeFailure(f"registry {self.host} unreachable ({method} {path}): {exc}") from exc
            if resp.status not in ok:
                detail = resp.read(4096).decode("utf-8", "replace")
                if resp.status == 404:
                    raise ImageNotFound(f"registry {self.host}: {path} not found: {detail.strip()}")
                raise RuntimeFailure(f"registry {self.host}: {method} {path} → HTTP {resp.status}: {detail.strip()}")
            yield resp
        finally:
            conn.close()

    def get_small(self, path: str, accept: str = "") -> tuple[bytes, str]:
        with self.request("GET", path, headers={"Accept": accept} if accept else None) as resp:
            data = resp.read(oci.MAX_DOC_BYTES + 1)
            if len(data) > oci.MAX_DOC_BYTES:
                raise InvalidSpec(f"registry {self.host}: {path} is larger than {oci.MAX_DOC_BYTES} bytes: rejected")
            return data, resp.getheader("Content-Type", "")


def _choose_platform(client: RegistryClient, remote: RemoteRef, index: dict) -> tuple[bytes, str]:
    for entry in index.get("manifests") or []:
        platform = entry.get("platform") or {}
        if platform.get("os", "linux") == "linux" and platform.get("architecture", "amd64") == "amd64":
            digest = check_digest(entry.get("digest", ""))
            data, _ = client.get_small(f"/v2/{remote.repo}/manifests/{digest}", ACCEPT)
            if sha256_bytes(data) != digest:
                raise InvalidSpec(f"registry {remote.host}: manifest {digest} does not match its digest: rejected")
            return data, digest
    raise ImageNotFound(f"{remote} has no linux/amd64 image")


def pull(store: LayerStore, ref: str, tag: str | None = None, lazy: bool = True) -> ImageRecord:
    """Register `ref`'s manifest and config; layers come on first use (`lazy`) or now (`lazy=False`)."""
    remote = RemoteRef.parse(ref)
    client = RegistryClient(remote.host)
    data, _ = client.get_small(f"/v2/{remote.repo}/manifests/{remote.manifest_ref}", ACCEPT)
    doc = oci.load_json(data, "registry manifest")
    if remote.digest and sha256_bytes(data) != remote.digest:
        raise InvalidSpec(f"registry {remote.host}: manifest for {remote} does not match the requested digest: rejected")
    if isinstance(doc, dict) and doc.get("mediaType") in oci.INDEX_TYPES:
        data, _ = _choose_platform(client, remote, doc)
    manifest = oci.parse_manifest(data)
    config, _ = client.get_small(f"/v2/{remote.repo}/blobs/{manifest.config.digest}")
    if sha256_bytes(config) != manifest.config.digest:
        raise InvalidSpec(f"registry {remote.host}: config blob {manifest.config.digest} failed verification: rejected")
    with store.lock("gc", shared=True):
        record = store.add_image(data, config, [tag or f"{remote.host}/{remote.repo}:{remote.tag}"],
                                 source=f"{SOURCE_PREFIX}{remote.host}/{remote.repo}")
        if not lazy:
            for layer in record.layers:
                fetch_layer(store, record, layer)
    return record


def _source(store: LayerStore, record: ImageRecord) -> tuple[RegistryClient, str]:
    source = store.source_of(record.digest)
    if not source.startswith(SOURCE_PREFIX):
        raise ImageNotFound(f"image {record.digest} lacks layers and was not pulled from a registry: re-import it")
    host, _, repo = source[len(SOURCE_PREFIX):].partition("/")
    return RegistryClient(host), repo


def partial_path(store: LayerStore, digest: str) -> Path:
    path = store.root / "partial"
    path.mkdir(exist_ok=True)
    return path / hex_of(digest)


def download_blob(client: RegistryClient, repo: str, desc_digest: str, size: int, dest: Path) -> int:
    """Stream a blob into `dest`, resuming from its current length with a Range request; returns bytes fetched."""
    have = dest.stat().st_size if dest.exists() else 0
    if have > size:
        dest.unlink()
        have = 0
    if have == size:
        return 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.request("GET", f"/v2/{repo}/blobs/{desc_digest}", headers=headers, ok=(200, 206)) as resp:
        if resp.status == 200 and have:  # the registry ignored the Range: start over
            have = 0
        fetched = 0
        with disk_errors(f"downloading {desc_digest}"), open(dest, "r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            while chunk := resp.read(CHUNK):
                fetched += len(chunk)
                if have + fetched > size:
                    raise InvalidSpec(f"blob {desc_digest} is longer than its declared {size} bytes: rejected")
                out.write(chunk)
    if have + fetched != size:
        raise RuntimeFailure(f"download of {desc_digest} ended at {have + fetched} of {size} bytes: retry to resume")
    return fetched


def fetch_layer(store: LayerStore, record: ImageRecord, layer: LayerInfo) -> LayerInfo:
    """Make `layer` of a pulled image present: downloaded (single-flight, resumable) and extracted once."""
    client, repo = _source(store, record)
    partial = partial_path(store, layer.blob_digest)

    @contextlib.contextmanager
    def opener() -> Iterator[BinaryIO]:
        download_blob(client, repo, layer.blob_digest, layer.size, partial)
        with open(partial, "rb") as fh:
            yield fh

    try:
        info = store.ensure_layer(layer.diff_id, layer.blob_digest, opener, limit=layer.size)
    except InvalidSpec:
        partial.unlink(missing_ok=True)  # a corrupt download is never resumed from
        raise
    partial.unlink(missing_ok=True)
    return info


def blob_exists(client: RegistryClient, repo: str, digest: str) -> bool:
    try:
        with client.request("HEAD", f"/v2/{repo}/blobs/{digest}"):
            return True
    except ImageNotFound:
        return False


def upload_blob(client: RegistryClient, repo: str, digest: str, path: Path) -> None:
    with client.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"}, ok=(202,)) as resp:
        location = resp.getheader("Location", "")
    parsed = urllib.parse.urlsplit(location)
    query = urllib.parse.parse_qsl(parsed.query) + [("digest", digest)]
    target = f"{parsed.path}?{urllib.parse.urlencode(query)}"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)}
    with open(path, "rb") as body, client.request("PUT", target, body=body, headers=headers, ok=(201,)):
        pass


def push(store: LayerStore, ref: str, dest: str) -> str:
    """Upload `ref`'s blobs (skipping those the registry has) and its manifest as `dest`; returns the digest."""
    record = store.inspect(ref)
    remote = RemoteRef.parse(dest)
    client = RegistryClient(remote.host)
    for digest in [*[layer.blob_digest for layer in record.layers], record.config_digest]:
        path = store.blob_path(digest)
        if not path.exists():
            raise ImageNotFound(f"blob {digest} of {ref!r} is not on this node (lazy layer never used): pull it fully first")
        if not blob_exists(client, remote.repo, digest):
            upload_blob(client, remote.repo, digest, path)
    manifest = store.read_blob(record.digest)
    media_type = json.loads(manifest).get("mediaType", oci.MT_MANIFEST)
    # `dest` with a digest (host/repo@sha256:…) stores the manifest untagged, by that digest
    with client.request("PUT", f"/v2/{remote.repo}/manifests/{remote.manifest_ref}", body=manifest,
                        headers={"Content-Type": media_type}, ok=(201,)) as resp:
        pushed = resp.getheader("Docker-Content-Digest", record.digest)
    if pushed != record.digest:
        raise RuntimeFailure(f"registry stored manifest {pushed}, expected {record.digest}")
    return record.digest


__all__ = ["RemoteRef", "blob_exists", "download_blob", "fetch_layer", "partial_path", "pull", "push", "upload_blob"]

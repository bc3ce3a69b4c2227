"""Get a layer-store image into the Docker Engine once per digest.

Why a merged import rather than one Docker layer per store layer: the store keeps layers as extracted overlay
directories (overlay whiteouts, not OCI `.wh.` files), so the one faithful view is the kernel's own overlay
merge. We mount it read-only inside a throw-away mount namespace (`unshare --mount`: the mount dies with the
`tar` that reads it, so a crash cannot leak it) and stream the tar straight into `POST /images/create`.
The result is tagged `dsec/<digest12>` and found by that tag next time, by this or any other server.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
from collections.abc import Iterator

import docker
import docker.errors

from dsec.errors import RuntimeFailure
from dsec.substrates.base import ImageRootfs

IMAGE_REPOSITORY = "dsec"
DIGEST_LABEL = "dsec.image.digest"
_CHUNK = 1 << 20

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def image_tag(image: ImageRootfs) -> str:
    """The Docker tag that holds `image`: `dsec:<12 hex digits of its digest>`."""
    return f"{IMAGE_REPOSITORY}:{image.digest.split(':')[-1][:12]}"


def _dockerfile_changes(image: ImageRootfs) -> list[str]:
    cfg = image.config
    changes = [f"ENV {key}={json.dumps(value)}" for key, _, value in (e.partition("=") for e in cfg.env if "=" in e)]
    if cfg.workdir:
        changes.append(f"WORKDIR {cfg.workdir}")
    if cfg.entrypoint:
        changes.append(f"ENTRYPOINT {json.dumps(cfg.entrypoint)}")
    if cfg.cmd:
        changes.append(f"CMD {json.dumps(cfg.cmd)}")
    changes.append(f"LABEL {DIGEST_LABEL}={json.dumps(image.digest)}")
    return changes


def _merged_tar_command(image: ImageRootfs) -> list[str]:
    """argv printing a tar of the image's merged root to stdout, leaving no mount behind."""
    dirs = [str(d) for d in image.lower_dirs]
    if not dirs:
        raise RuntimeFailure(f"image {image.reference} ({image.digest}) has no layers to import into Docker")
    tar = "tar --numeric-owner -C {} -cf - ."
    if len(dirs) == 1:
        return ["sh", "-c", tar.format(shlex.quote(dirs[0]))]
    script = (
        'm=$(mktemp -d) && mount -t overlay overlay -o "ro,lowerdir=$1" "$m" && '
        + tar.format('"$m"')
        + '; rc=$?; umount "$m"; rmdir "$m"; exit $rc'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "dsec-merge", ":".join(dirs)]


def _stream(proc: subprocess.Popen) -> Iterator[bytes]:
    assert proc.stdout is not None
    while chunk := proc.stdout.read(_CHUNK):
        yield chunk


def _forget(client: docker.DockerClient, tag: str) -> None:
    """Drop a half-imported image so the next create imports it again instead of using a truncated root."""
    try:
        client.images.remove(tag, force=True)
    except docker.errors.ImageNotFound:
        pass


def ensure_image(client: docker.DockerClient, image: ImageRootfs) -> str:
    """Import `image` unless the engine already has it; return its tag. One import per digest per process."""
    tag = image_tag(image)
    with _locks_guard:
        lock = _locks.setdefault(tag, threading.Lock())
    with lock:
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        proc = subprocess.Popen(
            _merged_tar_command(image), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        repository, _, version = tag.partition(":")
        try:
            reply = client.api.import_image_from_stream(
                _stream(proc), repository=repository, tag=version, changes=_dockerfile_changes(image)
            )
        except docker.errors.APIError as exc:
            proc.kill()
            raise RuntimeFailure(f"docker import of image {image.reference} ({image.digest}) failed: {exc}") from exc
        finally:
            stderr = proc.communicate()[1]
        if proc.returncode != 0:
            _forget(client, tag)
            raise RuntimeFailure(
                f"reading layers of image {image.reference} ({image.digest}) for docker import failed: "
                f"{stderr.decode(errors='replace').strip()}"
            )
        error = _stream_error(reply)
        if error:
            _forget(client, tag)
            raise RuntimeFailure(f"docker import of image {image.reference} ({image.digest}) failed: {error}")
        return tag


def _stream_error(reply: object) -> str:
    """The error of a JSON-lines progress reply from the engine ('' when it reports none)."""
    for line in str(reply).splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("error"):
            return str(message.get("error"))
    return ""

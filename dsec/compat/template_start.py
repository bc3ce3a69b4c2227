"""Run a template image's start command when the E2B door creates a sandbox from it.

Why: an E2B template may carry a start command (the code interpreter's kernel server on port 49999) that must
be serving before `Sandbox.create` returns. In dsec the image says so itself: an image whose config has an
ENTRYPOINT is a template with a service, and the door runs ENTRYPOINT + CMD once, in the new sandbox, and
waits for it to *exit 0*: the command daemonizes its service and returns only when it is ready (the
code-interpreter image's `kernel_server.py --daemon` does exactly that), so readiness is a protocol point, not
a sleep. Images without an ENTRYPOINT (busybox, python, base, most user images) start nothing.

dsec's own SDK does not run it: `Sandbox.create("code-interpreter")` is a plain sandbox until you run the
entrypoint yourself (docs/ports.md).
"""

from __future__ import annotations

import grpc

from dsec.compat.context import CompatContext
from dsec.v1 import image_pb2 as ipb
from dsec.v1 import image_pb2_grpc as ipb_grpc
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

START_TIMEOUT_S = 180.0
OUTPUT_TAIL = 2000
# image digest → start command: a digest names immutable content, so the answer never goes stale
_BY_DIGEST: dict[str, list[str]] = {}
_CACHE_LIMIT = 4096


class StartFailed(Exception):
    """The template's start command failed; the sandbox is useless and the door destroys it."""


async def start_command(ctx: CompatContext, api_key: str | None, info: pb.SandboxInfo) -> list[str]:
    """ENTRYPOINT + CMD of the sandbox's image, or [] when it has no ENTRYPOINT (or the backend has no
    image service, e.g. a cluster gateway: then templates start nothing)."""
    if info.image_digest in _BY_DIGEST:
        return _BY_DIGEST[info.image_digest]
    images = ctx.stub(ipb_grpc.ImageServiceStub, api_key)
    try:
        image = await images.Inspect(ipb.ImageRef(ref=info.image_digest or info.spec.image))
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
            return []
        raise
    argv = [*image.config.entrypoint, *image.config.cmd] if image.config.entrypoint else []
    if info.image_digest and len(_BY_DIGEST) < _CACHE_LIMIT:
        _BY_DIGEST[info.image_digest] = argv
    return argv


async def run_start_command(ctx: CompatContext, api_key: str | None, info: pb.SandboxInfo) -> None:
    """Run the template's start command to completion; StartFailed (sandbox destroyed) if it does not exit 0."""
    argv = await start_command(ctx, api_key, info)
    if not argv:
        return
    sandboxes = ctx.stub(pb_grpc.SandboxServiceStub, api_key)
    output, status = b"", None
    try:
        async for event in sandboxes.Exec(pb.ExecRequest(sandbox_id=info.id, argv=argv, timeout_s=START_TIMEOUT_S)):
            if event.HasField("status"):
                status = event.status
            else:
                output = (output + event.stdout + event.stderr)[-OUTPUT_TAIL:]
    except grpc.RpcError as exc:
        problem = f"{exc.code().name}: {exc.details()}"
    else:
        if status is not None and status.exit_code == 0 and not status.timed_out:
            return
        problem = "timed out" if status is not None and status.timed_out else f"exit code {status.exit_code if status else '?'}"
    try:
        await sandboxes.Destroy(pb.SandboxRef(sandbox_id=info.id))
    except grpc.RpcError:
        pass  # its TTL reaps it
    raise StartFailed(
        f"the start command of template image {info.spec.image!r} ({' '.join(argv)}) failed in sandbox {info.id}: "
        f"{problem}; output: {output.decode(errors='replace').strip() or '(none)'}"
    )

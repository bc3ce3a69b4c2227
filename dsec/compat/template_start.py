"""Run a template image's start command when the E2B door creates a sandbox from it.

Why: an E2B template may carry a start command (the code interpreter's kernel server on port 49999) that must
be serving before `Sandbox.create` returns. In dsec the image says so itself, in its config label
`dev.dsec.start-command` (a JSON argv; SandboxInfo.start_command carries it, so this works through a cluster
gateway too): the door runs it once, in the new sandbox, and waits for it to *exit 0*: the command daemonizes
its service and returns only when it is ready (the code-interpreter image's `kernel_server.py --daemon` does
exactly that), so readiness is a protocol point, not a sleep. Images without the label start nothing.

dsec's own SDK does not run it: `Sandbox.create("code-interpreter")` is a plain sandbox until you run the
entrypoint yourself (docs/ports.md).
"""

from __future__ import annotations

import grpc

from dsec.compat.context import CompatContext
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

START_TIMEOUT_S = 180.0
OUTPUT_TAIL = 2000


class StartFailed(Exception):
    """The template's start command failed; the sandbox is useless and the door destroys it."""


async def run_start_command(ctx: CompatContext, api_key: str | None, info: pb.SandboxInfo) -> None:
    """Run the template's start command to completion; StartFailed (sandbox destroyed) if it does not exit 0."""
    argv = list(info.start_command)
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

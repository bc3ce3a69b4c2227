"""SandboxFusion's HTTP API (`POST /run_code`, `POST /run_jupyter`, `GET /v1/ping`) on dsec, for the
`sandbox-fusion` client and verl's SandboxFusion tool and code reward: point their endpoint at the dsec front door.

Each call is three gRPC calls as the caller's tenant: Create a sandbox of the language's image (memory =
`memory_limit_MB`), one Exec of the runner (dsec/compat/fusion_runner.py) and Destroy. Status codes and bodies
follow SandboxFusion's FastAPI server: 422 with a `detail` list for a body that is not JSON or not a valid
request (an unknown language included), 200 with `status: SandboxError` when the call could not run (the
client raises on it), 200 with Success/Failed otherwise. With `trajectory_id` and `step` the exec carries that
step key, so the server logs the call once and a repeated call returns the logged response without running.
`run_jupyter` is the same path with a kernel driver as the program (dsec/compat/fusion_jupyter.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import Any, TypeVar

import grpc
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dsec.compat.context import STATE_API_KEY, CompatContext, error_name, grpc_code, grpc_message, http_status_for
from dsec.compat import fusion_jupyter
from dsec.compat.fusion_runner import (
    RESULT_CAP,
    FusionInputError,
    LanguageRecipe,
    Outcome,
    RunCodeRequest,
    exec_timeout,
    parse_result,
    payload,
    recipe_for,
    runner_argv,
)
from dsec.errors import RETRY_AFTER_METADATA_KEY
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

log = logging.getLogger("dsec.compat.fusion")
M = TypeVar("M", bound=BaseModel)

MAX_BODY = 64 << 20  # base64 files ride in the JSON body; the exec's stdin (the payload) is capped at 64 MiB too
ADMISSION_WAIT_S = 60.0  # how long a call waits for sandbox capacity before answering 504
MIN_MEMORY_MB = 64  # below this not even the runner and python3 start; smaller limits are raised to it
DEFAULT_MEMORY_MB = 1024  # memory_limit_MB <= 0: SandboxFusion's default is no limit of its own
LABELS = {"dsec.compat": "sandbox-fusion"}
# gRPC errors that are the caller's (or the server's load) to answer with an HTTP status; the client retries
# non-200 answers. Anything else becomes a SandboxError body, as SandboxFusion reports failed runs.
HTTP_ERRORS = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAVAILABLE,
)


class _HttpError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status, self.detail = status, detail


def _sandbox_error(message: str) -> JSONResponse:
    return JSONResponse({"status": "SandboxError", "message": message, "compile_result": None, "run_result": None,
                         "executor_pod_name": None, "files": {}})  # fmt: skip


async def _body(request: Request) -> dict:
    """The JSON object body, or the 422/413 FastAPI would answer."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _HttpError(413, f"request body over {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _HttpError(413, f"request body over {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HttpError(422, [{"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error",
                                "input": {}, "ctx": {"error": str(exc)[:200]}}]) from None  # fmt: skip
    if not isinstance(body, dict):
        message = "Input should be a valid dictionary or object to extract fields from"
        raise _HttpError(422, [{"type": "model_attributes_type", "loc": ["body"], "msg": message}])
    return body


def _safe(value: object) -> str | int:
    """JSON-safe: an int stays, anything else becomes text without lone surrogates (they cannot be UTF-8)."""
    return value if isinstance(value, int) else str(value).encode("utf-8", "replace").decode()


def _validation_detail(exc: ValidationError) -> list[dict]:
    return [{"type": e["type"], "loc": ["body", *map(_safe, e["loc"])], "msg": _safe(e["msg"])}
            for e in exc.errors(include_url=False)]  # fmt: skip


def _validated(model: type[M], body: dict) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _HttpError(422, _validation_detail(exc)) from None


def _api_key(request: Request) -> str | None:
    """The key the door resolved (X-API-Key / Bearer), else HTTP basic auth's password (or user name, when the
    password is empty): SandboxFusion clients cannot set headers, but `http://dsec:KEY@host:port` as their
    endpoint makes requests and aiohttp send it."""
    key = request.scope.get("state", {}).get(STATE_API_KEY)
    if key:
        return key
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, ValueError):
        return None
    return password or user or None


class FusionRoutes:
    def __init__(self, ctx: CompatContext) -> None:
        self.ctx = ctx
        self._destroying: set[asyncio.Future] = set()

    async def run_code(self, request: Request) -> Response:
        try:
            call = _validated(RunCodeRequest, await _body(request))
            try:
                recipe = recipe_for(call.language)
            except FusionInputError as exc:
                return _sandbox_error(str(exc))
            outcome = await self._run(request, call, recipe)
        except _HttpError as exc:
            return JSONResponse({"detail": exc.detail}, exc.status)
        if isinstance(outcome, Response):
            return outcome
        return JSONResponse({
            "status": outcome.status,
            "message": "",
            "compile_result": outcome.compile.as_json() if outcome.compile else None,
            "run_result": outcome.run.as_json() if outcome.run else None,
            "executor_pod_name": None,
            "files": outcome.files,
        })  # fmt: skip

    async def run_jupyter(self, request: Request) -> Response:
        try:
            jupyter = _validated(fusion_jupyter.RunJupyterRequest, await _body(request))
            call = _validated(RunCodeRequest, jupyter.run_code_fields())
            outcome = await self._run(request, call, fusion_jupyter.RECIPE)
        except _HttpError as exc:
            return JSONResponse({"detail": exc.detail}, exc.status)
        if isinstance(outcome, Response):
            return outcome
        return JSONResponse(fusion_jupyter.response(outcome))

    async def _run(self, request: Request, call: RunCodeRequest, recipe: LanguageRecipe) -> Outcome | Response:
        """Create, exec the runner, destroy: the outcome, or the error response to send instead.

        A caller that hangs up (a client-side timeout) ends the call and its sandbox at once, unless the call
        is a trajectory step: that one runs to the end, so its result is logged and the caller's retry replays it."""
        try:
            stdin, argv = payload(call, recipe), runner_argv(call, recipe)
        except FusionInputError as exc:
            return _sandbox_error(str(exc))
        api = self.ctx.stub(pb_grpc.SandboxServiceStub, _api_key(request))
        memory = DEFAULT_MEMORY_MB if call.memory_limit_MB <= 0 else max(call.memory_limit_MB, MIN_MEMORY_MB)
        spec = pb.SandboxSpec(image=recipe.image, substrate=call.substrate, resources=pb.Resources(memory_mb=memory),
                              timeout_s=exec_timeout(call) + 60, labels=LABELS)  # fmt: skip
        info = await self._create(api, spec)
        if isinstance(info, Response):
            return info
        answered = False
        try:
            work = asyncio.ensure_future(self._exec(api, info.id, call, stdin, argv))
            if call.trajectory_id is None:
                hangup = asyncio.ensure_future(_hung_up(request))
                await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
                hangup.cancel()
                if not work.done():
                    work.cancel()
                    return JSONResponse({"detail": "the client hung up; the call was cancelled"}, 499)
            result = await work
            answered = True
            return result
        finally:
            if answered:  # the answer need not wait for the destroy (a quarter of a call's time): it runs alongside
                self._destroy_soon(api, info.id)
            else:
                await asyncio.shield(self._destroy(api, info.id))

    async def _create(self, api: Any, spec: pb.SandboxSpec) -> pb.SandboxInfo | Response:
        """Create the call's sandbox, waiting out dsec's admission answers (RESOURCE_EXHAUSTED + retry-after) for
        up to ADMISSION_WAIT_S as dsec's SDK does: verl retries only a 504, so a burst beyond the server's
        capacity queues here instead of failing its rewards; past the wait the answer is that 504."""
        give_up = time.monotonic() + ADMISSION_WAIT_S
        while True:
            try:
                return await api.Create(pb.CreateRequest(spec=spec))
            except grpc.RpcError as exc:
                if grpc_code(exc) != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return self._grpc_answer(exc, f"creating a {spec.image!r} sandbox")
                delay = _retry_after(exc)
                if time.monotonic() + delay > give_up:
                    detail = f"no sandbox capacity within {ADMISSION_WAIT_S:.0f} s: {grpc_message(exc)}"
                    return JSONResponse({"detail": detail}, 504)
                await asyncio.sleep(delay)

    async def _exec(self, api: Any, sandbox_id: str, call: RunCodeRequest, stdin: bytes,
                    argv: list[str]) -> Outcome | Response:  # fmt: skip
        request = pb.ExecRequest(sandbox_id=sandbox_id, argv=argv, stdin=stdin, timeout_s=exec_timeout(call),
                                 max_output_bytes=RESULT_CAP)  # fmt: skip
        if call.trajectory_id is not None and call.step is not None:
            request.step.CopyFrom(pb.StepKey(trajectory_id=call.trajectory_id, step=call.step))
        stdout, stderr = bytearray(), bytearray()
        status: pb.ExecStatus | None = None
        try:
            async for event in api.Exec(request):
                which = event.WhichOneof("event")
                if which == "stdout":
                    stdout += event.stdout
                elif which == "stderr":
                    stderr += event.stderr
                elif which == "status":
                    status = event.status
        except grpc.RpcError as exc:
            return self._grpc_answer(exc, f"running the {call.language} program in sandbox {sandbox_id}")
        if status is None:
            return _sandbox_error(f"sandbox {sandbox_id}: the exec stream ended without a status")
        problem = _runner_problem(status, bytes(stderr))
        if problem:
            return _sandbox_error(f"sandbox {sandbox_id}: {problem}")
        try:
            return parse_result(call, bytes(stdout))
        except Exception as exc:  # noqa: BLE001 - a result we cannot read is the sandbox's error, not a 500
            return _sandbox_error(f"sandbox {sandbox_id}: unreadable runner result ({exc})")

    def _destroy_soon(self, api: Any, sandbox_id: str) -> None:
        task = asyncio.ensure_future(self._destroy(api, sandbox_id))
        self._destroying.add(task)  # a reference until it is done (the loop keeps only weak ones)
        task.add_done_callback(self._destroying.discard)

    async def _destroy(self, api: Any, sandbox_id: str) -> None:
        try:
            await api.Destroy(pb.SandboxRef(sandbox_id=sandbox_id))
        except grpc.RpcError as exc:  # its TTL still ends it; say why it lingers
            log.warning("fusion: destroying sandbox %s failed: %s", sandbox_id, grpc_message(exc))

    def _grpc_answer(self, exc: grpc.RpcError, doing: str) -> Response:
        name, message = error_name(exc), grpc_message(exc) or grpc_code(exc).name.lower()
        text = f"{doing}: {name + ': ' if name else ''}{message}"
        if grpc_code(exc) in HTTP_ERRORS:
            return JSONResponse({"detail": text}, http_status_for(exc))
        return _sandbox_error(text)


def _retry_after(exc: grpc.RpcError) -> float:
    """dsec's retry-after hint (trailing metadata), bounded; 1 s when absent."""
    try:
        for key, value in exc.trailing_metadata() or ():
            if key == RETRY_AFTER_METADATA_KEY:
                return min(max(float(value), 0.05), 10.0)
    except (TypeError, ValueError):
        pass
    return 1.0


async def _hung_up(request: Request) -> None:
    """Return when the client disconnects (the body is read already, so the next ASGI message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _runner_problem(status: pb.ExecStatus, stderr: bytes) -> str:
    """Why the runner itself (not the program) failed, or ''."""
    if status.timed_out:
        return "the runner outlived the call's time budget (compile + run timeouts + setup)"
    if status.stdout_truncated:
        return f"the result (outputs and fetched files) is larger than {RESULT_CAP} bytes"
    if status.exit_code != 0:
        oom = " (out of memory: raise memory_limit_MB)" if status.oom_killed else ""
        return f"the runner failed with exit {status.exit_code}{oom}: {stderr.decode(errors='replace')[-500:]}"
    return ""


async def _ping(_request: Request) -> Response:
    return JSONResponse("pong")


async def _not_served(request: Request) -> Response:
    detail = f"{request.url.path} is not served by dsec's SandboxFusion API (docs/compat.md)"
    return JSONResponse({"detail": detail}, 501)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, exc.detail)},
                        exc.status_code)  # fmt: skip


def make_app(ctx: CompatContext) -> Starlette:
    routes = FusionRoutes(ctx)
    return Starlette(
        routes=[
            Route("/run_code", routes.run_code, methods=["POST"]),
            Route("/v1/ping", _ping, methods=["GET"]),
            Route("/run_jupyter", routes.run_jupyter, methods=["POST"]),
            Route("/get_prompts", _not_served, methods=["POST"]),
            Route("/get_prompt_by_id", _not_served, methods=["POST"]),
            Route("/submit", _not_served, methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )

"""envd's plain HTTP routes on the front door: `GET /files` (download), `POST /files` (upload) and `GET /health`.

Shapes are those the e2b SDK uses (e2b/sandbox_sync/filesystem/filesystem.py): query `path` and `username`
(or `Authorization: Basic` with the user), uploads as `multipart/form-data` (one `file` part per file, its
filename the path; `path` in the query when there is one file) or as `application/octet-stream` with
`Content-Encoding: gzip` allowed; the answer is a JSON list of `{name, type, path}`. Downloads honour
`Accept-Encoding: gzip`. Errors are `{code, message}` with the status the SDK maps: 400 bad path or user,
404 missing file, 413 upload over the limit, 502 sandbox not found, 507 sandbox disk full.

Everything goes through dsec's gRPC API (FilesystemService.Resolve / Chown, SandboxService.ReadFile /
WriteFile): bytes are streamed both ways, never held whole in memory, and every path is resolved by the agent
inside the sandbox, so `..` or a symlink cannot reach the host.
"""

from __future__ import annotations

import asyncio
import base64
import json
import posixpath
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote

import grpc

from dsec.compat.context import STATE_API_KEY, STATE_SANDBOX_ID, CompatContext, error_name, grpc_code, grpc_message, http_status_for
from dsec.compat.envd.filesystem import UserDefaults
from dsec.compat.envd.multipart_stream import MultipartError, MultipartStream
from dsec.v1 import filesystem_pb2 as fpb
from dsec.v1 import filesystem_pb2_grpc as fpb_grpc
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

MAX_UPLOAD_BYTES = 1 << 30  # per request, after gzip decoding (so a gzip bomb stops here too)
MAX_FILES = 1000  # parts of one multipart upload
CHUNK = 1 << 20
GZIP_LEVEL = 1  # downloads: fast, still a good ratio on text
Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


def basic_auth_user(header: str) -> str:
    """The user named by envd's `Authorization: Basic base64(user:)` header ("" when absent or malformed)."""
    if not header.lower().startswith("basic "):
        return ""
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.split(":", 1)[0]


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def http_error(exc: grpc.RpcError) -> HttpError:
    """The envd status for a backend error; a missing sandbox is 502 "... was not found" like E2B's proxy."""
    name = error_name(exc)
    message = grpc_message(exc) or grpc_code(exc).name
    if name in ("SandboxNotFound", "SandboxExpired"):  # ended (timeout, idle, killed, lost) reads as gone, as on E2B
        return HttpError(502, f"{message}: the sandbox was not found")
    if name == "DiskFull":
        return HttpError(507, message)
    if grpc_code(exc) == grpc.StatusCode.ALREADY_EXISTS:
        return HttpError(400, message)
    return HttpError(http_status_for(exc), message)


async def send_json(send: Send, status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


class BodyReader:
    """Wraps ASGI `receive`: decodes gzip when the body is gzip-encoded and refuses more than `limit` bytes."""

    def __init__(self, receive: Receive, gzip: bool, limit: int) -> None:
        self._receive = receive
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self._limit = limit
        self.total = 0

    def _count(self, data: bytes) -> bytes:
        self.total += len(data)
        if self.total > self._limit:
            raise HttpError(413, f"upload larger than {self._limit} bytes; split it or write it from inside the sandbox")
        return data

    async def receive(self) -> dict:
        message = await self._receive()
        if message["type"] != "http.request":
            return message
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self._inflate is not None:
            try:
                # inflate at most one byte past the limit: a small gzip body cannot blow up memory
                body = self._inflate.decompress(body, max(1, self._limit + 1 - self.total))
                if not more:
                    body += self._inflate.flush()
            except zlib.error as exc:
                raise HttpError(400, f"body is not valid gzip: {exc}") from None
        return {"type": "http.request", "body": self._count(body), "more_body": more}

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "the client disconnected during the upload")
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return


class FilesHttpApp:
    def __init__(self, ctx: CompatContext, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.ctx = ctx
        self.max_upload_bytes = max_upload_bytes
        self.users = UserDefaults()

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        state = scope.get("state") or {}
        sandbox_id, key = state.get(STATE_SANDBOX_ID), state.get(STATE_API_KEY)
        path, method = scope.get("path", ""), scope.get("method", "")
        try:
            if not sandbox_id:
                raise HttpError(400, "missing E2b-Sandbox-Id header")
            if path == "/health":
                if method not in ("GET", "HEAD"):
                    raise HttpError(405, f"{method} /health is not allowed; use GET")
                await self._health(sandbox_id, key, send)
            elif path == "/files":
                if method == "GET":
                    await self._download(scope, sandbox_id, key, send)
                elif method == "POST":
                    await self._upload(scope, receive, sandbox_id, key, send)
                else:
                    raise HttpError(405, f"{method} /files is not allowed; use GET or POST")
            else:
                raise HttpError(404, f"envd has no route {method} {path}")
        except HttpError as exc:
            await send_json(send, exc.status, {"code": exc.status, "message": exc.message})
        except grpc.RpcError as exc:
            err = http_error(exc)
            await send_json(send, err.status, {"code": err.status, "message": err.message})

    # -- helpers --------------------------------------------------------------------------------------------
    async def _resolve(
        self, scope: dict, sandbox_id: str, key: str | None, path: str, make_parents: bool
    ) -> tuple[fpb.ResolvedPath, str]:
        """Where `path` is for the request's user (query `username`, Basic auth, else envd's default user)."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        user = (query.get("username") or [""])[0] or basic_auth_user(headers.get("authorization", ""))
        stub = self.ctx.stub(fpb_grpc.FilesystemServiceStub, key)
        user = await self.users.user_for(stub, sandbox_id, user)
        target = fpb.FsPath(sandbox_id=sandbox_id, path=path, user=user)
        return await stub.Resolve(fpb.ResolveRequest(target=target, make_parents=make_parents)), user

    # -- routes ---------------------------------------------------------------------------------------------
    async def _health(self, sandbox_id: str, key: str | None, send: Send) -> None:
        info = await self.ctx.stub(pb_grpc.SandboxServiceStub, key).Get(pb.SandboxRef(sandbox_id=sandbox_id))
        if info.state != "running":
            raise HttpError(502, f"sandbox {sandbox_id} is {info.state}: the sandbox was not found running")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def _download(self, scope: dict, sandbox_id: str, key: str | None, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        path = (query.get("path") or [""])[0]
        if not path:
            raise HttpError(400, "query parameter `path` is required")
        resolved, _ = await self._resolve(scope, sandbox_id, key, path, make_parents=False)
        call = self.ctx.stub(pb_grpc.SandboxServiceStub, key).ReadFile(pb.FileRequest(sandbox_id=sandbox_id, path=resolved.path))
        try:
            first = await call.read()  # errors (missing, a directory) surface before the status line is sent
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
            gzip = "gzip" in headers.get("accept-encoding", "").lower()
            name = posixpath.basename(resolved.path)
            response_headers = [
                (b"content-type", b"application/octet-stream"),
                (b"content-disposition", f"attachment; filename*=UTF-8''{quote(name)}".encode()),
            ]
            if gzip:
                response_headers.append((b"content-encoding", b"gzip"))
            await send({"type": "http.response.start", "status": 200, "headers": response_headers})
            deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if gzip else None
            message = first
            while message is not grpc.aio.EOF:
                data = deflate.compress(message.data) if deflate else message.data
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                message = await call.read()
            await send({"type": "http.response.body", "body": deflate.flush() if deflate else b"", "more_body": False})
        finally:
            call.cancel()

    async def _upload(self, scope: dict, receive: Receive, sandbox_id: str, key: str | None, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        if any(name.startswith("x-metadata-") for name in headers):
            raise HttpError(400, "file metadata (X-Metadata-* extended attributes) is not supported by dsec")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_upload_bytes:
            raise HttpError(413, f"upload of {length} bytes is larger than {self.max_upload_bytes} bytes")
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", "gzip"):
            raise HttpError(415, f"Content-Encoding {encoding!r} is not supported; use gzip or none")
        body = BodyReader(receive, encoding == "gzip", self.max_upload_bytes)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        query_path = (query.get("path") or [""])[0]
        content_type = headers.get("content-type", "").lower()
        written: list[dict] = []
        if content_type.startswith("multipart/form-data"):
            try:
                parts = MultipartStream(body.chunks(), headers["content-type"], MAX_FILES)
                while (part := await parts.next_part()) is not None:
                    _, filename = part
                    if filename is None:
                        continue  # a plain form field: envd reads files only
                    if written and query_path:
                        raise HttpError(400, "`path` in the query names one file; give each part's path as its filename")
                    path = query_path or filename
                    if not path:
                        raise HttpError(400, "a file part has no filename (its path) and the query no `path`")
                    written.append(await self._write(scope, sandbox_id, key, path, parts.part_data()))
            except MultipartError as exc:
                raise HttpError(400, str(exc)) from None
            if not written:
                raise HttpError(400, "multipart upload has no file part")
        elif content_type.startswith("application/octet-stream") or not content_type:
            if not query_path:
                raise HttpError(400, "query parameter `path` is required for an octet-stream upload")
            written.append(await self._write(scope, sandbox_id, key, query_path, body.chunks()))
        else:
            raise HttpError(415, f"Content-Type {content_type!r}: upload multipart/form-data or application/octet-stream")
        await send_json(send, 200, written)

    async def _write(self, scope: dict, sandbox_id: str, key: str | None, path: str, chunks: AsyncIterator[bytes]) -> dict:
        resolved, user = await self._resolve(scope, sandbox_id, key, path, make_parents=True)

        failure: list[HttpError] = []

        async def requests() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id=sandbox_id, path=resolved.path, mode=0o644))
            try:
                async for chunk in chunks:
                    for start in range(0, len(chunk), CHUNK):
                        yield pb.WriteFileRequest(data=chunk[start : start + CHUNK])
            except HttpError as exc:  # over the limit, bad gzip: the call is cancelled, the client told why
                failure.append(exc)
                raise
            except MultipartError as exc:
                failure.append(HttpError(400, str(exc)))
                raise

        try:
            await self.ctx.stub(pb_grpc.SandboxServiceStub, key).WriteFile(requests())
        except (grpc.RpcError, asyncio.CancelledError):  # grpc.aio cancels the call when the requests fail
            if failure:
                raise failure[0] from None
            raise
        if failure:
            raise failure[0]
        if resolved.uid >= 0:
            target = fpb.FsPath(sandbox_id=sandbox_id, path=resolved.path, user=user)
            await self.ctx.stub(fpb_grpc.FilesystemServiceStub, key).Chown(target)
        return {"name": posixpath.basename(resolved.path), "type": "file", "path": resolved.path}


def make_app(ctx: CompatContext) -> FilesHttpApp:
    return FilesHttpApp(ctx)

"""`AsyncSandbox`: the same API for asyncio code.

Each call runs the sync SDK in a worker thread (grpc's sync channel is thread-safe), so many sandboxes
can be driven concurrently from one event loop without a second implementation to keep in step.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dsec.models import ExecResult, FileEntry
from dsec.sdk.client import Client, default_client
from dsec.sdk.processes import AsyncProcesses
from dsec.sdk.sandbox import Sandbox


class AsyncFiles:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sync = sandbox.files

    async def read(self, path: str) -> bytes:
        return await asyncio.to_thread(self._sync.read, path)

    async def write(self, path: str, data: bytes | str, mode: int = 0o644) -> int:
        return await asyncio.to_thread(self._sync.write, path, data, mode)

    async def list(self, path: str = "/") -> list[FileEntry]:
        return await asyncio.to_thread(self._sync.list, path)


class AsyncSandbox:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sync = sandbox
        self.id = sandbox.id
        self.files = AsyncFiles(sandbox)
        self.processes = AsyncProcesses(sandbox.processes)

    @classmethod
    async def create(cls, image: str = "busybox", substrate: str = "container", *, client: Client | None = None, **options: Any) -> AsyncSandbox:
        client = client or await asyncio.to_thread(default_client)
        return cls(await asyncio.to_thread(client.create, image, substrate, **options))

    @classmethod
    async def connect(cls, sandbox_id: str, *, client: Client | None = None) -> AsyncSandbox:
        client = client or await asyncio.to_thread(default_client)
        return cls(await asyncio.to_thread(client.connect, sandbox_id))

    async def exec(self, command: str | list[str], **options: Any) -> ExecResult:
        return await asyncio.to_thread(self.sync.exec, command, **options)

    async def call(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.sync.call, fn, *args, **kwargs)

    async def upload(self, local_path: str, remote_dir: str) -> int:
        return await asyncio.to_thread(self.sync.upload, local_path, remote_dir)

    async def download(self, remote_path: str, local_dir: str) -> Any:
        return await asyncio.to_thread(self.sync.download, remote_path, local_dir)

    async def snapshot(self, name: str = "") -> str:
        return await asyncio.to_thread(self.sync.snapshot, name)

    async def fork(self, n: int = 1) -> list[AsyncSandbox]:
        return [AsyncSandbox(s) for s in await asyncio.to_thread(self.sync.fork, n)]

    async def keep_alive(self, timeout_s: float) -> float:
        """Extend: lives at least `timeout_s` more, never less than it already would; returns the new end."""
        return await asyncio.to_thread(self.sync.keep_alive, timeout_s)

    async def destroy(self) -> None:
        await asyncio.to_thread(self.sync.destroy)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.destroy()

"""A minimal QMP (QEMU Machine Protocol) client: one unix socket, one command at a time.

Why our own: we need five commands (stop, cont, migrate, query-migrate, quit) and their events are ignored;
a dependency for that is not worth it. Every call has a deadline so a wedged QEMU surfaces as an error.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from dsec.errors import RuntimeFailure


class QmpClient:
    """Talks to one QEMU's `-qmp unix:PATH,server=on,wait=off` socket."""

    def __init__(self, path: Path, timeout_s: float = 30.0) -> None:
        self.path = path
        deadline = time.monotonic() + timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"QEMU monitor {path} did not appear within {timeout_s:.0f}s") from None
                time.sleep(0.01)
        sock.settimeout(timeout_s)
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._read_message()  # greeting
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        try:
            line = self._reader.readline()
        except (TimeoutError, OSError) as exc:
            raise RuntimeFailure(f"QEMU monitor {self.path} stopped answering: {exc}") from exc
        if not line:
            raise RuntimeFailure(f"QEMU monitor {self.path} closed (QEMU exited)")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; returns its `return` value, raises RuntimeFailure with QEMU's error text."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise RuntimeFailure(f"QEMU monitor {self.path} is gone: {exc}") from exc
        while True:
            reply = self._read_message()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeFailure(f"QEMU {command} failed: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_migration(self, timeout_s: float) -> None:
        """Poll query-migrate until the outgoing migration completed (or failed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.execute("query-migrate").get("status", "")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise RuntimeFailure(f"QEMU snapshot (migrate) {status}")
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"QEMU snapshot did not finish within {timeout_s:.0f}s (status {status})")
            time.sleep(0.01)

    def close(self) -> None:
        try:
            self._reader.close()
            self._sock.close()
        except OSError:
            pass

"""Start a local dsec server for this process when no address is given, and stop it at exit.

The server runs as a child process (not threads in the caller) so sandboxes outlive neither it nor the
caller: the child watches its parent and destroys everything when the parent dies, even by kill -9.
On request (`Client(http_listen=...)` or $DSEC_HTTP_LISTEN) it also serves the E2B/SandboxFusion HTTP
front door (docs/compat.md); its address is printed on stderr so the unchanged clients can be pointed at it.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path


class EmbeddedServer:
    def __init__(self, process: subprocess.Popen, address: str, log_path: Path, http_address: str | None = None) -> None:
        self.process = process
        self.address = address
        self.log_path = log_path
        self.http_address = http_address  # host:port of the HTTP front door, when started
        atexit.register(self.stop)

    @property
    def http_url(self) -> str | None:
        return f"http://{self.http_address}" if self.http_address else None

    @classmethod
    def start(cls, home: Path | None = None, extra_args: list[str] | None = None,
              http_listen: str | None = None) -> EmbeddedServer:
        """`http_listen` (default $DSEC_HTTP_LISTEN; "127.0.0.1:0" picks a free port) starts the HTTP front door."""
        # function-level: the server package needs `dsec[server]` (it says so when missing), and a client-only
        # install imports the SDK without it (tests/test_layering.py FUNCTION_LEVEL)
        from dsec.server.launch import launch_server

        http_listen = http_listen if http_listen is not None else os.environ.get("DSEC_HTTP_LISTEN", "")
        args = ["--http-listen", http_listen, *(extra_args or [])]  # extra_args may still override it
        launched = launch_server(home, args, log_name="embedded")
        server = cls(launched.process, launched.address, launched.log_path, launched.http_address)
        if server.http_url:
            print(f"dsec: E2B/SandboxFusion front door at {server.http_url} "
                  f"(E2B_API_URL={server.http_url} E2B_SANDBOX_URL={server.http_url})", file=sys.stderr, flush=True)
        return server

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM: the server destroys its sandboxes, then exits; SIGKILL only if it hangs."""
        from dsec.server.launch import stop_server_process  # function-level as in start(), which loaded it

        stop_server_process(self.process, timeout_s)

"""Start a local dsec server for this process when no address is given, and stop it at exit.

The server runs as a child process (not threads in the caller) so sandboxes outlive neither it nor the
caller: the child watches its parent and destroys everything when the parent dies, even by kill -9.
"""

from __future__ import annotations

import atexit
import subprocess
from pathlib import Path

from dsec.config import default_home
from dsec.server.launch import launch_server, stop_server_process


class EmbeddedServer:
    def __init__(self, process: subprocess.Popen, address: str, log_path: Path) -> None:
        self.process = process
        self.address = address
        self.log_path = log_path
        atexit.register(self.stop)

    @classmethod
    def start(cls, home: Path | None = None, extra_args: list[str] | None = None) -> EmbeddedServer:
        launched = launch_server(home or default_home(), extra_args or [], log_name="embedded")
        return cls(launched.process, launched.address, launched.log_path)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM: the server destroys its sandboxes, then exits; SIGKILL only if it hangs."""
        stop_server_process(self.process, timeout_s)

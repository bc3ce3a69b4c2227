"""Start a local dsec server for this process when no address is given, and stop it at exit.

The server runs as a child process (not threads in the caller) so sandboxes outlive neither it nor the
caller: the child watches its parent and destroys everything when the parent dies, even by kill -9.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from dsec.config import default_home
from dsec.errors import ServerUnavailable

READY_PREFIX = "DSEC_SERVER_READY "
START_TIMEOUT_S = 120.0


class EmbeddedServer:
    def __init__(self, process: subprocess.Popen, address: str, log_path: Path) -> None:
        self.process = process
        self.address = address
        self.log_path = log_path
        atexit.register(self.stop)

    @classmethod
    def start(cls, home: Path | None = None, extra_args: list[str] | None = None) -> EmbeddedServer:
        home = home or default_home()
        logs = home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"embedded-{os.getpid()}-{int(time.time())}.log"
        command = [
            sys.executable, "-m", "dsec.server.main",
            "--listen", "127.0.0.1:0",
            "--home", str(home),
            "--parent-pid", str(os.getpid()),
            *(extra_args or []),
        ]  # fmt: skip
        log_file = open(log_path, "ab")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL)
        log_file.close()
        address = cls._wait_ready(process, log_path)
        threading.Thread(target=cls._drain, args=(process,), daemon=True).start()
        return cls(process, address, log_path)

    @staticmethod
    def _wait_ready(process: subprocess.Popen, log_path: Path) -> str:
        result: dict[str, str] = {}

        def read() -> None:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith(READY_PREFIX):
                    result["address"] = line[len(READY_PREFIX) :]
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if "address" not in result:
            process.kill()
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise ServerUnavailable(f"embedded dsec server did not start in {START_TIMEOUT_S:.0f}s; log {log_path}:\n{tail}")
        return result["address"]

    @staticmethod
    def _drain(process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for _ in process.stdout:
            pass

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM: the server destroys its sandboxes, then exits; SIGKILL only if it hangs."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

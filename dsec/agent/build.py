"""Compile the in-sandbox agent on demand.

Every driver needs the binary and many may ask for it at once (parallel sandbox creation, several test
workers), so compilation happens under a file lock, into a temporary file that is renamed into place: a caller
either sees no binary, or a complete one. The binary is rebuilt when agent.c is newer, so editing the source
never leaves a stale agent behind.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from dsec.config import default_home
from dsec.errors import RuntimeFailure

SOURCE = Path(__file__).with_name("agent.c")
BINARY_NAME = "dsec-agent"
CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-s"]


def _fresh(binary: Path) -> bool:
    try:
        return binary.stat().st_mtime >= SOURCE.stat().st_mtime
    except FileNotFoundError:
        return False


def agent_binary(bin_dir: Path | None = None) -> Path:
    """Path of a static `dsec-agent` built from the current agent.c (compiled here if missing or stale)."""
    bin_dir = Path(bin_dir) if bin_dir is not None else default_home() / "bin"
    binary = bin_dir / BINARY_NAME
    if _fresh(binary):
        return binary
    bin_dir.mkdir(parents=True, exist_ok=True)
    with open(bin_dir / f".{BINARY_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _fresh(binary):
            return binary
        tmp = bin_dir / f".{BINARY_NAME}.{os.getpid()}.tmp"
        try:
            proc = subprocess.run(
                ["gcc", *CFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=300
            )
        except FileNotFoundError as exc:
            raise RuntimeFailure("gcc is not installed: run infra/setup.sh (it installs gcc and libc6-dev)") from exc
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeFailure(
                f"compiling {SOURCE} failed (is libc6-dev installed? infra/setup.sh installs it):\n{proc.stderr}"
            )
        tmp.chmod(0o755)
        os.replace(tmp, binary)
    return binary


def main() -> None:
    print(agent_binary(Path(sys.argv[1]) if len(sys.argv) > 1 else None))


if __name__ == "__main__":
    main()

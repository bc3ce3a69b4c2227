"""Build the container substrate's small static C helpers (dsec-v1view, dsec-idmap) on first use.

Why compiled here rather than shipped: they are a few dozen lines each and must match the kernel headers of the
machine. Each is built under a file lock, renamed into place, and rebuilt when its source changes (the same
scheme as the agent's build).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from dsec.errors import RuntimeFailure

CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-s"]


def _fresh(binary: Path, source: Path) -> bool:
    try:
        return binary.stat().st_mtime >= source.stat().st_mtime
    except FileNotFoundError:
        return False


def helper_binary(source: Path, name: str, bin_dir: Path) -> Path:
    """Path of `name` built from the current `source` (compiled into `bin_dir` if missing or stale)."""
    binary = bin_dir / name
    if _fresh(binary, source):
        return binary
    bin_dir.mkdir(parents=True, exist_ok=True)
    with open(bin_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _fresh(binary, source):
            return binary
        tmp = bin_dir / f".{name}.{os.getpid()}.tmp"
        try:
            proc = subprocess.run(["gcc", *CFLAGS, "-o", str(tmp), str(source)], capture_output=True, text=True, timeout=300)
        except FileNotFoundError as exc:
            raise RuntimeFailure("gcc is not installed: run infra/setup.sh (it installs gcc and libc6-dev)") from exc
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeFailure(f"compiling {source} failed (is libc6-dev installed?):\n{proc.stderr}")
        tmp.chmod(0o755)
        os.replace(tmp, binary)
    return binary

"""Compile the in-sandbox agent on demand.

Every driver needs the binary and many may ask for it at once (parallel sandbox creation, several test
workers), so compilation happens under a file lock, into a temporary file that is renamed into place: a caller
either sees no binary, or a complete one. The binary is rebuilt when the hash of agent.c and the compiler flags
differs from the one recorded beside it: mtimes would be fooled by several checkouts sharing one $DSEC_HOME.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from dsec.config import default_home
from dsec.errors import RuntimeFailure

SOURCE = Path(__file__).with_name("agent.c")
BINARY_NAME = "dsec-agent"
CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-s"]


def source_digest() -> str:
    """Identity of the binary a build would produce: the source and the flags it is compiled with."""
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()


def _stamp(binary: Path) -> Path:
    return binary.with_name(f".{binary.name}.sha256")


def _fresh(binary: Path, digest: str) -> bool:
    try:
        return binary.exists() and _stamp(binary).read_text().strip() == digest
    except FileNotFoundError:
        return False


def agent_binary(bin_dir: Path | None = None) -> Path:
    """Path of a static `dsec-agent` built from the current agent.c (compiled here if missing or stale)."""
    bin_dir = Path(bin_dir) if bin_dir is not None else default_home() / "bin"
    binary = bin_dir / BINARY_NAME
    digest = source_digest()
    if _fresh(binary, digest):
        return binary
    bin_dir.mkdir(parents=True, exist_ok=True)
    with open(bin_dir / f".{BINARY_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _fresh(binary, digest):
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
        _stamp(binary).write_text(digest + "\n")
    return binary


def main() -> None:
    print(agent_binary(Path(sys.argv[1]) if len(sys.argv) > 1 else None))


if __name__ == "__main__":
    main()

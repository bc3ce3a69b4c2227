"""A sealed in-memory copy of the OCI runtime binary, made once per server, that the runtime is executed from.

Why: against CVE-2019-5736 (a container overwriting the runtime binary through /proc/self/exe) crun copies
itself into a sealed memfd and re-executes from it on every `run` and `exec`, unless /proc/self/exe already is
such a memfd. That copy of its 2.6 MB binary and the second execve cost ~2 ms of every create here (measured:
`run` p50 15.2 ms from the file, 13.2 ms from a sealed copy, interleaved). Executing crun from one sealed copy
made here (close-on-exec, passed to the runtime alone) gives the same protection (the seals forbid any write, shrink or growth, whoever holds the file) with
one copy for the server's life, as runc's `memfd-bind` does for runc. The copy is remade when the binary on
disk changes (a rebuilt or upgraded runtime), and a host without memfd sealing runs the file as before.
"""

from __future__ import annotations

import fcntl
import os
import threading

# F_ADD_SEALS and the seals crun's cloned_binary.c checks for (all four, else it copies itself anyway)
_F_ADD_SEALS = 1033
_SEALS = 0x0001 | 0x0002 | 0x0004 | 0x0008  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE

_lock = threading.Lock()
_copies: dict[str, tuple[tuple[int, int, int, int], int]] = {}  # binary path -> (its identity, memfd)


def _identity(binary: str) -> tuple[int, int, int, int]:
    st = os.stat(binary)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _seal(binary: str) -> int:
    fd = os.memfd_create(os.path.basename(binary), os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)  # passed on by pass_fds
    try:
        with open(binary, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            copied = 0
            while copied < size:
                sent = os.sendfile(fd, source.fileno(), copied, size - copied)
                if sent == 0:
                    raise OSError(f"{binary} shrank while being copied")
                copied += sent
        fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sealed_fd(binary: str) -> int | None:
    """A sealed memfd holding `binary` as it is on disk now (the same fd while the file is unchanged), or None
    where one cannot be made; the caller runs `/proc/self/fd/<fd>` with the fd passed to the child."""
    try:
        identity = _identity(binary)
    except OSError:
        return None
    with _lock:
        known = _copies.get(binary)
        if known is not None and known[0] == identity:
            return known[1]
        try:
            fd = _seal(binary)
        except OSError:
            return None
        # an older copy stays open: a call may be starting from its fd number right now, and closing it could
        # hand that number to another file; a runtime is replaced rarely, so this keeps a few MB per upgrade
        _copies[binary] = (identity, fd)
        return fd

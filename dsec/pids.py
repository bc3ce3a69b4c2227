"""Whether a process id names a live process: the check every "is its owner still here?" sweep makes (a dead
server's run dir, a dead process's spare disks, a dead build's workspace), in one place.

A zombie counts as alive (its parent has not reaped it); `dsec/substrates/container/dockerd.py` has its own check
because it must reap the engine it started. A pid can be reused by an unrelated process, which then reads as the
owner still being alive: the sweeps err on the side of keeping things, never of deleting a live owner's files.
"""

from __future__ import annotations

import os


def pid_alive(pid: int | str) -> bool:
    """`pid` (a number, or its decimal text as found in a file or directory name) runs now; text that is no pid
    is not alive."""
    try:
        number = int(pid)
    except (TypeError, ValueError):
        return False
    if number <= 0:
        return False
    try:
        os.kill(number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone we may not signal
        return True
    return True

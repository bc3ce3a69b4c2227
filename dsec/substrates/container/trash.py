"""Delete a destroyed sandbox's files off the destroy's critical path.

Why: once a sandbox's processes are dead and its mounts are gone, what remains is plain files: the state dir
(bundle, logs, the emptied mount points) and the sparse disk image. Deleting them costs 5-20 ms here (freeing
the image's extents dominates), all of it on the caller's destroy. A `rename` into a trash directory on the
same filesystem takes microseconds and makes the sandbox's state dir disappear at once; one background thread
per process deletes the trash. Durable: whatever a crash leaves in a trash directory is deleted by the next
process that discards into it (its first `discard` queues the whole directory), so nothing outlives a restart.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import secrets
import shutil
import threading
from pathlib import Path

log = logging.getLogger("dsec.substrates.container.trash")

_pending: queue.SimpleQueue[Path] = queue.SimpleQueue()
_seen_roots: set[Path] = set()
_lock = threading.Lock()
_worker: threading.Thread | None = None


def discard(path: Path, trash_root: Path) -> None:
    """Make `path` (a tree with no mounts below it) vanish now and delete it in the background; where it cannot
    be moved into `trash_root` (another filesystem), it is deleted here and now."""
    try:
        trash_root.mkdir(parents=True, exist_ok=True)
        moved = trash_root / f"{path.name}.{secrets.token_hex(4)}"
        os.rename(path, moved)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EACCES, errno.EPERM, errno.EBUSY):
            raise
        shutil.rmtree(path, ignore_errors=True)
        return
    _enqueue(moved, trash_root)


def _enqueue(path: Path, trash_root: Path) -> None:
    global _worker
    with _lock:
        if trash_root not in _seen_roots:  # a crash's leftovers here go with the first discard after it
            _seen_roots.add(trash_root)
            for left in trash_root.iterdir():
                if left != path:
                    _pending.put(left)
        _pending.put(path)
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_empty, daemon=True, name="dsec-trash")
            _worker.start()


def _empty() -> None:
    while True:
        path = _pending.get()
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:  # left in the trash: the first discard of the next process retries it
            log.exception("deleting %s from the trash failed", path)


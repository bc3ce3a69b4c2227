"""Group commit: many threads append frames to one file, and one fdatasync makes all of them durable.

Why: an fdatasync costs ~1.5 ms on this disk, so one per record caps a log at ~700 appends/s. Here a single
flusher thread writes whatever was queued while the previous fdatasync ran, then syncs once; every caller
waits until its own frame is covered. There is no added delay: under low load each append gets its own
sync, under high load batches grow by themselves.
"""

from __future__ import annotations

import os
import threading

from dsec.errors import DiskFull, RuntimeFailure


class _Batch:
    """Frames that become durable together; waiters block on `done`, not on one shared condition, so a
    sync wakes exactly the threads it made durable (a shared notify_all costs O(threads) per append)."""

    __slots__ = ("frames", "done", "error")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.done = threading.Event()
        self.error: BaseException | None = None


class GroupCommitWriter:
    """Durable appends to an open file descriptor positioned at `position` (its current end)."""

    def __init__(self, fd: int, position: int, name: str) -> None:
        self._fd = fd
        self._name = name
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # only the flusher waits on it
        self._batch = _Batch()
        self._position = position
        self._error: BaseException | None = None
        self._closing = False
        self.appends = 0
        self.fsyncs = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"dsec-groupcommit-{name}")
        self._thread.start()

    @property
    def position(self) -> int:
        """Where the next submitted frame will land."""
        with self._lock:
            return self._position

    def submit(self, frame: bytes) -> tuple[_Batch, int]:
        """Queue a frame; returns (ticket, file offset). Call `wait(ticket)` before acting on durability."""
        with self._lock:
            self._raise_if_failed(self._error)
            if self._closing:
                raise RuntimeFailure(f"trajectory log segment {self._name} is closed")
            offset = self._position
            self._position += len(frame)
            batch = self._batch
            batch.frames.append(frame)
            if len(batch.frames) == 1:
                self._work.notify()
            return batch, offset

    def wait(self, ticket: _Batch) -> None:
        """Block until the frame's batch is on disk (or raise why it never will be)."""
        ticket.done.wait()
        self._raise_if_failed(ticket.error)

    def close(self) -> None:
        """Flush what is queued, then stop the flusher (the fd stays open: the caller owns it)."""
        with self._lock:
            self._closing = True
            self._work.notify()
        self._thread.join()

    def _raise_if_failed(self, error: BaseException | None) -> None:
        if error is None:
            return
        if isinstance(error, OSError) and error.errno == 28:
            raise DiskFull(f"trajectory log segment {self._name}: disk full; free space and restart the server")
        raise RuntimeFailure(
            f"trajectory log segment {self._name} failed to write ({error}); "
            "nothing after this point was acknowledged: restart the server to recover the log"
        )

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._batch.frames and not self._closing:
                    self._work.wait()
                batch = self._batch
                if not batch.frames and self._closing:
                    return
                self._batch = _Batch()
                failed = self._error
            if failed is None:
                try:
                    view = memoryview(b"".join(batch.frames))
                    while view:
                        written = os.write(self._fd, view)
                        view = view[written:]
                    os.fdatasync(self._fd)
                except OSError as exc:
                    # After a failed write or fsync the file's state is unknown: fail this and every later batch.
                    failed = exc
                    with self._lock:
                        self._error = exc
            if failed is None:
                with self._lock:
                    self.appends += len(batch.frames)
                    self.fsyncs += 1
            batch.error = failed
            batch.done.set()

"""What every part of the image store shares: cross-process locks, temp space and the SQLite database.

The blob store, the layer cache and the image index each own their files and tables, but one flock namespace
(a layer's lock is taken by extraction and by mounting; `gc` by prune and by every user), one `tmp/` swept of dead
processes' work, and one WAL database (a create's resolve reads images and writes layers in one process).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from dsec.pids import pid_alive

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY, manifest TEXT NOT NULL, config TEXT NOT NULL,
    size INTEGER NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL, source TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS tags (name TEXT PRIMARY KEY, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    diff_id TEXT PRIMARY KEY, blob_digest TEXT NOT NULL, media_type TEXT NOT NULL,
    blob_size INTEGER NOT NULL, unpacked INTEGER NOT NULL, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS holds (holder TEXT PRIMARY KEY, digest TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS build_cache (key TEXT PRIMARY KEY, digest TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS evicted (digest TEXT PRIMARY KEY);
"""


class Workspace:
    """`locks/`, `tmp/` and `store.db` under the store's root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        for d in (self.tmp_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._db_lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "store.db", timeout=60, isolation_level=None, check_same_thread=False)
        with self._db_lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._db_lock:
            self._db.close()

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False) -> Iterator[None]:
        """A cross-process flock on `locks/<name>` (released when the holder dies, so kill -9 cannot wedge it)."""
        with open(self.locks_dir / name, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def new_tmp(self, suffix: str = "") -> Path:
        return self.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}{suffix}"

    def sweep_tmp(self) -> int:
        """Remove work left by dead processes (kill -9 mid-pull or mid-extract); returns how many entries."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            pid_text = entry.name.split("-", 1)[0]
            if pid_alive(pid_text):
                continue
            remove_path(entry)
            removed += 1
        return removed

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers across processes queue instead of failing later)."""
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

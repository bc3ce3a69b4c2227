"""Sandbox disks made ahead of the creates that take them: formatted, attached to a loop device and mounted.

Why: a disk cost a create 4-7 ms here, nearly all of it waiting in the kernel, not CPU (LOOP_CONFIGURE 4.1 ms,
the ext4 mount 2.6 ms, the sparse copy 0.2 ms; median of 20 at load ~13). A create takes a ready one instead:
its image file is renamed into the sandbox's state dir and its mount moved onto the sandbox's mount point
(MS_MOVE), well under a millisecond. The loop device follows the rename (the kernel names the backing file by
its current path), so the disk is then the sandbox's exactly as if made for it.

A spare is a fresh copy of the per-size template that no sandbox has seen; each is taken once. They are made
by one background thread per driver, only while no create of that driver is under way (a spare never competes
with a user's create for the CPU or the kernel's locks), up to SPARES per disk size in use.

Crash safety: a process's spares live in `<home>/spare-disks/<owner>/` (images) with their mount points in the
volatile dir (volatile.py), and the process holds `<owner>/owner.lock` (flock) while it lives. A driver starting
removes every owner directory whose lock nobody holds (its process died): each mount unmounted (the autoclear
loop device goes with it), the files deleted. A spare's image renamed into a state dir before the process died
belongs to that sandbox; its record and the orphan sweep cover it.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from dsec.pids import pid_alive
from dsec.substrates.container import disk, volatile
from dsec.substrates.container.rootfs import mounts_under, unmount

log = logging.getLogger("dsec.substrates.container.spares")

SPARES = 4  # per disk size: a burst takes these first, then makes its own disks as before
SIZES = 2  # disk sizes kept at once, the most recently asked: creates choose disk_mb, the host's loop devices are few
MS_MOVE = 8192
LOCK = "owner.lock"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _move_mount(source: Path, target: Path) -> None:
    if _libc.mount(str(source).encode(), str(target).encode(), None, MS_MOVE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


class SpareDisks:
    """One process's ready disks for one driver; `take` hands one over, a thread makes more."""

    def __init__(self, home: Path, template_dir: Path) -> None:
        self.template_dir = template_dir
        self.images = home / "spare-disks"
        self.mounts = volatile.home_root(home) / "spare-disks"
        reap_dead_owners(home)
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        (self.images / self.owner).mkdir(parents=True)
        (self.mounts / self.owner).mkdir(parents=True)
        self._lock_fd = os.open(self.images / self.owner / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        # blocking: a reaper never removes a live pid's owner (reap_dead_owners), so whoever holds this new lock
        # holds it for a moment only
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._ready: dict[int, collections.deque[str]] = {}  # size in MB -> ready spares, least recently asked first
        self._retired: list[str] = []  # spares of a size no longer kept, for the maker to remove
        self._creating = 0
        self._filling = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        atexit.register(self.close)  # a server that exits leaves no mounted spares behind (kill -9: the reap)

    # -- what a create calls ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Held by each create for its whole length: spares are made only while none is under way."""
        with self._cond:
            self._creating += 1
        try:
            yield
        finally:
            with self._cond:
                self._creating -= 1
                if not self._creating:  # the maker waits for none to run
                    self._cond.notify_all()

    def take(self, size_mb: int, image: Path, mount_point: Path) -> bool:
        """Put a ready `size_mb` disk at `image` (renamed) mounted on `mount_point` (moved); False when none is
        ready (the caller makes one). Asking for a size starts keeping spares of it."""
        with self._cond:
            ready = self._ready.pop(size_mb, None) or collections.deque()
            self._ready[size_mb] = ready  # now the most recently asked
            if len(self._ready) > SIZES:
                self._retired.extend(self._ready.pop(next(iter(self._ready))))
            name = ready.popleft() if ready else None
            self._start()
            if not self._creating:  # else the last create's end wakes the maker
                self._cond.notify_all()
        if name is None:
            return False
        spare_image, spare_mount = self.images / self.owner / f"{name}.img", self.mounts / self.owner / name
        try:
            os.rename(spare_image, image)
            mount_point.mkdir(parents=True, exist_ok=True)
            _move_mount(spare_mount, mount_point)
        except OSError as exc:
            log.warning("a spare disk could not be taken (%s); making one instead", exc)
            unmount(spare_mount)
            unmount(mount_point)
            image.unlink(missing_ok=True)
            spare_image.unlink(missing_ok=True)
            return False
        finally:
            with contextlib.suppress(OSError):
                spare_mount.rmdir()
        return True

    # -- the background maker -------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._fill, daemon=True, name="dsec-spare-disks")
            self._thread.start()

    def _wanted(self) -> int | None:
        """A size short of spares, or None."""
        for size_mb, ready in self._ready.items():
            if len(ready) < SPARES:
                return size_mb
        return None

    def _fill(self) -> None:
        while True:
            with self._cond:
                while self._closed or self._creating or (not self._retired and (size_mb := self._wanted()) is None):
                    if self._closed:
                        return
                    self._cond.wait()
                retired = self._retired.pop() if self._retired else None
                self._filling = True
            if retired is not None:
                self._remove(retired)
                with self._cond:
                    self._filling = False
                    self._cond.notify_all()
                continue
            name = secrets.token_hex(6)
            image, mount_point = self.images / self.owner / f"{name}.img", self.mounts / self.owner / name
            try:
                disk.create_disk(image, mount_point, size_mb, name, self.template_dir)
            except Exception:  # noqa: BLE001 - creates make their own disks meanwhile; retried on the next take
                log.exception("making a spare %d MB disk failed", size_mb)
                unmount(mount_point)
                image.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    mount_point.rmdir()
                with self._cond:
                    self._ready.pop(size_mb, None)  # kept again once a create asks for this size
                    self._filling = False
                    self._cond.notify_all()
                continue
            with self._cond:
                if size_mb in self._ready:
                    self._ready[size_mb].append(name)
                else:  # its size was retired meanwhile
                    self._retired.append(name)
                self._filling = False
                self._cond.notify_all()

    def _remove(self, name: str) -> None:
        mount_point = self.mounts / self.owner / name
        unmount(mount_point)
        (self.images / self.owner / f"{name}.img").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            mount_point.rmdir()

    def close(self) -> None:
        """Unmount and delete every spare not taken (after the one being made, if any)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._filling, timeout=30)
            self._ready.clear()
        _remove_owner(self.images / self.owner, self.mounts / self.owner)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    # -- crash cleanup -------------------------------------------------------------------------------------


def reap_dead_owners(home: Path) -> None:
    """Remove the spares of processes that died (their pid is gone and no one holds their owner lock): at every
    container driver's start (a server start), so a killed server's spares do not wait for the next create. A live
    pid's owner is never touched, not even its lock probed: between making its lock file and locking it, an owner
    whose lock a reaper held for the probe failed its own lock (`BlockingIOError` in a create, seen under load),
    and one probed unlocked there lost its spares. A reused pid only keeps a dead owner's spares longer."""
    images, mounts = home / "spare-disks", volatile.home_root(home) / "spare-disks"
    if not images.is_dir():
        return
    for owner in images.iterdir():
        if pid_alive(owner.name.partition("-")[0]):
            continue
        try:
            fd = os.open(owner / LOCK, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # made, its lock not yet, and its process is dead
            fd = -1
        except OSError:
            continue
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive after all (a process of another pid namespace)
            _remove_owner(owner, mounts / owner.name)
        finally:
            if fd >= 0:
                os.close(fd)


def reap_dead_owners_on_host() -> list[str]:
    """Unmount the spares of dead processes of *every* home on this machine (their mounts live under the shared
    tmpfs, volatile.VOLATILE_ROOT), for the orphan sweep of any server's start. Why: `reap_dead_owners` runs for
    one home, and a home never served again (a test's temporary one, a removed deployment) kept a killed
    process's mounts and loop devices forever. Ownership is the pid in the owner's name: a live pid (or a reused
    one) is left alone, so this can only ever wait too long, never take a living process's spares. The images
    stay in their home, removed with it or by its next driver. Returns the owner dirs removed."""
    removed: list[str] = []
    root = volatile.VOLATILE_ROOT
    for home_dir in sorted(root.iterdir()) if root.is_dir() else []:
        spare_mounts = home_dir / "spare-disks"
        for owner in sorted(spare_mounts.iterdir()) if spare_mounts.is_dir() else []:
            if pid_alive(owner.name.partition("-")[0]):
                continue
            for mount_point in mounts_under(owner):
                unmount(mount_point)
            if not mounts_under(owner):
                shutil.rmtree(owner, ignore_errors=True)
                removed.append(str(owner))
    return removed


def _remove_owner(images: Path, mounts: Path) -> None:
    """One owner's spares: unmounted (their loop devices detach themselves), then their files."""
    for mount_point in mounts_under(mounts):
        unmount(mount_point)
    if not mounts_under(mounts):
        shutil.rmtree(mounts, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)


_shared: dict[tuple[Path, Path], SpareDisks] = {}
_shared_lock = threading.Lock()


def for_home(home: Path, template_dir: Path) -> SpareDisks:
    """The process's spares for `home`: one set shared by every driver of it (crun and runc disks are alike)."""
    key = (Path(os.path.realpath(home)), template_dir)
    with _shared_lock:
        found = _shared.get(key)
        if found is None or found._closed:
            found = _shared[key] = SpareDisks(home, template_dir)
        return found


def disk_ready(spares: SpareDisks | None, image: Path, mount_point: Path, size_mb: int, sandbox_id: str,
               template_dir: Path) -> None:
    """The sandbox's disk at `image`, mounted on `mount_point`: a spare where one is ready, else made now."""
    if spares is not None and spares.take(size_mb, image, mount_point):
        return
    disk.create_disk(image, mount_point, size_mb, sandbox_id, template_dir)



"""Named volumes: one ext4 image file per volume under `$DSEC_HOME/volumes/<name>/`, its size the quota.

Why an image file and not a directory: the filesystem's own size is a quota no process inside a sandbox can get
around (writing past it is ENOSPC there, the host's disk is untouched), and it needs no project-quota support
from the host filesystem. A volume is loop-mounted on `<name>/mnt` while at least one sandbox uses it (read-write
for its one writer, read-only for its readers) and the container drivers bind that mount into the sandbox. Who
holds it is written to `<name>/holders.json` so a server started after a crash can tell live holders (still
registered, e.g. re-adopted sandboxes) from dead ones and unmount a volume nobody holds any more.

VMs (substrates with the `volume-disks` capability) attach the image itself as a virtio disk, so the host must not
have it mounted while a VM writes it (two kernels writing one ext4 corrupt it): a VM holder is recorded as not
`hosted`, the host mount exists only while some hosted holder (a container reader or writer) needs it, and when a
VM writer lets go the image's journal is replayed (`e2fsck -p`: a VM is killed, never unmounted cleanly) before
anyone mounts it again.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dsec import loopdev
from dsec.errors import InvalidSpec, RuntimeFailure, Unsupported, VolumeExists, VolumeInUse, VolumeNotFound
from dsec.substrates import registry
from dsec.substrates.base import volume_image, volume_source

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
MIN_SIZE_MB = 8  # ext4 with a journal needs a few MiB of its own
MAX_SIZE_MB = 1 << 20
IMAGE = volume_image(Path("."), "_").name  # VM drivers attach <root>/<name>/<this>
META = "meta.json"
HOLDERS = "holders.json"
MOUNT_DIR = volume_source(Path("."), "_").name  # the drivers bind <root>/<name>/<this>
MNT_DETACH = 2
DETACH_WAIT_S = 10.0  # as orphans.LOOP_DETACH_WAIT_S: a killed container's mount namespace goes asynchronously
_libc = ctypes.CDLL(None, use_errno=True)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        raise InvalidSpec(f"invalid volume name {name!r}: 1-63 of a-z 0-9 _ . - starting with a letter or digit")
    return name


def check_supported(substrate: str) -> None:
    """Volumes are the `volumes` capability (dsec/substrates/registry.py)."""
    able = [s.name for s in registry.all_substrates() if registry.VOLUMES in s.capabilities]
    if substrate not in able:
        raise Unsupported(
            f"named volumes mount into {', '.join(able)} sandboxes only; {substrate} has no volume "
            "support (copy files in with upload instead)"
        )


def mounted_on_host(substrate: str) -> bool:
    """Whether a sandbox of `substrate` uses the host's mount of a volume (containers bind it) rather than the
    image as a disk of its own (VMs: `volume-disks`)."""
    return registry.VOLUME_DISKS not in registry.get(substrate).capabilities


def _replay_journal(image: Path) -> None:
    """After a VM writer: replay the journal its killed kernel left, so a read-only mount (which cannot) works.
    A filesystem e2fsck cannot repair unattended stays as it is: the next mount reports it."""
    subprocess.run(["e2fsck", "-p", str(image)], capture_output=True, timeout=300)


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    size_mb: int
    created_at: float
    mode: str  # "" (not mounted) | "rw" | "ro"
    holders: tuple[str, ...]  # sandbox ids using it now


def _umount(target: Path) -> None:
    """Unmount; a still-busy mount (a dying sandbox's namespace) is detached lazily and freed when it goes."""
    if _libc.umount2(str(target).encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # not mounted
        return
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0 and ctypes.get_errno() != errno.EINVAL:
        raise RuntimeFailure(f"cannot unmount volume at {target}: {os.strerror(ctypes.get_errno())}")


def _attached(image: Path) -> bool:
    """Is a loop device still backed by this image (a released mount that a dying sandbox's namespace holds)?"""
    wanted = str(image.resolve())
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip().removesuffix(" (deleted)") == wanted:
                return True
        except OSError:
            continue
    return False


def _wait_detached(image: Path, name: str) -> None:
    """A destroyed writer's mount namespace is freed asynchronously, and until it is the filesystem is still
    mounted there (journal not closed): a new mount now would be EROFS (read-only, the journal needs replay) or
    see unwritten data. So wait, bounded, until the last mount of the image is gone."""
    deadline = time.monotonic() + DETACH_WAIT_S
    while _attached(image):
        if time.monotonic() > deadline:
            raise VolumeInUse(f"volume {name!r} is still being released by a destroyed sandbox; retry shortly")
        time.sleep(0.01)


def _is_mounted(target: Path) -> bool:
    return os.path.ismount(target)


class VolumeStore:
    """Create/list/delete volumes and hand them to sandboxes: `acquire` before a sandbox is built, `release`
    once it is gone. All changes hold a file lock on the store, so servers sharing a home agree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock, open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _dir(self, name: str, tenant: str | None) -> Path:
        """A volume's directory; another tenant's volume is not found (tenant None: the server itself)."""
        path = self.root / check_name(name)
        if not (path / META).is_file() or (tenant is not None and self._tenant(path) != tenant):
            raise VolumeNotFound(f"no volume {name!r}: create it with client.volumes.create({name!r}, size_mb)")
        return path

    def _tenant(self, path: Path) -> str:
        return str(json.loads((path / META).read_text()).get("tenant", ""))

    def _holders(self, path: Path) -> tuple[str, list[str], list[str]]:
        """(mode, holders, the holders that use the host mount); records from before VMs held volumes: all."""
        try:
            data = json.loads((path / HOLDERS).read_text())
            holders = list(data["holders"])
            return str(data["mode"]), holders, list(data.get("hosted", holders))
        except (OSError, ValueError, KeyError):
            return "", [], []

    def _write_holders(self, path: Path, mode: str, holders: list[str], hosted: list[str]) -> None:
        tmp = path / f".{HOLDERS}.tmp"
        tmp.write_text(json.dumps({"mode": mode if holders else "", "holders": holders, "hosted": hosted}))
        os.replace(tmp, path / HOLDERS)

    def _info(self, path: Path) -> VolumeInfo:
        meta = json.loads((path / META).read_text())
        mode, holders, _hosted = self._holders(path)
        return VolumeInfo(meta["name"], int(meta["size_mb"]), float(meta["created_at"]), mode, tuple(holders))

    def create(self, name: str, size_mb: int, tenant: str = "") -> VolumeInfo:
        check_name(name)
        if not MIN_SIZE_MB <= size_mb <= MAX_SIZE_MB:
            raise InvalidSpec(f"volume size_mb must be {MIN_SIZE_MB}..{MAX_SIZE_MB}, got {size_mb}")
        with self._locked():
            path = self.root / name
            if (path / META).is_file():
                raise VolumeExists(f"volume {name!r} exists; delete it first or use another name")
            shutil.rmtree(path, ignore_errors=True)  # a create that died half-way
            staging = self.root / f".{name}.{os.getpid()}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                with open(staging / IMAGE, "wb") as image:
                    image.truncate(size_mb << 20)
                done = subprocess.run(
                    ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0", "-L", name[:16], str(staging / IMAGE)],
                    capture_output=True, text=True, timeout=120,
                )
                if done.returncode != 0:
                    raise RuntimeFailure(f"mkfs.ext4 for volume {name!r} failed: {done.stderr.strip()[-300:]}")
                (staging / MOUNT_DIR).mkdir()
                meta = {"name": name, "size_mb": size_mb, "created_at": time.time(), "tenant": tenant}
                (staging / META).write_text(json.dumps(meta))
                os.replace(staging, path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return self._info(path)

    def get(self, name: str, tenant: str | None = None) -> VolumeInfo:
        return self._info(self._dir(name, tenant))

    def list(self, tenant: str | None = None) -> list[VolumeInfo]:
        return [self._info(p) for p in sorted(self.root.iterdir()) if not p.name.startswith(".") and (p / META).is_file()
                and (tenant is None or self._tenant(p) == tenant)]

    def delete(self, name: str, tenant: str | None = None) -> None:
        with self._locked():
            path = self._dir(name, tenant)
            _mode, holders, _hosted = self._holders(path)
            if holders:
                raise VolumeInUse(f"volume {name!r} is mounted in {', '.join(holders)}: destroy those sandboxes first")
            _umount(path / MOUNT_DIR)
            doomed = self.root / f".{name}.deleted.{os.getpid()}"
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def acquire(self, sandbox_id: str, mounts: list[tuple[str, bool]], tenant: str | None = None,
                substrate: str = "container") -> None:
        """Take each (name, read_only) for a sandbox of `substrate`, mounting it on the host when that sandbox
        uses the host's mount and nobody mounted it yet. One writer or many readers: a conflicting holder is
        VolumeInUse. All or nothing."""
        hosted = mounted_on_host(substrate)
        taken: list[str] = []
        try:
            for name, read_only in mounts:
                self._acquire_one(sandbox_id, name, read_only, tenant, hosted)
                taken.append(name)
        except BaseException:
            for name in taken:
                self._release_one(sandbox_id, name)
            raise

    def _acquire_one(self, sandbox_id: str, name: str, read_only: bool, tenant: str | None, hosted: bool) -> None:
        want = "ro" if read_only else "rw"
        with self._locked():
            path = self._dir(name, tenant)
            mode, holders, users = self._holders(path)
            if holders and (mode == "rw" or want == "rw"):
                raise VolumeInUse(
                    f"volume {name!r} is mounted {'read-write' if mode == 'rw' else 'read-only'} in "
                    f"{', '.join(holders)}; a volume is read-write in one sandbox or read-only in many"
                )
            if not holders:
                _umount(path / MOUNT_DIR)  # a stale mount of another mode
                _wait_detached(path / IMAGE, name)
            if hosted and not users:
                loopdev.mount_image(path / IMAGE, path / MOUNT_DIR, "ext4", read_only=read_only, what=f"volume {name}")
            self._write_holders(path, want, [*holders, sandbox_id], [*users, sandbox_id] if hosted else users)

    def release(self, sandbox_id: str) -> None:
        """Drop this sandbox from every volume it holds (once it is gone); unmount those nobody holds any more."""
        for path in self.root.iterdir():
            if not path.name.startswith(".") and sandbox_id in self._holders(path)[1]:
                self._release_one(sandbox_id, path.name)

    def _release_one(self, sandbox_id: str, name: str) -> None:
        with self._locked():
            path = self.root / name
            if not (path / META).is_file():
                return
            mode, holders, users = self._holders(path)
            if mode == "rw" and sandbox_id in holders and sandbox_id not in users:
                _replay_journal(path / IMAGE)  # a VM's writes: the host mounted nothing meanwhile
            holders = [h for h in holders if h != sandbox_id]
            users = [h for h in users if h != sandbox_id]
            if not users:
                _umount(path / MOUNT_DIR)
            self._write_holders(path, mode, holders, users)

    def recover(self, alive: Callable[[str], bool]) -> list[str]:
        """At server start: forget holders that are gone (`alive` false) and unmount volumes nobody holds.
        Returns the names unmounted."""
        unmounted = []
        with self._locked():
            for path in self.root.iterdir():
                if path.name.startswith(".") and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)  # a create or delete cut short
                    continue
                if not (path / META).is_file():
                    continue
                mode, holders, users = self._holders(path)
                live = [h for h in holders if alive(h)]
                if mode == "rw" and not live and set(holders) - set(users):
                    _replay_journal(path / IMAGE)  # a dead VM writer's
                if not [h for h in users if alive(h)] and _is_mounted(path / MOUNT_DIR):
                    _umount(path / MOUNT_DIR)
                    unmounted.append(path.name)
                if live != holders:
                    self._write_holders(path, mode, live, [h for h in users if alive(h)])
        return unmounted

"""Filesystems that fail on purpose:

- ENOSPC: a small ext4 on a loop device (`small_disk`); fill it.
- EIO: a passthrough FUSE filesystem (`fault_fs`, faultfs.py) that answers EIO to writes, fsyncs and creates
  while a flag file exists. Device-mapper's `error`/`flakey` targets would be the classic tool, but this kernel has
  no device-mapper (no /dev/mapper/control); a loop device over a full sparse backing file reports ENOSPC, not EIO.

Every loop device, mount and FUSE process is removed at teardown, also when the test failed half-way.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _run(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout.strip()


def _fill(path: Path, leave_bytes: int = 0) -> Path:
    """A file taking all free space of `path`'s filesystem but `leave_bytes`; delete it to free the space."""
    with open(path, "wb") as out:
        chunk = bytes(1 << 20)
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError:
            pass
    if leave_bytes:
        with open(path, "r+b") as out:
            out.truncate(max(0, path.stat().st_size - leave_bytes))
    return path


class FaultyDisk:
    """An ext4 of `size_mb` mounted at `mount` on a loop device."""

    def __init__(self, workdir: Path, size_mb: int) -> None:
        self.size_mb = size_mb
        self.image = workdir / "disk.img"
        self.mount = workdir / "mnt"
        self.loop = ""
        self.mounted = False

    def setup(self) -> FaultyDisk:
        """Make image, loop device and filesystem; `remove()` undoes whatever part of it was done."""
        self.mount.mkdir()
        with open(self.image, "wb") as image:
            image.truncate(self.size_mb << 20)
        self.loop = _run("losetup", "--find", "--show", str(self.image))
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=0", self.loop)
        self.mount_fs()
        return self

    def mount_fs(self) -> None:
        _run("mount", "-t", "ext4", "-o", "errors=continue", self.loop, str(self.mount))
        self.mounted = True

    def unmount_fs(self) -> None:
        if self.mounted:
            if subprocess.run(["umount", str(self.mount)], capture_output=True, check=False).returncode != 0:
                _run("umount", "-l", str(self.mount), check=False)
            self.mounted = False

    def fill(self, leave_bytes: int = 0) -> Path:
        """ENOSPC: fill the ext4 itself."""
        return _fill(self.mount / "filler", leave_bytes)

    def remove(self) -> None:
        self.unmount_fs()
        if self.loop:
            _run("losetup", "-d", self.loop, check=False)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[FaultyDisk]:
    """A 16 MB ext4 on a loop device: fill it for ENOSPC."""
    disk = FaultyDisk(tmp_path, 16)
    try:
        yield disk.setup()
    finally:
        disk.remove()


class FaultFS:
    """A directory served by faultfs.py (a passthrough FUSE process): `fail_io()` makes writes and fsyncs EIO."""

    def __init__(self, workdir: Path) -> None:
        self.source = workdir / "source"
        self.mount = workdir / "fuse"
        self.flag = workdir / "fail"
        self.process: subprocess.Popen | None = None

    def setup(self) -> FaultFS:
        self.source.mkdir()
        self.mount.mkdir()
        script = Path(__file__).with_name("faultfs.py")
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(self.source), str(self.mount), str(self.flag)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self._mounted():
            if self.process.poll() is not None:
                raise RuntimeError(f"faultfs exited: {self.process.stderr.read().decode(errors='replace')[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("faultfs did not mount within 30 s")
            time.sleep(0.05)
        return self

    def _mounted(self) -> bool:
        return any(f" {self.mount} " in line for line in Path("/proc/self/mountinfo").read_text().splitlines())

    def fail_io(self) -> None:
        self.flag.touch()

    def heal(self) -> None:
        self.flag.unlink(missing_ok=True)

    def remove(self) -> None:
        if self._mounted():
            _run("umount", str(self.mount), check=False)
            if self._mounted():
                _run("umount", "-l", str(self.mount), check=False)
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def fault_fs(tmp_path) -> Iterator[FaultFS]:
    fs = FaultFS(tmp_path)
    try:
        yield fs.setup()
    finally:
        fs.remove()

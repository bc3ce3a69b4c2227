"""Spare disks (spares.py): a create takes a ready one, fresh and its own; a dead process's spares are removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dsec.config import ServerConfig
from dsec.models import SandboxSpec
from dsec.substrates.container import rootfs, spares, volatile
from dsec.substrates.container.disk import template
from dsec.substrates.container.driver import container_driver

from .conftest import new_id, sh

READY_TIMEOUT_S = 120.0


def _wait_ready(pool: spares.SpareDisks, size_mb: int) -> None:
    """Until the background maker has `spares.SPARES` of this size (it works only while no create runs)."""
    with pool._cond:
        made = pool._cond.wait_for(lambda: len(pool._ready.get(size_mb, ())) >= spares.SPARES, READY_TIMEOUT_S)
    assert made, "spare disks were not made"


def _loop_backing(mount_point: str) -> str:
    """The backing file of the loop device mounted on `mount_point`."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            if before.split(" ")[4] == mount_point:
                device = after.split(" ")[1].removeprefix("/dev/")
                return Path(f"/sys/block/{device}/loop/backing_file").read_text().strip()
    raise AssertionError(f"nothing is mounted on {mount_point}")


@pytest.mark.timeout(240)
def test_a_create_takes_a_fresh_spare_disk_of_its_own(driver, busybox_image, tmp_path, monkeypatch):
    first = driver.create(new_id(), SandboxSpec(), busybox_image, tmp_path / "first")  # asks for the size
    pool = spares.for_home(driver.config.home, driver.disk_templates)
    size_mb = SandboxSpec().resources.disk_mb
    sh(first, "echo secret > /root/left-behind")
    driver.destroy(first)
    _wait_ready(pool, size_mb)
    taken: list[bool] = []
    take = pool.take
    monkeypatch.setattr(pool, "take", lambda *args: taken.append(take(*args)) or taken[-1])
    sb = driver.create(new_id(), SandboxSpec(), busybox_image, tmp_path / "second")
    try:
        assert taken == [True], "the disk was a spare, not made for this create"
        assert _loop_backing(sb.record.disk) == sb.record.disk_image, "the loop device follows the renamed image"
        assert Path(sb.record.disk_image).parent == tmp_path / "second"
        assert sh(sb, "ls /root; echo end") == "end\n", "a spare was never any sandbox's"
        assert sh(sb, "echo hi > /tmp/x && cat /tmp/x") == "hi\n"
    finally:
        driver.destroy(sb)
    assert not rootfs.is_mounted(Path(sb.record.disk))


CHILD = """
import sys, time
from pathlib import Path
from dsec.substrates.container import spares
pool = spares.SpareDisks(Path(sys.argv[1]), Path(sys.argv[2]))
pool.take(int(sys.argv[3]), Path(sys.argv[1]) / "unused.img", Path(sys.argv[1]) / "unused")  # asks for the size
with pool._cond:
    while len(pool._ready.get(int(sys.argv[3]), ())) < spares.SPARES:
        pool._cond.wait()
print(pool.owner, flush=True)
time.sleep(3600)
"""


def _killed_owner(tmp_path: Path, while_alive=lambda mounts: None) -> tuple[Path, str, Path]:
    """A child process that made its spares on a fresh home, killed with SIGKILL once `while_alive(mounts)` ran;
    returns (home, owner, the owner's mount dir), its spares still mounted."""
    home, templates, size_mb = tmp_path / "home", tmp_path / "templates", 64
    template(templates, size_mb)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(home), str(templates), str(size_mb)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        owner = child.stdout.readline().strip()
        assert owner, "the child made its spares"
        mounts = volatile.home_root(home) / "spare-disks" / owner
        assert len(rootfs.mounts_under(mounts)) == spares.SPARES
        while_alive(mounts)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert len(rootfs.mounts_under(mounts)) == spares.SPARES, "kill -9 leaves them mounted"
    return home, owner, mounts


@pytest.mark.timeout(240)
def test_the_spares_of_a_killed_process_are_removed_by_the_next(tmp_path):
    home, owner, mounts = _killed_owner(tmp_path)
    container_driver("crun", ServerConfig(home=home))  # a server starting on the home: its driver reaps them
    assert rootfs.mounts_under(mounts) == [], "a dead owner's spares are unmounted"
    assert not mounts.exists() and not (home / "spare-disks" / owner).exists()


def test_a_live_owner_is_left_alone_before_it_has_locked(tmp_path):
    """The window between an owner making its lock file and locking it: a reaper must not take the lock (the
    owner's own LOCK_NB then failed its create with BlockingIOError) nor remove the live owner's spares."""
    home = tmp_path / "home"
    owner = home / "spare-disks" / f"{os.getpid()}-0123abcd"
    owner.mkdir(parents=True)
    (owner / spares.LOCK).touch()  # made, not locked yet
    spares.reap_dead_owners(home)
    assert (owner / spares.LOCK).exists(), "a live process's owner dir was removed"
    pool = spares.SpareDisks(home, tmp_path / "templates")  # a second owner of the same process starts meanwhile
    try:
        assert (owner / spares.LOCK).exists()
    finally:
        pool.close()


@pytest.mark.timeout(240)
def test_spares_are_kept_for_the_most_recently_asked_sizes_only(tmp_path):
    home, templates = tmp_path / "home", tmp_path / "templates"
    pool = spares.SpareDisks(home, templates)
    try:
        for size_mb in (32, 48, 64):  # three sizes asked: the first one's spares go
            assert not pool.take(size_mb, tmp_path / f"{size_mb}.img", tmp_path / f"{size_mb}")
            with pool._cond:
                assert pool._cond.wait_for(lambda s=size_mb: len(pool._ready.get(s, ())) >= spares.SPARES, 120)
        with pool._cond:
            assert pool._cond.wait_for(lambda: not pool._retired and not pool._filling, 120)
            assert sorted(pool._ready) == [48, 64]
        assert len(rootfs.mounts_under(pool.mounts / pool.owner)) == spares.SIZES * spares.SPARES
    finally:
        pool.close()
    assert rootfs.mounts_under(pool.mounts / pool.owner) == []


@pytest.mark.timeout(240)
def test_a_killed_process_s_spares_are_removed_by_a_server_of_another_home(tmp_path):
    """A home nobody serves again (a test's temporary one) must not keep a killed process's mounts and loop
    devices: the orphan sweep of any server's start, on any home, removes them."""
    from dsec.server import orphans

    def a_live_owner_s_stay(mounts: Path) -> None:
        assert str(mounts) not in spares.reap_dead_owners_on_host()
        assert len(rootfs.mounts_under(mounts)) == spares.SPARES

    _, _, mounts = _killed_owner(tmp_path, a_live_owner_s_stay)
    found = orphans.sweep(tmp_path / "another-home" / "run")
    assert str(mounts) in found.spare_disks
    assert rootfs.mounts_under(mounts) == [] and not mounts.exists(), "a dead owner's spares are unmounted"

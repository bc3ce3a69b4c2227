"""The tmpfs directories of container runtime files (dsec/substrates/container/volatile.py): each says whose home
it is, and the orphan sweep removes those of homes that no longer exist, never what a sandbox may still use."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from dsec.substrates.container import volatile
from dsec.substrates.container.rootfs import is_mounted
from dsec.substrates.container.sweep import Cgroups

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting the tmpfs needs root")


def _live() -> set[str]:
    """The ids with a cgroup on this machine, as the orphan sweep passes them (other tests' sandboxes stay safe)."""
    return Cgroups.ids()


@pytest.fixture
def gone_home(tmp_path: Path) -> tuple[Path, Path]:
    """A home whose tmpfs directory exists with one sandbox's files, then the home itself removed."""
    home = tmp_path / "home"
    home.mkdir()
    root = volatile.home_root(home)
    assert is_mounted(volatile.VOLATILE_ROOT) and root.parent == volatile.VOLATILE_ROOT
    (volatile.sandbox_dir(home, "sb-gone") / "agent-run").mkdir(parents=True)
    (volatile.runtime_root(home, "crun") / "sb-gone").mkdir(parents=True)
    shutil.rmtree(home)
    yield home, root
    subprocess.run(["umount", "-l", str(root / "sandboxes" / "sb-gone" / "agent-run")], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def test_a_homes_directory_names_its_home(tmp_path: Path) -> None:
    root = volatile.home_root(tmp_path)
    try:
        assert (root / volatile.HOME_FILE).read_text() == os.path.realpath(tmp_path)
        assert str(root) not in volatile.sweep_deleted_homes(_live())  # its home is there
        assert root.is_dir()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_removed_homes_directory_goes_once_no_sandbox_of_it_runs(gone_home) -> None:
    _, root = gone_home
    assert str(root) not in volatile.sweep_deleted_homes(_live() | {"sb-gone"})  # its cgroup is still there
    assert root.is_dir()
    assert str(root) in volatile.sweep_deleted_homes(_live())
    assert not root.exists()


def test_nothing_mounted_below_is_ever_removed(gone_home) -> None:
    _, root = gone_home
    mount_point = root / "sandboxes" / "sb-gone" / "agent-run"
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount_point)], check=True)
    assert str(root) not in volatile.sweep_deleted_homes(_live())
    assert mount_point.is_dir()
    subprocess.run(["umount", str(mount_point)], check=True)
    assert str(root) in volatile.sweep_deleted_homes(_live())


def test_an_unnamed_directory_goes_only_empty_and_old() -> None:
    """A directory from before the `home` file: nobody can say whose it is, so only a bare, old skeleton goes."""
    root = volatile.VOLATILE_ROOT / f"test-{secrets.token_hex(6)}"
    for sub in ("oci/crun/.cache/seccomp", "sandboxes", "spare-disks"):
        (root / sub).mkdir(parents=True)
    (root / "oci/crun/.cache/seccomp/filter").write_bytes(b"crun's own cache: no container")
    try:
        assert str(root) not in volatile.sweep_deleted_homes(_live())  # too recent
        old = root.stat().st_mtime - volatile.UNNAMED_GRACE_S - 1
        for what in (root / "spare-disks" / "123-owner", root / "sandboxes" / "sb-x", root / "oci" / "crun" / "sb-x"):
            what.mkdir()  # a (maybe live) process's spare disks, a sandbox's files, a runtime's container state
            os.utime(root, (old, old))
            assert str(root) not in volatile.sweep_deleted_homes(_live())
            what.rmdir()
        (root / "stray.log").write_text("any file at all")
        os.utime(root, (old, old))
        assert str(root) not in volatile.sweep_deleted_homes(_live())
        (root / "stray.log").unlink()
        os.utime(root, (old, old))
        assert str(root) in volatile.sweep_deleted_homes(_live())
        assert not root.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""Pause/resume through the freezer cgroup, and filesystem snapshots restored into new sandboxes."""

from __future__ import annotations

import time

import pytest

from dsec.errors import SnapshotNotFound
from dsec.models import SandboxSpec
from dsec.substrates.container import cgroups
from dsec.substrates.container.driver import container_driver

from .conftest import PATH, new_id, run, sh

COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.02; done"


def count(sb) -> int:
    """The counter, read on the host from the writable layer (the agent is frozen along with the sandbox)."""
    try:
        return int((sb.upper_dir / "tmp/count").read_text().strip() or 0)
    except FileNotFoundError:
        return 0


@pytest.mark.timeout(120)
def test_pause_freezes_and_resume_keeps_process_state(make_sandbox):
    sb = make_sandbox()
    reader = sb.spawn(["sh", "-c", "read line; echo got $line; cat /tmp/note"], {"PATH": PATH}, "/", stdin=True)
    sh(sb, "echo kept > /tmp/note")
    counter = sb.spawn(["sh", "-c", COUNTER], {"PATH": PATH}, "/")
    deadline = time.monotonic() + 30
    while count(sb) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    sb.pause()
    assert cgroups.is_frozen(sb.record.cgroups_path) and sb.is_paused()
    before = count(sb)
    time.sleep(0.3)
    assert count(sb) == before, "nothing runs while paused"
    sb.resume()
    assert not sb.is_paused()
    reader.write_stdin(b"hello\n")
    reader.close_stdin()
    out = b"".join(e.data for e in reader.events() if hasattr(e, "data"))
    assert out == b"got hello\nkept\n", "a process started before the pause carries on"
    deadline = time.monotonic() + 30
    while count(sb) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert count(sb) > before, "the counter runs again"
    counter.signal(9)


@pytest.mark.timeout(120)
def test_a_paused_sandbox_is_destroyed_cleanly(driver, busybox_image, tmp_path):
    sandbox_id = new_id()
    sb = driver.create(sandbox_id, SandboxSpec(), busybox_image, tmp_path / sandbox_id)
    sb.spawn(["sleep", "600"], {"PATH": PATH}, "/")
    sb.pause()
    driver.destroy(sb)
    assert cgroups.existing_dirs(f"/dsec/{sandbox_id}") == []
    assert sandbox_id not in driver.runtime.list()


@pytest.mark.timeout(180)
def test_snapshot_and_restore_preserve_files_and_deletions(driver, make_sandbox, busybox_image, config, tmp_path):
    sb = make_sandbox()
    sh(sb, "mkdir -p /root/work && echo data > /root/work/file && rm /bin/vi && echo changed > /etc/layer")
    sb.pause()
    assert sb.snapshot(tmp_path / "snap") == "filesystem"
    assert sb.is_paused(), "a paused sandbox stays paused across a snapshot"
    sb.resume()
    sh(sb, "echo after > /root/work/file")
    other = container_driver("runc" if driver.name == "crun" else "crun", config)
    for restorer in (driver, other):  # the archive is runtime-neutral
        sandbox_id = new_id()
        restored = restorer.restore(sandbox_id, SandboxSpec(), busybox_image, tmp_path / "snap", tmp_path / sandbox_id)
        try:
            assert sh(restored, "cat /root/work/file") == "data\n"
            assert sh(restored, "cat /etc/layer") == "changed\n"
            _, _, exited = run(restored, ["ls", "/bin/vi"])
            assert exited.exit_code != 0, "a deletion (overlay whiteout) survives the snapshot"
            assert sh(restored, "hostname") == sandbox_id + "\n"
        finally:
            restorer.destroy(restored)
    assert sh(sb, "cat /root/work/file") == "after\n", "the original is untouched"


@pytest.mark.timeout(60)
def test_restore_from_a_non_filesystem_snapshot_is_a_typed_error(driver, busybox_image, tmp_path):
    (tmp_path / "snap").mkdir()
    with pytest.raises(SnapshotNotFound):
        driver.restore(new_id(), SandboxSpec(), busybox_image, tmp_path / "snap", tmp_path / "sb")
    assert not (tmp_path / "sb").exists()

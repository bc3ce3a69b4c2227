"""cgroup2 `favordynmods`: what `make setup` turns on so a container's cgroup migration does not wait for RCU.

The remount itself is checked on this host by `make setup` (which runs before the suite and prints what it
changed) and its effect by bench/sandbox_latency.py (`cgroup_migrate_p50_ms`); these tests check what is remounted
with which options, without flipping the host's flag mid-suite (the module says why that is unsafe)."""

from __future__ import annotations

import pytest

from dsec.substrates.container import cgroup_tuning

HYBRID = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime{extra} 0 0
"""


def test_reads_cgroup2_mounts_and_their_options() -> None:
    text = HYBRID.format(extra=",nsdelegate") + "none /run/my\\040cgroup cgroup2 rw,favordynmods 0 0\n"
    assert cgroup_tuning.cgroup2_mounts(text) == {
        "/sys/fs/cgroup/unified": ["rw", "relatime", "nsdelegate"],
        "/run/my cgroup": ["rw", "favordynmods"],
    }


def test_state_is_on_only_when_every_cgroup2_mount_has_the_option() -> None:
    assert cgroup_tuning.state(HYBRID.format(extra=",favordynmods")) == "on"
    assert cgroup_tuning.state(HYBRID.format(extra="")) == "off"
    assert cgroup_tuning.state(HYBRID.format(extra=",favordynmods") + "x /y cgroup2 rw 0 0\n") == "off"
    assert cgroup_tuning.state("cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n") == "none"


@pytest.fixture
def mounts(tmp_path, monkeypatch):
    """/proc/mounts replaced by a file, and every mount call recorded instead of made."""
    path = tmp_path / "mounts"
    calls: list[tuple] = []
    monkeypatch.setattr(cgroup_tuning, "MOUNTS", path)
    monkeypatch.setattr(cgroup_tuning, "_mount", lambda *args: calls.append(("mount", *args)))
    monkeypatch.setattr(cgroup_tuning, "_umount", lambda target: calls.append(("umount", target)))
    return path, calls


def test_a_mount_without_it_is_remounted_keeping_its_superblock_options(mounts) -> None:
    path, calls = mounts
    path.write_text(HYBRID.format(extra=",nsdelegate,memory_recursiveprot"))
    assert cgroup_tuning.apply() == "cgroup2: favordynmods on for /sys/fs/cgroup/unified"
    assert calls == [("mount", "none", "/sys/fs/cgroup/unified", "cgroup2", cgroup_tuning.MS_REMOUNT,
                      "nsdelegate,memory_recursiveprot,favordynmods")]


def test_nothing_is_remounted_where_it_is_on(mounts) -> None:
    path, calls = mounts
    path.write_text(HYBRID.format(extra=",favordynmods"))
    assert cgroup_tuning.apply() == "cgroup2: favordynmods already on"
    assert calls == []


def test_with_no_cgroup2_mounted_one_is_mounted_with_it_and_unmounted(mounts) -> None:
    path, calls = mounts
    path.write_text("cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n")
    assert "temporary mount" in cgroup_tuning.apply()
    (kind, source, target, fstype, flags, data), (undo, undone) = calls
    assert (kind, source, fstype, flags, data) == ("mount", "cgroup2", "cgroup2", 0, "favordynmods")
    assert (undo, undone) == ("umount", target)


def test_setup_says_so_when_the_kernel_refuses(mounts, monkeypatch, capsys) -> None:
    path, _ = mounts
    path.write_text(HYBRID.format(extra=""))

    def refused(*args) -> None:
        raise OSError(22, "mount cgroup2 on /sys/fs/cgroup/unified (favordynmods): Invalid argument")

    monkeypatch.setattr(cgroup_tuning, "_mount", refused)
    assert cgroup_tuning.main() == 0  # setup goes on: creates work, only slower
    assert "could not set cgroup2 favordynmods" in capsys.readouterr().err

"""cgroup2 `favordynmods`: what `make setup` turns on so a container's cgroup migration does not wait for RCU."""

from __future__ import annotations

import logging
import os
import platform

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


def test_a_driver_built_where_it_is_off_warns_once(tmp_path, monkeypatch, caplog) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(HYBRID.format(extra=""))
    monkeypatch.setattr(cgroup_tuning, "MOUNTS", mounts)
    monkeypatch.setattr(cgroup_tuning, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="dsec.container"):
        cgroup_tuning.warn_if_slow_migrations()
        cgroup_tuning.warn_if_slow_migrations()
    warnings = [r for r in caplog.records if "favordynmods" in r.getMessage()]
    assert len(warnings) == 1 and "make setup" in warnings[0].getMessage()


def _kernel_at_least(major: int, minor: int) -> bool:
    numbers = platform.release().split("-")[0].split(".")
    return (int(numbers[0]), int(numbers[1])) >= (major, minor)


@pytest.mark.skipif(not _kernel_at_least(6, 0), reason="favordynmods needs Linux >= 6.0; this kernel is older")
def test_setup_left_it_on_here_and_applying_again_changes_nothing() -> None:
    assert os.geteuid() == 0
    assert cgroup_tuning.state() == "on", "make setup (infra/setup.d/30-container.sh) turns favordynmods on"
    before = cgroup_tuning.cgroup2_mounts(cgroup_tuning.MOUNTS.read_text())
    assert cgroup_tuning.apply().endswith("already on")
    assert cgroup_tuning.cgroup2_mounts(cgroup_tuning.MOUNTS.read_text()) == before

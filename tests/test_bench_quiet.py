"""bench/quiet.py: a timed sample waits for the machine to go quiet, never longer than the cap."""

from __future__ import annotations

import subprocess
import sys

from bench import quiet


def test_the_wait_is_reported_and_bounded_by_the_cap() -> None:
    waited = quiet.wait_quiet(cap_s=0.5)
    assert 0.0 < waited < 0.5 + 1.0  # bounded: the last window may run past the cap on a loaded machine


def test_a_busy_machine_is_waited_on_up_to_the_cap() -> None:
    if quiet._CLOCK is None:  # no cgroup CPU clock on this host: the fixed pause is the whole wait
        assert quiet.wait_quiet() >= quiet.FALLBACK_PAUSE_S
        return
    # the child prints once it spins; from then on it alone keeps the CPUs over 5 % busy
    spinner = subprocess.Popen([sys.executable, "-c", "print(flush=True)\nwhile True: pass"], stdout=subprocess.PIPE)
    try:
        assert spinner.stdout is not None and spinner.stdout.readline() == b"\n"
        assert quiet.wait_quiet(cap_s=0.05) >= 0.05
    finally:
        spinner.kill()
        spinner.wait()

"""A server's run directory (state.claim_run_dir) is never seen unlocked by another server's reaper: claims made
while reapers of the same home run (reap_dead_servers, readopt.take_over) all succeed and keep their directory
and lock; a claim whose process died before it was renamed into place is removed, a live one is not touched."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from dsec.server.lifetimes import _server_alive
from dsec.server.readopt import take_over
from dsec.server.state import CLAIMING, claim_run_dir, reap_dead_servers, run_dirs


def test_claims_made_while_reapers_run_keep_their_dir_and_lock(tmp_path):
    run_root = tmp_path / "run"
    run_root.mkdir()
    stop, errors = threading.Event(), []

    def reaper(which: int) -> None:
        try:
            while not stop.is_set():
                if which:
                    reap_dead_servers(run_root, lambda driver, path: None)
                else:
                    held, _, _ = take_over(run_root, tmp_path / "none", set(), lambda r, d: None, lambda d, p: None)
                    for state in held:  # a dead server's dir taken over: released at once, as after its sandboxes
                        state.release()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    reapers = [threading.Thread(target=reaper, args=(i,)) for i in (0, 1)]
    for thread in reapers:
        thread.start()
    claims = []
    try:
        for _ in range(300):
            claims.append(claim_run_dir(run_root))  # raised BlockingIOError when a reaper probed the new lock
    finally:
        stop.set()
        for thread in reapers:
            thread.join()
    assert errors == []
    for state in claims:
        assert (state.run_dir / "server.lock").exists(), f"{state.run_dir} was reaped while its server lived"
        assert _server_alive(state.run_dir)
        state.release()


def test_a_claim_cut_by_a_crash_is_removed_and_a_live_one_is_left(tmp_path):
    run_root = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()  # a pid that has exited
    cut = run_root / f"{CLAIMING}{dead}-0123456789ab"
    live = run_root / f"{CLAIMING}{os.getpid()}-ba9876543210"
    for path in (cut, live):
        path.mkdir(parents=True)
        (path / "server.lock").touch()
    claimed = claim_run_dir(run_root)
    assert run_dirs(run_root) == [claimed.run_dir]  # claiming dirs are nobody's run dir yet
    assert not cut.exists() and live.exists()
    claimed.release()
    assert not Path(claimed.run_dir).exists()

"""Trajectory log benchmark: durable append throughput, replay speed, and the crash suite at scale.

  durable_appends_per_s   concurrent rollouts (threads) each logging intent + result records through the file
                          log; every append is fsynced before it returns (group commit)
  fsyncs_per_append       fdatasync calls per durable append in that run (1.0 = no batching)
  replay_10k_steps_s      a resumed 10,000-step trajectory: StepCoordinator.run_once for every step, each
                          answered from the log without executing
  double_executions       crash suite: kill -9 the log owner (the worker process that holds the FileLog and runs
                          the StepCoordinator; never the client) at --kills random points, restart, audit; every
                          execution of a step's effect counts, re-runs in forks included (dsec/trajectory/crashsuite.py)
  lost_records            acknowledged records missing or altered after the restarts
  killed                  which process the crash suite kills: log_owner
The last line is key=value pairs.

Usage: .venv/bin/python -m bench.trajectory_log [--threads 64] [--appends 40000] [--kills 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from dsec.trajectory.coordinator import StepCoordinator
from dsec.trajectory.crashsuite import KILLED_PROCESS, run_crash_suite
from dsec.trajectory.filelog import FileLog
from dsec.trajectory.log import StepRef

from bench.harness import report


def durable_appends(directory: Path, threads: int, appends: int) -> tuple[float, float]:
    """(appends per second, fsyncs per append) with `threads` concurrent writers."""
    per_thread = max(1, appends // (2 * threads))
    result = b"r" * 256
    with FileLog(directory) as log:
        def writer(index: int) -> None:
            trajectory = f"bench/{index}"
            for step in range(per_thread):
                log.begin(StepRef(trajectory, step, "h", "exec", "sb"))
                log.complete(StepRef(trajectory, step, "h", "exec", "sb"), result, 0.0, 0.0)

        workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        stats = log.stats()
    return stats.appends / elapsed, stats.fsyncs / stats.appends


def replay(directory: Path, steps: int) -> float:
    """Seconds to resume a `steps`-long trajectory entirely from the log, after reopening it."""
    with FileLog(directory) as log:
        coordinator = StepCoordinator(log)
        for step in range(steps):
            coordinator.run_once(StepRef("replay", step, f"h{step}", "exec", "sb"), lambda: b"o" * 512)
    with FileLog(directory) as log:
        coordinator = StepCoordinator(log)
        started = time.perf_counter()
        for step in range(steps):
            _, replayed = coordinator.run_once(StepRef("replay", step, f"h{step}", "exec", "sb"), lambda: b"never")
            assert replayed
        elapsed = time.perf_counter() - started
        assert coordinator.executions == 0
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--appends", type=int, default=40000)
    parser.add_argument("--kills", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dsec-bench-trajectory-") as tmp:
        root = Path(tmp)
        rate, fsyncs = durable_appends(root / "appends", args.threads, args.appends)
        print(f"durable appends: {rate:,.0f}/s with {args.threads} writers, {fsyncs:.4f} fsyncs per append", flush=True)
        replay_s = replay(root / "replay", 10_000)
        print(f"replay of 10,000 logged steps: {replay_s:.3f} s", flush=True)
        started = time.perf_counter()
        print(f"crash suite: kill -9 of the {KILLED_PROCESS}", flush=True)
        suite = run_crash_suite(root / "crash", kills=args.kills, seed=1)
        print(
            f"crash suite: {suite.kills} kills of the log owner, {suite.restarts} starts, "
            f"{suite.acked} acknowledged, "
            f"{suite.executions} effect executions, {suite.indeterminate} indeterminate steps reported "
            f"({suite.resolved_from_effect} resolved from their effect, "
            "the rest re-run: their effect never happened), "
            f"{suite.torn_tails_injected} torn tails injected ({suite.torn_bytes_truncated} bytes truncated), "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        for problem in suite.problems[:10]:
            print("PROBLEM:", problem, flush=True)
    report({"durable_appends_per_s": f"{rate:.0f}", "fsyncs_per_append": f"{fsyncs:.4f}",
            "replay_10k_steps_s": f"{replay_s:.3f}", "double_executions": suite.double_executions,
            "lost_records": suite.lost_records, "killed": "log_owner"})
    ok = suite.double_executions == 0 and suite.lost_records == 0 and not suite.problems
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Crash suite for the log itself: kill -9 a process that runs logged steps at random points, restart it,
and check that no acknowledged record was lost and no step ran twice.

The worker is a step server in miniature: the real StepCoordinator over the real log, with a durable side
effect per execution (an fsynced line in a host file, standing in for a sandbox mutation, which would die
with a real server's sandboxes). It prints ``ACK trajectory step crc`` only after `run_once` returned, i.e.
after the result was durable — exactly what a client would have seen. The driver kills it, sometimes appends
a torn half-record to the log tail, restarts it, and finally audits the log against the ACKs and effects.
Used by tests/trajectory (few kills) and bench/trajectory_log.py (many).

The process killed is the log owner (`KILLED_PROCESS`): the worker holding the FileLog and the coordinator. The
driver, standing in for the client, is never killed.

`double_executions` comes from the effects themselves, not from the coordinator's bookkeeping: every execution
appends `<rollout> <step> <ran-in> <crc>` where `<rollout>` is the trajectory id without fork suffixes, so a
step's effect re-run in a fork (`id~`) counts against the same step as its first run. An indeterminate step (a
kill between the effect and its result record) is recovered as an operator would: no effect → `rerun_step`;
effect present → by default ("resolve") its result is read back from the effect and logged, so the step never
runs twice; `recovery="fork"` instead continues in a fork that runs the step again, which the count shows.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from dsec.errors import StepIndeterminate
from dsec.trajectory.coordinator import StepCoordinator
from dsec.trajectory.filelog import FileLog
from dsec.trajectory.log import StepRef
from dsec.trajectory.records import Record, RecordType, StepState

WORKER_START_TIMEOUT_S = 60.0
KILLED_PROCESS = "log owner (the worker process holding the FileLog and the StepCoordinator; the client is not killed)"
RECOVERIES = ("resolve", "fork")


def _payload(trajectory: str, step: int) -> bytes:
    """A deterministic result, sometimes large so a kill can land mid-write."""
    size = 64 if step % 7 else 48 << 10
    seed = f"{trajectory}/{step}/".encode()
    return (seed * (size // len(seed) + 1))[:size]


def _current_id(log: FileLog, trajectory: str) -> str:
    """The trajectory's latest fork (`id~`, `id~~`, …): where an operator moved it past an unknown step."""
    forks = [t.trajectory_id for t in log.list(trajectory) if t.trajectory_id.rstrip("~") == trajectory]
    return max(forks, key=len, default=trajectory)


def _rollout(trajectory_id: str) -> str:
    """The rollout a trajectory id belongs to: forks (`id~`, `id~~`) run the same steps of the same rollout."""
    return trajectory_id.rstrip("~")


def _effect_crc(effects: Path, rollout: str, step: int) -> int | None:
    """The result crc the step's (first) effect recorded, None if the step's effect never happened."""
    if not effects.exists():
        return None
    for line in effects.read_text().splitlines():
        parts = line.split()
        if parts[0] == rollout and int(parts[1]) == step:
            return int(parts[3])
    return None


def _worker(
    log_dir: Path,
    effects: Path,
    prefix: str,
    trajectories: int,
    steps: int,
    step_delay_s: float,
    recovery: str = "resolve",
    crash_after_effect: int = -1,
    double_effect: int = -1,
) -> None:
    """`crash_after_effect`/`double_effect`: step numbers of the first trajectory at which this process kills
    itself right after the effect (a kill at that exact protocol point) or writes the effect twice (the fault a
    test injects to prove the count sees it)."""
    log = FileLog(log_dir)
    print(f"OPEN torn={log.stats().torn_bytes_truncated}", flush=True)
    coordinator = StepCoordinator(log)
    effects_fd = os.open(effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            print(line, flush=True)

    first = f"{prefix}/0"

    def run(trajectory: str) -> None:
        current = _current_id(log, trajectory)
        step = 0
        while step < steps:
            def execute(current: str = current, step: int = step) -> bytes:
                time.sleep(step_delay_s)  # the command's own run time: widens the window a kill can hit
                result = _payload(trajectory, step)
                line = f"{trajectory} {step} {current} {zlib.crc32(result)}\n".encode()
                for _ in range(2 if trajectory == first and step == double_effect else 1):
                    os.write(effects_fd, line)
                os.fsync(effects_fd)
                if trajectory == first and step == crash_after_effect:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            try:
                result, _ = coordinator.run_once(StepRef(current, step, f"h{step}", "exec", "sb"), execute)
            except StepIndeterminate:
                # What an operator does: look at the sandbox. No effect → safe to run again; effect present →
                # never run it twice here; continue in a fork that shares the steps before it.
                say(f"INDET {current} {step}")
                with out_lock:
                    effect_crc = _effect_crc(effects, trajectory, step)
                if effect_crc is None:
                    coordinator.rerun_step(current, step)
                elif recovery == "fork":
                    log.fork(current, step, current + "~")
                    current += "~"
                else:
                    # the effect holds the result (as a sandbox holds a command's output): log it, never re-run
                    result = _payload(trajectory, step)
                    if zlib.crc32(result) != effect_crc:
                        raise RuntimeError(f"{current} step {step}: the effect's result does not match its record")
                    now = time.time()
                    log.complete(StepRef(current, step, f"h{step}", "exec", "sb"), result, now, now)
                    say(f"RESOLVED {current} {step}")
                continue
            say(f"ACK {current} {step} {zlib.crc32(result)}")
            step += 1
        say(f"DONE {trajectory}")

    threads = [threading.Thread(target=run, args=(f"{prefix}/{t}",)) for t in range(trajectories)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"FINISHED executions={coordinator.executions}", flush=True)
    log.close()


@dataclass
class CrashReport:
    kills: int = 0
    restarts: int = 0
    torn_tails_injected: int = 0
    torn_bytes_truncated: int = 0
    acked: int = 0
    lost_records: int = 0
    double_executions: int = 0
    indeterminate: int = 0
    resolved_from_effect: int = 0  # indeterminate steps whose effect had happened: result logged, not re-run
    executions: int = 0
    problems: list[str] = field(default_factory=list)


def run_crash_suite(
    workdir: Path,
    kills: int,
    trajectories: int = 4,
    steps: int = 50,
    seed: int = 0,
    step_delay_s: float = 0.002,
    max_delay_s: float = 0.5,
    recovery: str = "resolve",
    crash_after_effect: int = -1,
    double_effect: int = -1,
) -> CrashReport:
    """Kill the worker `kills` times at random moments (new rounds of rollouts start when one completes),
    let the last round finish, and audit the log against what was acknowledged and what ran.

    `crash_after_effect` / `double_effect` (steps of the first round's first trajectory, -1 = off) inject a kill
    right after that step's effect in the first worker, or a doubled effect, deterministically."""
    if recovery not in RECOVERIES:
        raise ValueError(f"recovery must be one of {RECOVERIES}, got {recovery!r}")
    rng = random.Random(seed)
    log_dir, effects = workdir / "log", workdir / "effects.txt"
    report = CrashReport()
    acks: dict[tuple[str, int], int] = {}
    round_number = 0
    while True:
        kill_now = report.kills < kills
        process = subprocess.Popen(
            [sys.executable, "-m", "dsec.trajectory.crashsuite", "worker", str(log_dir), str(effects),
             f"crash/r{round_number}", str(trajectories), str(steps), str(step_delay_s), "--recovery", recovery,
             "--crash-after-effect", str(crash_after_effect if report.restarts == 0 else -1),
             "--double-effect", str(double_effect if round_number == 0 else -1)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        report.restarts += 1
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        if kill_now:
            _wait_open(lines)
            time.sleep(rng.uniform(0.0, max_delay_s))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                report.kills += 1
        try:
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        reader.join(30)
        stderr = process.stderr.read() if process.stderr else ""
        finished = False
        for line in lines:
            parts = line.split()
            if parts[0] == "ACK":
                acks[(parts[1], int(parts[2]))] = int(parts[3])
            elif parts[0] == "OPEN":
                report.torn_bytes_truncated += int(parts[1].split("=")[1])
            elif parts[0] == "INDET":
                report.indeterminate += 1
            elif parts[0] == "RESOLVED":
                report.resolved_from_effect += 1
            elif parts[0] == "FINISHED":
                finished = True
        if process.returncode not in (0, -signal.SIGKILL):
            report.problems.append(f"worker exited {process.returncode}: {stderr[-2000:]}")
            break
        if finished:
            if report.kills >= kills:
                break
            round_number += 1
        elif report.torn_tails_injected == 0 or rng.random() < 0.3:
            _inject_torn_tail(log_dir, rng)
            report.torn_tails_injected += 1
    _audit(log_dir, effects, acks, report)
    return report


def _wait_open(lines: list[str]) -> None:
    """Wait for the worker to open its log, so kills land while steps run rather than during imports."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while not any(line.startswith("OPEN") for line in list(lines)) and time.monotonic() < deadline:
        time.sleep(0.01)


def _inject_torn_tail(log_dir: Path, rng: random.Random) -> None:
    """Append what a crash mid-write leaves: the first part of a valid frame."""
    segments = sorted(log_dir.glob("segment-*.log"))
    if not segments:
        return
    frame = Record(RecordType.RESULT, "crash/torn", 0, "h", result=os.urandom(4096)).encode()
    with open(segments[-1], "ab") as tail:
        tail.write(frame[: rng.randrange(1, len(frame) - 1)])


def _audit(log_dir: Path, effects: Path, acks: dict[tuple[str, int], int], report: CrashReport) -> None:
    report.acked = len(acks)
    counts: dict[tuple[str, int], int] = {}  # (rollout, step) -> executions of its effect, forks included
    if effects.exists():
        for line in effects.read_text().splitlines():
            rollout, step = line.split()[:2]
            key = (rollout, int(step))
            counts[key] = counts.get(key, 0) + 1
    report.executions = sum(counts.values())
    report.double_executions = sum(n - 1 for n in counts.values() if n > 1)
    done: set[tuple[str, int]] = set()
    with FileLog(log_dir) as log:
        report.torn_bytes_truncated += log.stats().torn_bytes_truncated
        for (trajectory, step), crc in acks.items():
            logged = log.lookup(trajectory, step)
            if logged is None or logged.state is not StepState.DONE or zlib.crc32(logged.result or b"") != crc:
                report.lost_records += 1
                report.problems.append(f"acknowledged {trajectory} step {step} is not in the log intact")
        for info in log.list():
            for record in log.steps(info.trajectory_id, with_results=False):
                if record.stored_in != info.trajectory_id:
                    continue  # a fork's shared step: audited with the trajectory that stores it
                key = (_rollout(record.stored_in), record.step)
                ran = counts.get(key, 0)
                if record.state is StepState.DONE:
                    done.add(key)
                    if ran != 1:
                        report.problems.append(
                            f"{record.stored_in} step {record.step} is logged done but ran {ran} times"
                        )
    for rollout, step in sorted(set(counts) - done):
        report.problems.append(f"{rollout} step {step} ran but no trajectory of it logged a result")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("log_dir", type=Path)
    worker.add_argument("effects", type=Path)
    worker.add_argument("prefix")
    worker.add_argument("trajectories", type=int)
    worker.add_argument("steps", type=int)
    worker.add_argument("step_delay_s", type=float)
    worker.add_argument("--recovery", choices=RECOVERIES, default="resolve")
    worker.add_argument("--crash-after-effect", type=int, default=-1)
    worker.add_argument("--double-effect", type=int, default=-1)
    args = parser.parse_args(argv)
    _worker(
        args.log_dir, args.effects, args.prefix, args.trajectories, args.steps, args.step_delay_s,
        args.recovery, args.crash_after_effect, args.double_effect,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Crash-recovery rounds: start a server, load it, kill -9 it at a random moment, start a successor, audit.

Shared by tests/recovery (a few rounds) and bench/load.py (100 rounds). Each round's successor must reap
everything its dead predecessor left before it reports ready: no run directory, and no mount, cgroup,
process or state directory of any sandbox the dead server had recorded (see probe.py).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dsec
from dsec.errors import DsecError

from .probe import sandbox_ids_of_server, traces

READY = "DSEC_SERVER_READY "
START_TIMEOUT_S = 120.0
SETTLE_S = 15.0  # processes of a killed container take a moment to be reaped by the kernel


@dataclass
class RoundsReport:
    rounds: int = 0
    creates: int = 0
    sandboxes_at_kill: int = 0  # recorded by the killed servers, incl. creates in flight
    execs: int = 0
    destroys: int = 0
    leaks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # untyped client errors: bugs, not expected crash fallout
    start_failures: list[str] = field(default_factory=list)  # successors that did not come up in time


def start_server(home: Path, driver: str) -> tuple[subprocess.Popen, str]:
    """`dsec serve` on a fresh port; returns once it printed its ready line (i.e. after reaping)."""
    command = [
        sys.executable, "-m", "dsec.server.main", "--listen", "127.0.0.1:0", "--home", str(home),
        "--container-driver", driver, "--parent-pid", str(os.getpid()),
        "--no-readopt",  # the audit checks that a successor reaps everything (bench/load.py runs this without conftest)
    ]  # fmt: skip
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"recovery-{os.getpid()}-{time.time_ns()}.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL)
    found: dict[str, str] = {}

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith(READY):
                found["address"] = line[len(READY) :]
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    if "address" not in found:
        process.kill()
        process.wait()
        raise RuntimeError(f"dsec server did not become ready in {START_TIMEOUT_S:.0f}s; log {log_path}:\n{log_path.read_text()[-3000:]}")
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # type: ignore[union-attr]
    return process, found["address"]


def _start_successor(home: Path, driver: str, report: RoundsReport, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """Start the next server; a start that hangs is recorded (it is a recovery failure) and retried."""
    for attempt in range(attempts):
        try:
            return start_server(home, driver)
        except RuntimeError as error:
            report.start_failures.append(str(error)[:2000])
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _load(address: str, stop: threading.Event, report: RoundsReport, lock: threading.Lock, rng: random.Random) -> None:
    """Creates, execs and destroys until the server dies under it; keeps some sandboxes alive on purpose."""
    client = dsec.Client(address)
    try:
        while not stop.is_set():
            sandbox = client.create("busybox", memory_mb=64, timeout_s=600)
            with lock:
                report.creates += 1
            sandbox.exec("echo hi > /x && sleep 30 >/dev/null 2>&1 &", timeout=30)
            with lock:
                report.execs += 1
            if rng.random() < 0.6:
                sandbox.destroy()
                with lock:
                    report.destroys += 1
    except DsecError:
        pass  # the server was killed under us: expected
    except Exception as error:  # noqa: BLE001 - recorded and asserted on by the caller
        with lock:
            report.errors.append(f"{type(error).__name__}: {error}")
    finally:
        client.close()


def _settled_traces(home: Path, run_dir: Path | None, sandbox_ids: list[str]) -> list[str]:
    deadline = time.monotonic() + SETTLE_S
    while True:
        left = traces(home, sandbox_ids)
        if run_dir is not None and run_dir.exists():
            left.append(f"run dir {run_dir}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def _await_creates(report: RoundsReport, lock: threading.Lock, target: int, timeout_s: float = 120.0) -> None:
    """Return once `target` creates have been acknowledged in all (a protocol point, not a timed guess)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with lock:
            if report.creates >= target or report.errors:
                return
        time.sleep(0.02)


def run_rounds(rounds: int, home: Path, driver: str = "crun", seed: int = 0, threads: int = 2, on_round=None) -> RoundsReport:
    """Run `rounds` kill -9 rounds; `report.leaks` lists anything a successor failed to clean."""
    rng = random.Random(seed)
    report = RoundsReport()
    lock = threading.Lock()
    process, address = start_server(home, driver)
    try:
        for index in range(rounds):
            stop = threading.Event()
            workers = [
                threading.Thread(target=_load, args=(address, stop, report, lock, random.Random(rng.random())), daemon=True)
                for _ in range(threads)
            ]
            with lock:
                target = report.creates + rng.randint(1, 4)
            for worker in workers:
                worker.start()
            _await_creates(report, lock, target)  # kill after the k-th acknowledged create, whatever the speed
            process.send_signal(signal.SIGKILL)
            process.wait()
            run_dir, sandbox_ids = sandbox_ids_of_server(home, process.pid)
            report.sandboxes_at_kill += len(sandbox_ids)
            stop.set()
            for worker in workers:
                worker.join(timeout=120)
            process, address = _start_successor(home, driver, report)  # it reaps before it is ready
            leaked = _settled_traces(home, run_dir, sandbox_ids)
            report.leaks.extend(f"round {index}: {item}" for item in leaked)
            report.rounds += 1
            if on_round is not None:
                on_round(index, report)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return report

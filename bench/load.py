"""Load and hardening benchmark: 1,000 concurrent creates, hostile-suite escapes, kill -9 leaks, placement rate.

Run: `.venv/bin/python -m bench.load [--creates 1000] [--rounds 100] [--parts creates,hostile,kill9,placement]`.
Progress goes to stderr-like lines on stdout; the last line is `key=value` pairs:
creates_1000_p50_s, creates_1000_p99_s, create_failures, escapes, hostile_attempts, leaks_after_kill9,
kill9_rounds, successor_start_failures, placements_per_s.

The hostile part exits non-zero (no last line) when the suite fails or when any (case, attempt) pair it defines
recorded no row: `hostile_attempts` is then every attempt on every substrate case, never a silent subset.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dsec
from dsec.cluster.placement import simulate
from dsec.sdk.embedded import EmbeddedServer

from bench.harness import percentile, progress, report
from tests.hostile.table import load as load_rows
from tests.hostile.table import tally
from tests.recovery.rounds import run_rounds

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DSEC_HOME", "/var/lib/dsec")
say = functools.partial(progress, "load")


def concurrent_creates(n: int, driver: str) -> tuple[list[float], int]:
    """Fire `n` creates at once (one thread each) at a fresh server; returns latencies and failures."""
    server = EmbeddedServer.start(Path(os.environ["DSEC_HOME"]), ["--max-sandboxes", str(n + 64)])
    client = dsec.Client(server.address)
    latencies: list[float] = []
    failures: list[str] = []
    created: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(n + 1)

    def one() -> None:
        start.wait()
        began = time.monotonic()
        try:
            sandbox = client.create("busybox", driver=driver, memory_mb=64, timeout_s=1800)
        except Exception as error:  # noqa: BLE001 - a benchmark counts every failure kind
            with lock:
                failures.append(f"{type(error).__name__}: {error}")
            return
        with lock:
            latencies.append(time.monotonic() - began)
            created.append(sandbox.id)
            if len(created) % 100 == 0:
                say(f"{len(created)}/{n} created")

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    say(f"{len(created)} created, {len(failures)} failed in {wall:.1f}s ({len(created) / wall:.1f}/s)")
    for failure in failures[:5]:
        say(f"failure: {failure}")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client.destroy, created))
    say("destroyed all")
    client.close()
    server.stop()
    return latencies, len(failures)


class HostileRunFailed(SystemExit):
    """The hostile suite failed or reported fewer attempts than it defines: its escape count proves nothing."""


def audit_hostile(returncode: int, data: dict) -> tuple[int, int]:
    """(attempts, escapes) of a hostile run, or HostileRunFailed: a failed run or a defined attempt without a row
    must never pass as "N attempts, 0 escapes"."""
    rows, defined = load_rows(data)
    counts = tally(rows, defined)
    problems = []
    if returncode != 0:
        problems.append(f"pytest exited {returncode}")
    if not defined:
        problems.append("the run defined no attempts (nothing collected)")
    if counts.missing:
        shown = ", ".join(f"{case}/{test}" for case, test in counts.missing[:8])
        problems.append(f"{len(counts.missing)} of {len(defined)} defined attempts recorded no row ({shown})")
    if problems:
        raise HostileRunFailed(
            f"hostile suite failed: {'; '.join(problems)}; {counts.attempts} attempts and {counts.escapes} escapes "
            "were recorded; see its output above"
        )
    return counts.attempts, counts.escapes


def hostile_escapes(select: str = "") -> tuple[int, int]:
    """Run the hostile suite; returns (attempts, escapes) from its table, every case's every attempt counted."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        table = Path(handle.name)
    env = dict(os.environ, DSEC_HOSTILE_REPORT=str(table))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "hostile")]
    if select:
        command += ["-k", select]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    data = json.loads(table.read_text()) if table.exists() and table.stat().st_size else {}
    table.unlink(missing_ok=True)
    for line in result.stdout.splitlines()[-12:]:
        say(f"hostile: {line}")
    return audit_hostile(result.returncode, data)


PARTS = ("creates", "hostile", "kill9", "placement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--creates", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--driver", default="crun")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--hostile-select", default="", help="pytest -k expression: run part of the hostile suite "
                        "(the attempts it leaves out count as missing, so the run fails)")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    figures: dict[str, object] = {}

    if "creates" in parts:
        say(f"{args.creates} concurrent {args.driver} creates")
        latencies, failures = concurrent_creates(args.creates, args.driver)
        figures[f"creates_{args.creates}_p50_s"] = f"{percentile(latencies, 0.5):.3f}"
        figures[f"creates_{args.creates}_p99_s"] = f"{percentile(latencies, 0.99):.3f}"
        figures["create_failures"] = failures

    if "hostile" in parts:
        say("hostile suite")
        attempts, escapes = hostile_escapes(args.hostile_select)  # raises (exit 1) on a failed or short run
        say(f"hostile: {attempts} attempts, {escapes} escapes")
        figures.update(escapes=escapes, hostile_attempts=attempts)

    if "kill9" in parts:
        say(f"{args.rounds} kill -9 rounds")
        rounds = run_rounds(
            args.rounds,
            Path(os.environ["DSEC_HOME"]),
            driver=args.driver,
            on_round=lambda i, r: say(f"round {i + 1}: {r.creates} creates, {len(r.leaks)} leaks") if (i + 1) % 10 == 0 else None,
        )
        for leak in rounds.leaks[:10]:
            say(f"leak: {leak}")
        for failure in rounds.start_failures[:3]:
            say(f"successor start failure: {failure}")
        figures.update(leaks_after_kill9=len(rounds.leaks), kill9_rounds=rounds.rounds,
                       successor_start_failures=len(rounds.start_failures))

    if "placement" in parts:
        say("placement simulation: 100,000 sandboxes over 1,000 nodes")
        sim = simulate(100_000, 1_000)
        say(f"simulation: {sim}")
        figures["placements_per_s"] = f"{sim.placements_per_s:.0f}"

    report(figures)


if __name__ == "__main__":
    main()

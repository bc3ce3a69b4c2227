"""What one rollout's sandbox work costs, call by call, with and without the warm interpreter (trainer/warm_python.py).

One embedded server; --sandboxes container sandboxes of the `python` image, alternately plain ("cold") and with
the warm interpreter (unittest preloaded, started and waited for: "warm"), each running one fix_repo problem's
file writes and the families' kinds of calls once, one call at a time, inside a trajectory as the tools do.
Per phase: median wall, median CPU in the sandbox (its cpuacct cgroup), mean dsec-server CPU (its /proc ticks,
10 ms granular, hence the mean) and mean client CPU. Last line: the sandbox CPU of the python calls cold and warm
and of the warm interpreter's start, in ms.

Usage: .venv/bin/python -m bench.rollout_calls [--sandboxes 20]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from collections.abc import Callable

import dsec
from bench.harness import report
from dsec.sdk.embedded import EmbeddedServer
from dsec.sdk.trajectory import Trajectory
from trainer import warm_python
from trainer.data import problems

TICK = os.sysconf("SC_CLK_TCK")
UNITTEST = "{} sh: python3 -c 'import unittest'"


def server_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def sandbox_cpu(sandbox_id: str) -> float:
    paths = glob.glob(f"/sys/fs/cgroup/cpuacct/**/*{sandbox_id}*/cpuacct.usage", recursive=True)
    return sum(int(open(p).read()) for p in paths) / 1e9


def calls(sb: dsec.Sandbox, name: str, right: str) -> dict[str, Callable[[], object]]:
    return {
        "exec ['true']": lambda: sb.exec(["true"], timeout=20),
        "sh -c true": lambda: sb.exec("true", timeout=20, cwd="/work"),
        "python3 -c pass": lambda: sb.exec(["python3", "-c", "pass"], timeout=20),
        "python3 -S -c pass": lambda: sb.exec(["python3", "-S", "-c", "pass"], timeout=20),
        "python3 -I -S -c pass": lambda: sb.exec(["python3", "-I", "-S", "-c", "pass"], timeout=20),
        "python3 -c print(a * b)": lambda: sb.exec(["python3", "-c", "print(1234 * 5678)"], timeout=20),
        "sh: python3 test_repo.py": lambda: sb.exec("python3 test_repo.py", timeout=20, cwd="/work"),
        "sh: cat": lambda: sb.exec(f"cat {name}", timeout=20, cwd="/work"),
        "sh: sed -i": lambda: sb.exec(f"sed -i 's/return .*/return {right}/' {name}", timeout=20, cwd="/work"),
        "sh: rm -rf __pycache__ && python3 test_repo.py":
            lambda: sb.exec("rm -rf __pycache__ && python3 test_repo.py", timeout=20, cwd="/work"),
        "sh: python3 -c 'import unittest'": lambda: sb.exec("python3 -c 'import unittest'", timeout=20, cwd="/work"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=20, help="sandboxes of each kind")
    args = parser.parse_args(argv)
    server = EmbeddedServer.start()
    client = dsec.Client(address=server.address)
    spid = server.process.pid
    rows: dict[str, list[tuple[float, float, float, float]]] = {}

    def timed(phase: str, fn: Callable[[], object], sid: str) -> None:
        c0, s0, t0, p0 = sandbox_cpu(sid), server_cpu(spid), time.perf_counter(), time.process_time()
        fn()
        rows.setdefault(phase, []).append((time.perf_counter() - t0, sandbox_cpu(sid) - c0, server_cpu(spid) - s0,
                                           time.process_time() - p0))

    try:
        for i, problem in enumerate(problems(["fix_repo"], "train", 2 * args.sandboxes, 0)):
            kind = "warm" if i % 2 else "cold"
            traj = Trajectory(f"bench-calls-{time.time_ns()}/step-0/prompt-{i}/sample-0", client)
            sb = traj.sandbox(lambda: client.create(image="python", substrate="container", timeout_s=600))
            try:
                if kind == "warm":
                    def start(sb: dsec.Sandbox = sb) -> None:
                        warm_python.start(sb, ("unittest",))
                        while sb.exec(["test", "-e", warm_python.SHIM]).exit_code != 0:
                            pass
                    timed("warm interpreter start (until its shim is in place)", start, sb.id)
                for path, content in problem.files.items():
                    with traj:
                        timed(f"{kind} files.write", lambda: sb.files.write(path, content), sb.id)
                name = str(problem.data["path"]).rsplit("/", 1)[1]
                with traj:
                    for phase, fn in calls(sb, name, str(problem.data["right"])).items():
                        timed(f"{kind} {phase}", fn, sb.id)
            finally:
                sb.destroy()
    finally:
        client.close()
        server.stop()
    print(f"{'phase':60s} {'wall ms':>8s} {'sandbox CPU ms':>15s} {'server CPU ms':>14s} {'client CPU ms':>14s}")
    med: dict[str, float] = {}
    for phase, values in sorted(rows.items()):
        wall, cpu = (statistics.median(v[k] for v in values) * 1000 for k in (0, 1))
        srv, cli = (statistics.fmean(v[k] for v in values) * 1000 for k in (2, 3))
        med[phase] = cpu
        print(f"{phase:60s} {wall:8.1f} {cpu:15.1f} {srv:14.1f} {cli:14.1f}")
    report({"python_c_cpu_ms_cold": f"{med['cold python3 -c print(a * b)']:.1f}",
            "python_c_cpu_ms_warm": f"{med['warm python3 -c print(a * b)']:.1f}",
            "unittest_cpu_ms_cold": f"{med[UNITTEST.format('cold')]:.1f}",
            "unittest_cpu_ms_warm": f"{med[UNITTEST.format('warm')]:.1f}",
            "warm_start_cpu_ms": f"{med['warm interpreter start (until its shim is in place)']:.1f}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

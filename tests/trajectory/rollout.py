"""A rollout with side effects, run as its own process so tests can kill -9 it (or its server) anywhere.

Every step appends its number to a file in the sandbox and bumps a counter there, so a step that ran twice,
or not at all, shows in the sandbox's final state. Re-running it with the same trajectory id resumes: logged
steps replay, the rest run live. Prints `ACK step stdout` once each result is in hand.

Usage: python -m tests.trajectory.rollout TRAJECTORY_ID STEPS [--driver D] [--rebuild]
"""

from __future__ import annotations

import argparse
import sys

import dsec


def step_command(step: int) -> str:
    pause = "sleep 0.05; " if step % 5 == 0 else ""  # some steps take a while: a kill can land mid-exec
    return (
        f"{pause}echo {step} >> /tmp/steps.log; n=$(cat /tmp/count 2>/dev/null || echo 0); "
        f"echo $((n+1)) > /tmp/count; echo step {step} count $((n+1))"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("trajectory_id")
    parser.add_argument("steps", type=int)
    parser.add_argument("--driver", default="")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args(argv)
    client = dsec.Client()
    with dsec.trajectory(args.trajectory_id, client=client) as tr:
        sandbox = tr.sandbox(
            lambda: client.create("busybox", "container", driver=args.driver, memory_mb=128, timeout_s=900),
            rebuild=args.rebuild,
        )
        print(f"SANDBOX {sandbox.id} {tr.restored}", flush=True)
        for step in range(args.steps):
            result = sandbox.exec(step_command(step))
            print(f"ACK {step} {result.text.strip().replace(' ', '_')}", flush=True)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

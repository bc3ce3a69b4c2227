"""Shared moves of the kill -9 / --resume tests: start a trainer as its own process group, kill it with every
process of its Ray session while a step's tool calls are in flight or at a phase it reports (`--report-phases`
holds it there), read the server's counters once they settle, and compare two learner checkpoints."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import dsec
from dsec.sdk.trajectory import Trajectory

REPO = Path(__file__).resolve().parents[2]


def start_trainer(cfg_path: Path, assets: dict, server, ray_tmp: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, DSEC_RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "trainer.grpo", str(cfg_path), "--tokenizer", str(assets["tokenizer"]),
           "--init", str(assets["sft"]), "--dsec-address", server.address, "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_group(proc: subprocess.Popen, ray_tmp: Path) -> None:
    """SIGKILL the trainer's process group, then every process of its Ray session (found by its environment)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    marker = f"DSEC_RAY_TMPDIR={ray_tmp}\0".encode()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes() + b"\0"
        except OSError:
            continue
        if marker in environ:  # Ray's daemons rename their cmdline, but inherit the trainer's environment
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def finish(proc: subprocess.Popen, ray_tmp: Path, timeout: float) -> str:
    """Wait for a trainer to exit 0 and return its output; its Ray session is killed either way."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc, ray_tmp)
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]
    return out.decode(errors="replace")


def logged_steps(client: dsec.Client, ids: list[str]) -> int:
    return sum(len(Trajectory(tid, client).steps(with_results=False)) for tid in ids)


def kill_during_step_two(proc: subprocess.Popen, state_path: Path, client: dsec.Client, ray_tmp: Path) -> list[str]:
    """SIGKILL the trainer once step 2 has rollouts in flight that logged a tool call; their trajectory ids."""
    inflight: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            state = json.loads(state_path.read_text()) if state_path.exists() else {}
            if state.get("step") == 1 and state.get("inflight") and logged_steps(client, state["inflight"]) > 0:
                inflight = state["inflight"]
                break
            time.sleep(0.05)
    finally:
        kill_group(proc, ray_tmp)
    assert inflight, "step 2 never started with tool calls in flight"
    return inflight


def settled_counters(server, client: dsec.Client, ids: list[str]) -> tuple[dict[str, float], int]:
    """Server counters and logged steps once a tool call in flight at the kill has finished on the server
    (it still executes and logs it): both read the same moment only when two readings 1 s apart agree."""
    last = (server.steps(), logged_steps(client, ids))
    for _ in range(60):
        time.sleep(1)
        now = (server.steps(), logged_steps(client, ids))
        if now == last:
            return now
        last = now
    return last


def max_weight_difference(a_path: Path, b_path: Path) -> float:
    a = torch.load(a_path, weights_only=False)["model"]
    b = torch.load(b_path, weights_only=False)["model"]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# Where a kill may land in a step: at each phase the trainer reports (held there until told to go on), or inside
# the rollouts once the step has logged `tools` tool calls (the trainer is then running freely)
PHASE_POINTS = ("inflight", "rolled_out", "updated", "logged", "committed", "done")
KILL_POINTS = ("tools", *PHASE_POINTS)


@dataclass
class Kill:
    step: int  # 1-based, as the trainer reports it
    point: str  # one of KILL_POINTS
    tools: int = 1  # for "tools": kill once the step's rollouts have logged this many tool calls


def kill_plan(rng: random.Random, kills: int, steps: int) -> list[Kill]:
    """`kills` kills in order, each in the step the previous resume starts at (a kill before the commit leaves the
    same step to run again); points drawn round after round from a shuffle of every point, "updated" (between the
    update and the save) first in the first round. Stops early if the run would be finished."""
    plan: list[Kill] = []
    committed = 0
    points: list[str] = []
    while len(plan) < kills and committed < steps:
        if not points:
            rest = [p for p in KILL_POINTS if p != "updated" or plan]
            points = rng.sample(rest, len(rest)) + ([] if plan else ["updated"])
        point = points.pop()
        plan.append(Kill(committed + 1, point, rng.randint(1, 4)))
        if point in ("committed", "done"):
            committed += 1
    return plan


class Lockstep:
    """A trainer started with --report-phases: its output lines arrive on a queue (a reader thread), each phase
    line holds the trainer until `go()`."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def next_phase(self, timeout: float = 600) -> tuple[str, int] | None:
        """The next (phase, step) the trainer holds at; None when it exited."""
        while (line := self.lines.get(timeout=timeout)) is not None:
            if (phase := self._take(line)) is not None:
                return phase
        return None

    def poll_phase(self) -> tuple[str, int] | None:
        """A phase the trainer reached since the last look, without waiting; a trainer that exited is an error."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return None
            if line is None:
                raise AssertionError("the trainer exited:\n" + "\n".join(self.output[-40:]))
            if (phase := self._take(line)) is not None:
                return phase

    def _take(self, line: str) -> tuple[str, int] | None:
        self.output.append(line)
        if not line.startswith("phase="):
            return None
        phase, step = line.split()
        return phase.removeprefix("phase="), int(step.removeprefix("step="))

    def go(self) -> None:
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()


def run_to_kill(ctl: Lockstep, kill: Kill, state_path: Path, client: dsec.Client, ray_tmp: Path) -> str:
    """Let the trainer run until `kill` and SIGKILL it (and its Ray session) there; returns where it landed."""
    try:
        while (phase := ctl.next_phase()) is not None:
            name, step = phase
            if step == kill.step and name == kill.point:
                return f"{name} of step {step}"
            if step == kill.step and name == "inflight" and kill.point == "tools":
                ids = json.loads(state_path.read_text())["inflight"]
                ctl.go()
                while (held := ctl.poll_phase()) is None:  # the rollouts run; watch the server's log of them
                    if logged_steps(client, ids) >= kill.tools:
                        return f"after {kill.tools} logged tool calls of step {step}"
                    time.sleep(0.05)
                return f"{held[0]} of step {held[1]} (its rollouts logged fewer than {kill.tools} tool calls)"
            ctl.go()
        raise AssertionError(f"the trainer exited before {kill}:\n" + "\n".join(ctl.output[-40:]))
    finally:
        kill_group(ctl.proc, ray_tmp)


def finish_lockstep(ctl: Lockstep, ray_tmp: Path) -> str:
    """Answer every phase until the trainer exits 0; its output."""
    try:
        while ctl.next_phase() is not None:
            ctl.go()
        ctl.proc.wait(timeout=60)
    finally:
        kill_group(ctl.proc, ray_tmp)
    out = "\n".join(ctl.output)
    assert ctl.proc.returncode == 0, out[-4000:]
    return out

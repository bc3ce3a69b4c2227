"""Shared moves of the kill -9 / --resume tests: start a trainer as its own process group, kill it with every
process of its Ray session while a step's tool calls are in flight, read the server's counters once they settle,
and compare two learner checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import dsec
from dsec.sdk.trajectory import Trajectory

REPO = Path(__file__).resolve().parents[2]


def start_trainer(cfg_path: Path, assets: dict, server, ray_tmp: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, DSEC_RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "trainer.grpo", str(cfg_path), "--tokenizer", str(assets["tokenizer"]),
           "--init", str(assets["sft"]), "--dsec-address", server.address, "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
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

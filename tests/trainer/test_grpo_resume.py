"""GRPO end to end on Ray with real sandboxes, and kill -9 + --resume against an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import dsec
from dsec.sdk.trajectory import Trajectory

REPO = Path(__file__).resolve().parents[2]


def _trainer(cfg_path: Path, assets: dict, server, ray_tmp: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, DSEC_RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "trainer.grpo", str(cfg_path), "--tokenizer", str(assets["tokenizer"]),
           "--init", str(assets["sft"]), "--dsec-address", server.address, "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_group(proc: subprocess.Popen, ray_tmp: Path) -> None:
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


def _finish(proc: subprocess.Popen, ray_tmp: Path, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc, ray_tmp)
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]
    return out.decode(errors="replace")


def _write_cfg(make_config, path: Path, out: Path) -> Path:
    cfg = make_config(out)
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


def _logged(client: dsec.Client, ids: list[str]) -> int:
    return sum(len(Trajectory(tid, client).steps(with_results=False)) for tid in ids)


@pytest.mark.timeout(900)
def test_kill9_mid_step_then_resume_replays_tools_and_matches_uninterrupted(trainer_assets, dsec_server, tmp_path,
                                                                           ray_tmp, make_config):
    # the uninterrupted reference run: 2 steps
    cfg_a = _write_cfg(make_config, tmp_path / "a.yaml", tmp_path / "a")
    _finish(_trainer(cfg_a, trainer_assets, dsec_server, ray_tmp / "a"), ray_tmp / "a", 600)
    metrics_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics_a] == [1, 2]
    assert all(m["tools_live"] > 0 for m in metrics_a)  # files, tool calls and verifiers went through dsec

    # the same run, killed with SIGKILL while step 2's rollouts are in flight
    cfg_b = _write_cfg(make_config, tmp_path / "b.yaml", tmp_path / "b")
    state_path = tmp_path / "b" / "state.json"
    proc = _trainer(cfg_b, trainer_assets, dsec_server, ray_tmp / "b")
    client = dsec.Client(address=dsec_server.address)
    inflight: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            state = json.loads(state_path.read_text()) if state_path.exists() else {}
            if state.get("step") == 1 and state.get("inflight") and _logged(client, state["inflight"]) > 0:
                inflight = state["inflight"]
                break
            time.sleep(0.05)
    finally:
        _kill_group(proc, ray_tmp / "b")
    assert inflight, "step 2 never started with tool calls in flight"
    before = dsec_server.steps()
    logged_before = _logged(client, inflight)

    out = _finish(_trainer(cfg_b, trainer_assets, dsec_server, ray_tmp / "b2", "--resume"), ray_tmp / "b2", 600)
    after = dsec_server.steps()
    logged_after = _logged(client, inflight)
    client.close()
    # every step logged before the kill was answered from the log; only new steps executed
    print(f"resume: {logged_before} steps logged before the kill, server replayed "
          f"{after['replayed'] - before['replayed']:.0f}, executed {after['executed'] - before['executed']:.0f} new")
    assert after["replayed"] - before["replayed"] >= logged_before, out
    assert after["executed"] - before["executed"] == logged_after - logged_before
    resumed = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    assert resumed["step"] == 2  # (its tools_replayed counts exec replays only; the server counts every kind)

    a = torch.load(tmp_path / "a" / "learner.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "learner.pt", weights_only=False)["model"]
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max abs weight difference resumed vs uninterrupted: {diff}")
    assert diff == 0.0

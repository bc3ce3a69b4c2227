"""GRPO end to end on Ray with real sandboxes, and kill -9 + --resume against an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import dsec

from .resume_harness import (
    finish,
    kill_during_step_two,
    logged_steps,
    max_weight_difference,
    settled_counters,
    start_trainer,
)


def _write_cfg(make_config, path: Path, out: Path) -> Path:
    cfg = make_config(out)
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


@pytest.mark.timeout(900)
def test_kill9_mid_step_then_resume_replays_tools_and_matches_uninterrupted(trainer_assets, dsec_server, tmp_path,
                                                                           ray_tmp, make_config):
    # the uninterrupted reference run: 2 steps
    cfg_a = _write_cfg(make_config, tmp_path / "a.yaml", tmp_path / "a")
    finish(start_trainer(cfg_a, trainer_assets, dsec_server, ray_tmp / "a"), ray_tmp / "a", 600)
    metrics_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics_a] == [1, 2]
    assert all(m["tools_live"] > 0 for m in metrics_a)  # files, tool calls and verifiers went through dsec

    # the same run, killed with SIGKILL while step 2's rollouts are in flight
    cfg_b = _write_cfg(make_config, tmp_path / "b.yaml", tmp_path / "b")
    state_path = tmp_path / "b" / "state.json"
    proc = start_trainer(cfg_b, trainer_assets, dsec_server, ray_tmp / "b")
    client = dsec.Client(address=dsec_server.address)
    inflight = kill_during_step_two(proc, state_path, client, ray_tmp / "b")
    before, logged_before = settled_counters(dsec_server, client, inflight)

    out = finish(start_trainer(cfg_b, trainer_assets, dsec_server, ray_tmp / "b2", "--resume"), ray_tmp / "b2", 600)
    after = dsec_server.steps()
    logged_after = logged_steps(client, inflight)
    client.close()
    # every step logged before the kill was answered from the log; only new steps executed
    print(f"resume: {logged_before} steps logged before the kill, server replayed "
          f"{after['replayed'] - before['replayed']:.0f}, executed {after['executed'] - before['executed']:.0f} new")
    assert after["replayed"] - before["replayed"] >= logged_before, out
    assert after["executed"] - before["executed"] == logged_after - logged_before
    resumed = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    assert resumed["step"] == 2  # (its tools_replayed counts exec replays only; the server counts every kind)

    diff = max_weight_difference(tmp_path / "a" / "learner.pt", tmp_path / "b" / "learner.pt")
    print(f"max abs weight difference resumed vs uninterrupted: {diff}")
    assert diff == 0.0

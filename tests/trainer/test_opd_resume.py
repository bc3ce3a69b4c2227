"""OPD through the GRPO driver on Ray with real sandboxes and teacher actors: kill -9 mid-step, then --resume.

The resumed run restarts its teachers from their checkpoint paths, replays every logged tool call, and ends
with weights equal to those of an uninterrupted run.
"""

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


def _write_cfg(make_config, path: Path, out: Path, teachers: dict[str, Path]) -> Path:
    cfg = json.loads(make_config(out).model_dump_json())
    cfg["algo"] = {"kl_coef": 0.0, "loss_agg": "token_mean",
                   "opd": {"teachers": {f: str(p) for f, p in teachers.items()}, "kl_estimator": "full_vocab",
                           "reward_weight": 0.5, "coef": 1.0}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(900)
def test_opd_kill9_mid_step_then_resume_matches_uninterrupted(trainer_assets, teacher_weights, dsec_server,
                                                              tmp_path, ray_tmp, make_config):
    cfg_a = _write_cfg(make_config, tmp_path / "a.yaml", tmp_path / "a", teacher_weights)
    finish(start_trainer(cfg_a, trainer_assets, dsec_server, ray_tmp / "a"), ray_tmp / "a", 600)
    metrics_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics_a] == [1, 2]
    assert all(m["tools_live"] > 0 and m["opd_kl"] > 0 for m in metrics_a), metrics_a

    cfg_b = _write_cfg(make_config, tmp_path / "b.yaml", tmp_path / "b", teacher_weights)
    state_path = tmp_path / "b" / "state.json"
    proc = start_trainer(cfg_b, trainer_assets, dsec_server, ray_tmp / "b")
    client = dsec.Client(address=dsec_server.address)
    inflight = kill_during_step_two(proc, state_path, client, ray_tmp / "b")
    before, logged_before = settled_counters(dsec_server, client, inflight)

    out = finish(start_trainer(cfg_b, trainer_assets, dsec_server, ray_tmp / "b2", "--resume"), ray_tmp / "b2", 600)
    after = dsec_server.steps()
    logged_after = logged_steps(client, inflight)
    client.close()
    replayed, executed = after["replayed"] - before["replayed"], after["executed"] - before["executed"]
    print(f"opd resume: {logged_before} steps logged before the kill, replayed {replayed:.0f}, "
          f"executed {executed:.0f} new")
    assert replayed >= logged_before, out
    assert executed == logged_after - logged_before  # 0 tool calls re-executed
    metrics_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert metrics_b[-1]["step"] == 2 and metrics_b[-1]["opd_kl"] == metrics_a[-1]["opd_kl"]

    diff = max_weight_difference(tmp_path / "a" / "learner.pt", tmp_path / "b" / "learner.pt")
    print(f"opd: max abs weight difference resumed vs uninterrupted: {diff}")
    assert diff == 0.0

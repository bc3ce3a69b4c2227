"""GRPO end to end on Ray with real sandboxes: kill -9 at random points of whole steps, --resume after each
kill, against an uninterrupted run with the same seed.

Each kill lands at a point the trainer itself reports (`--report-phases` holds it there) or after the k-th tool
call of the step's rollouts is logged on the server; never after a timed sleep. The points cover the whole step:
before the rollouts, during them, after them, between the update and the save ("updated"), after the metrics
record, after the checkpoint's commit, after the run state's update. Knobs (the bench-length run is
`DSEC_RESUME_KILLS=20 DSEC_RESUME_STEPS=8`): DSEC_RESUME_KILLS (default 3), DSEC_RESUME_STEPS (default 2),
DSEC_RESUME_SEED (default: random, printed; set it to replay a failure).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import yaml

import dsec

from .resume_harness import (
    Lockstep,
    finish,
    finish_lockstep,
    kill_plan,
    max_weight_difference,
    run_to_kill,
    start_trainer,
)

KILLS = int(os.environ.get("DSEC_RESUME_KILLS", "3"))
STEPS = int(os.environ.get("DSEC_RESUME_STEPS", "2"))
SEED = int(os.environ.get("DSEC_RESUME_SEED", str(random.SystemRandom().randrange(10**6))))
# the metrics that are functions of the sampled tokens and the weights alone (tools_live/_replayed and times
# differ by design between a resumed and an uninterrupted run)
DETERMINISTIC = ("reward_mean", "loss", "kl", "kept_samples", "tokens", "samples", "sampled_tokens", "parse_errors")


def _write_cfg(make_config, path: Path, out: Path) -> Path:
    cfg = make_config(out, steps=STEPS)
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _executed_since(server, before: dict[str, float], expected: float | None = None) -> float:
    """Tool calls the server executed since `before`, read until it equals `expected` or stops changing: a call
    already answered may be counted a moment after its reply."""
    last = None
    for _ in range(100):
        now = server.steps()["executed"] - before["executed"]
        if now == expected or now == last:
            return now
        last = now
        time.sleep(0.1)
    return now


@pytest.mark.timeout(600 + 180 * KILLS)
def test_kill9_at_random_points_of_the_step_then_resume_matches_uninterrupted(trainer_assets, dsec_server, tmp_path,
                                                                             ray_tmp, make_config):
    started = time.monotonic()
    # the uninterrupted reference run
    cfg_a = _write_cfg(make_config, tmp_path / "a.yaml", tmp_path / "a")
    before_a = dsec_server.steps()
    finish(start_trainer(cfg_a, trainer_assets, dsec_server, ray_tmp / "a"), ray_tmp / "a", 600)
    metrics_a = _metrics(tmp_path / "a")
    assert [m["step"] for m in metrics_a] == list(range(1, STEPS + 1))
    assert all(m["tools_live"] > 0 for m in metrics_a)  # files, tool calls and verifiers went through dsec
    executed_a = _executed_since(dsec_server, before_a)

    # the same run, killed at random points and resumed after each kill
    plan = kill_plan(random.Random(SEED), KILLS, STEPS)
    cfg_b = _write_cfg(make_config, tmp_path / "b.yaml", tmp_path / "b")
    state_path = tmp_path / "b" / "state.json"
    client = dsec.Client(address=dsec_server.address)
    before_b = dsec_server.steps()
    landed = []
    for i, kill in enumerate(plan):
        proc = start_trainer(cfg_b, trainer_assets, dsec_server, ray_tmp / f"b{i}", *(["--resume"] if i else []),
                             "--report-phases")
        landed.append(run_to_kill(Lockstep(proc), kill, state_path, client, ray_tmp / f"b{i}"))
    proc = start_trainer(cfg_b, trainer_assets, dsec_server, ray_tmp / "bz", "--resume", "--report-phases")
    out = finish_lockstep(Lockstep(proc), ray_tmp / "bz")
    client.close()
    executed_b = _executed_since(dsec_server, before_b, executed_a)
    replayed_b = dsec_server.steps()["replayed"] - before_b["replayed"]
    where = f"seed {SEED}, kills at: " + "; ".join(landed)
    print(f"{where}\nresumed run: executed {executed_b:.0f} tool calls (uninterrupted {executed_a:.0f}), replayed "
          f"{replayed_b:.0f}; {time.monotonic() - started:.0f} s")

    # 0 tool calls re-executed: the killed-and-resumed run executed exactly what the uninterrupted one did
    assert executed_b == executed_a, f"{where}\n{out[-3000:]}"
    state = json.loads(state_path.read_text())
    assert state["step"] == STEPS and state["inflight"] == [], where
    # bit-identical: every step's record (one per step, re-run steps included) and the final weights
    metrics_b = _metrics(tmp_path / "b")
    assert [m["step"] for m in metrics_b] == list(range(1, STEPS + 1)), where
    for a, b in zip(metrics_a, metrics_b):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}, f"{where}: step {a['step']}"
    diff = max_weight_difference(tmp_path / "a" / "learner.pt", tmp_path / "b" / "learner.pt")
    print(f"max abs weight difference resumed vs uninterrupted: {diff}")
    assert diff == 0.0, where

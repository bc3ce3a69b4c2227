"""Asynchronous GRPO (trainer.async_grpo) with real Ray, real sandboxes and the tiny V4 policy: max_staleness 0
is the synchronous loop bit for bit; the staleness bound holds token by token; a rollout crossing an update
samples its next turn with the new weights, tagged; a kill -9 and --resume re-execute no tool call."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import ray
import torch
import yaml

import dsec
from trainer import tito
from trainer.async_grpo import DECISIONS, read_decisions
from trainer.config import RolloutConfig, SandboxConfig, load_config
from trainer.data import problems
from trainer.grpo import init_ray, step_jobs, train_grpo
from trainer.policy import build_policy
from trainer.rollout import run_rollouts
from trainer.sampler import token_logprobs
from trainer.tokenizer import V4Tokenizer

from .resume_harness import (
    Kill,
    Lockstep,
    finish_lockstep,
    logged_steps,
    max_weight_difference,
    run_to_kill,
    start_trainer,
)

DETERMINISTIC = ("reward_mean", "loss", "kl", "kept_samples", "tokens", "samples", "sampled_tokens", "parse_errors")


@pytest.fixture
def local_ray(ray_tmp):
    init_ray(None, num_cpus=2, temp_dir=str(ray_tmp))
    yield
    ray.shutdown()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _batch_of(trajectory_id: str) -> int:
    return int(trajectory_id.split("/")[1].removeprefix("step-"))


@pytest.mark.timeout(900)
def test_max_staleness_0_through_the_async_pipeline_is_the_synchronous_loop_bit_for_bit(
        trainer_assets, dsec_server, tmp_path, make_config, local_ray):
    """The async machinery (weight board, per-turn version decisions, workers fed ahead) with k = 0 against the
    synchronous loop: the same metrics and the same final weights, to the bit."""
    common = dict(tokenizer_path=trainer_assets["tokenizer"], init_weights=trainer_assets["sft"], address=None,
                  dsec_address=dsec_server.address, resume=False, progress=False)
    train_grpo(make_config(tmp_path / "sync"), pipeline=False, **common)
    train_grpo(make_config(tmp_path / "pipe"), pipeline=True, **common)
    sync, pipe = _metrics(tmp_path / "sync"), _metrics(tmp_path / "pipe")
    assert [m["step"] for m in pipe] == [1, 2]
    for a, b in zip(sync, pipe):
        assert {k: a.get(k) for k in DETERMINISTIC} == {k: b.get(k) for k in DETERMINISTIC}
        assert b["staleness_max"] == 0 and b["partial_rollouts"] == 0
    assert max_weight_difference(tmp_path / "sync" / "learner.pt", tmp_path / "pipe" / "learner.pt") == 0.0


class _Scripted:
    """A VersionSchedule that samples turn t with version min(t, 1): every rollout crosses an update after its
    first turn, deterministically (no race with a learner)."""

    def __init__(self, models: dict[int, torch.nn.Module]) -> None:
        self.models, self.asked = models, []

    def versions(self, trajectory_ids: list[str], turn: int) -> list[int]:
        self.asked.append(turn)
        return [min(turn, 1)] * len(trajectory_ids)

    def model(self, version: int):
        return self.models[version]


@pytest.mark.timeout(600)
def test_a_partial_rollout_samples_its_next_turn_with_the_new_weights(trainer_assets, dsec_server):
    """Turn 1 by version 0 (the SFT policy), turn 2 by version 1 (perturbed weights): each turn's recorded
    log-probs are its own version's, the turns are tagged, and token-in/token-out holds across the switch."""
    torch.set_num_threads(1)
    tok = V4Tokenizer.load(trainer_assets["tokenizer"])
    models = {}
    for version in (0, 1):
        m = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
        state = torch.load(trainer_assets["sft"], weights_only=True)
        if version:
            gen = torch.Generator().manual_seed(7)
            state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                     for k, v in state.items()}
        m.load_state_dict(state)
        models[version] = m.eval()
    jobs = [(f"partial-{time.time_ns()}/step-0/prompt-{i}/sample-0", p)
            for i, p in enumerate(problems(["arithmetic"], "train", 16, 3))]
    client = dsec.Client(address=dsec_server.address)
    try:
        budget = RolloutConfig(max_turns=2, max_new_tokens=96, max_total_tokens=512)
        out = run_rollouts(models[0], tok, client, jobs, budget, SandboxConfig(image="python", tool_timeout_s=30), 0,
                           schedule=_Scripted(models))
    finally:
        client.close()
    crossed = [r for r in out if r.turns == 2]
    assert crossed, f"no rollout reached a second turn: {[r.stop_reason for r in out]}"
    for r in out:
        assert r.turn_versions == [0, 1][: r.turns] and r.policy_version == 0
    assert not tito.check((r.trajectory_id, r.ids, r.mask, r.sampled_hash) for r in out).violations
    for r in crossed:
        turn_of = _turn_index(r.mask)
        for version, model in models.items():
            want = token_logprobs(model, [r.ids], tok.pad_id)[0]
            got = torch.tensor(r.logprobs[1:])
            sel = torch.tensor([t == version for t in turn_of[1:]])
            assert torch.allclose(got[sel], want[sel], atol=1e-4), (r.trajectory_id, version)


def _turn_index(mask: list[int]) -> list[int]:
    """Per position: which sampled turn (0, 1, ...) it belongs to, -1 outside sampled tokens."""
    out, turn, inside = [], -1, False
    for m in mask:
        if m and not inside:
            turn += 1
        inside = bool(m)
        out.append(turn if m else -1)
    return out


@pytest.mark.timeout(1200)
def test_async_run_killed_and_resumed_keeps_staleness_and_reexecutes_no_tool_call(trainer_assets, dsec_server,
                                                                                    tmp_path, ray_tmp, make_config):
    """k = 1, three steps, killed twice at protocol points (after the 2nd logged tool call of step 2's batch,
    then between step 2's update and its save), resumed after each. Every tool call of the run executed once:
    the server executed exactly as many calls as the run's trajectories logged, the resumed batches' calls came
    back from the log, and no turn's version decision was made twice. Every turn of batch b was sampled by
    version b - 1 or b (the decision log says which, per turn), and the checkpoint keeps the version before
    its own."""
    out = tmp_path / "b"
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(make_config(out, steps=3, max_staleness=1).model_dump_json())))
    client = dsec.Client(address=dsec_server.address)
    before = dsec_server.steps()
    landed = []
    try:
        for i, kill in enumerate([Kill(2, "tools", 2), Kill(2, "updated")]):
            proc = start_trainer(cfg, trainer_assets, dsec_server, ray_tmp / f"k{i}",
                                 *(["--resume"] if i else []), "--report-phases")
            landed.append(run_to_kill(Lockstep(proc), kill, out / "state.json", client, ray_tmp / f"k{i}"))
        proc = start_trainer(cfg, trainer_assets, dsec_server, ray_tmp / "kz", "--resume", "--report-phases")
        finish_lockstep(Lockstep(proc), ray_tmp / "kz")
        state = json.loads((out / "state.json").read_text())
        run_cfg = load_config(cfg)
        ids = [tid for b in range(3) for tid, _ in step_jobs(run_cfg, state["run_id"], b,
                                                              run_cfg.sft.examples + b * run_cfg.grpo.prompts_per_step)]
        logged, after = _settled(lambda: (logged_steps(client, ids), dsec_server.steps()))
    finally:
        client.close()
    executed, replayed = after["executed"] - before["executed"], after["replayed"] - before["replayed"]
    print(f"kills at: {'; '.join(landed)}; executed {executed:.0f} tool calls for {logged} logged, "
          f"replayed {replayed:.0f}")
    assert state["step"] == 3 and state["inflight"] == []
    assert executed == logged, landed
    assert replayed > 0, landed
    lines = [json.loads(x) for x in (out / DECISIONS).read_text().splitlines()]
    twice = [k for k, n in Counter((d["t"], d["turn"]) for d in lines).items() if n > 1]
    assert not twice, twice[:3]
    decisions = read_decisions(out / DECISIONS)
    assert {_batch_of(t) for t, _ in decisions} == {0, 1, 2}
    for (tid, turn), version in decisions.items():
        assert _batch_of(tid) - 1 <= version <= _batch_of(tid), (tid, turn, version)
    records = _metrics(out)
    assert [m["step"] for m in records] == [1, 2, 3]
    assert all(m["staleness_max"] <= 1 and m["tito_violations"] == 0 for m in records)
    print(f"samples sampled one version behind: {sum(m.get('staleness_1', 0) for m in records):.0f}; partial "
          f"rollouts: {sum(m['partial_rollouts'] for m in records):.0f}")
    payload = torch.load(out / "learner.pt", weights_only=False)
    assert sorted(payload["history"]) == [2] and "history" in payload["manifest"]["contents"]


def _settled(read, tries: int = 60):
    """A server-side count read until two readings a second apart agree (a call in flight at the kill still
    finishes and logs on the server)."""
    last = read()
    for _ in range(tries):
        time.sleep(1)
        now = read()
        if now == last:
            return now
        last = now
    return last

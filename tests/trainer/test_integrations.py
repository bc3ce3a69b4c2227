"""dsec inside other trainers: TRL's GRPOTrainer (the pinned version) with a reward whose tools run in dsec
sandboxes, killed mid-run and resumed from its checkpoint; and a SkyRL-gym environment backed by dsec.

The TRL run trains a tiny random-init Qwen2 (config only, nothing downloaded), not the V4 policy: transformers
5.23's `Trainer` resume re-reads the checkpoint's config.json as a base `PreTrainedConfig`, whose validator
rejects DeepSeek-V4's `mlp_layer_types` (`hash_moe`, `moe`), so a V4 TRL run trains but cannot resume.
"""

from __future__ import annotations

import time

import pytest
import torch

import dsec
from trainer.config import SandboxConfig
from trainer.data import corpus, problems
from trainer.encoding import END_THINK, USER, assistant_opener, render_assistant_body
from trainer.policy import build_policy
from trainer.rollout import prompt_ids
from trainer.sampler import sample, sample_generator
from trainer.tasks import get_task
from trainer.tokenizer import V4Tokenizer, train


class Crash(RuntimeError):
    """Stands in for a kill: raised after a step's rewards ran and before its checkpoint is written."""


@pytest.fixture(scope="module")
def tok() -> V4Tokenizer:
    return train(corpus(["arithmetic", "fix_module"], 0, 200, "non-think"), 1024)


@pytest.fixture
def client(dsec_server):
    with dsec.Client(address=dsec_server.address) as c:
        yield c


@pytest.mark.timeout(600)
def test_trl_grpo_resume_replays_tool_calls(tok, dsec_server, client, tmp_path):
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainer.integrations.trl_tools import DsecToolReward, dataset_rows

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=2048, bos_token_id=tok.bos_id,
                                         eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    model.save_pretrained(tmp_path / "model")
    data = Dataset.from_list(dataset_rows(problems(["arithmetic"], "train", 4, 0)))
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=12, max_steps=2, save_strategy="steps", save_steps=1, learning_rate=1e-4,
                      beta=0.0, use_cpu=True, report_to="none", logging_steps=1, seed=0, bf16=False,
                      gradient_checkpointing=False, disable_dropout=True)
    run_id = f"trl-{time.time_ns()}"

    class CrashAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step == 2:
                raise Crash("killed after step 2's rewards, before its checkpoint")

    def trainer(reward: DsecToolReward, callbacks: list) -> GRPOTrainer:
        return GRPOTrainer(model=str(tmp_path / "model"), reward_funcs=reward, args=args, train_dataset=data,
                           processing_class=tok.as_hf(), callbacks=[reward.callback(), *callbacks])

    sandbox = SandboxConfig(image="python", tool_timeout_s=30, sandbox_timeout_s=600)
    before = dsec_server.steps()
    first = DsecToolReward(tok, client=client, run_id=run_id, sandbox=sandbox)
    with pytest.raises(Crash):
        trainer(first, [CrashAfterStep2()]).train()
    crashed = dsec_server.steps()
    assert crashed["executed"] - before["executed"] == 4  # 2 steps x 2 completions, one verifier run each
    assert (tmp_path / "out" / "checkpoint-1").is_dir() and not (tmp_path / "out" / "checkpoint-2").exists()

    resumed = DsecToolReward(tok, client=client, run_id=run_id, sandbox=sandbox)
    trainer(resumed, []).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    after = dsec_server.steps()
    assert after["executed"] == crashed["executed"]  # step 2 re-ran: every tool call answered from the log
    assert after["replayed"] - crashed["replayed"] == 2
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    first.release()  # the crashed run's step-2 sandboxes (a real kill would leave them to their timeout)
    live = {s.id for s in client.list(labels={"dsec-trainer": "rollout"})}
    assert not live & {*first.sandbox_ids, *resumed.sandbox_ids}


def _make_env(dsec_server, problem, tid: str):
    import skyrl_gym

    from trainer.integrations.skyrl_env import ENV_ID, register

    register()
    cfg = {"dsec_address": dsec_server.address, "tool_timeout_s": 30, "sandbox_timeout_s": 600}
    return skyrl_gym.make(ENV_ID, env_config=cfg, extras={"problem": problem.model_dump(), "trajectory_id": tid})


@pytest.mark.timeout(600)
def test_skyrl_env_runs_tools_in_dsec_and_a_replayed_episode_runs_nothing_twice(dsec_server):
    problem = problems(["arithmetic"], "train", 1, 0)[0]
    call = get_task("arithmetic").demonstration(problem)[0].tool_calls
    call_action = render_assistant_body("", "", call)[len(END_THINK):]  # a non-think V4 turn calling run_python
    tid = f"skyrl-{time.time_ns()}/prompt-0/sample-0"
    before = dsec_server.steps()
    env = _make_env(dsec_server, problem, tid)
    replay = None
    try:
        prompt, info = env.init([])
        assert prompt[-1] == {"role": "user", "content": problem.prompt} and info["restored"] == "new"
        assert info["tools"][0]["function"]["name"] == "run_python"
        out = env.step(call_action)
        result = [{"role": "user", "content": f"<tool_result>{problem.answer}\n</tool_result>"}]
        assert not out["done"] and out["observations"] == result
        assert dsec_server.steps()["executed"] - before["executed"] == 1

        # the same episode again (a resumed SkyRL run): same sandbox, the logged result, nothing executed
        replay = _make_env(dsec_server, problem, tid)
        assert replay.init([])[1]["restored"] == "live"
        again = replay.step(call_action)
        mid = dsec_server.steps()
        assert again["observations"] == result and again["metadata"]["tools_replayed"] == 1
        assert mid["executed"] - before["executed"] == 1 and mid["replayed"] - before["replayed"] == 1
        final = replay.step(problem.answer)  # SkyRL's generator strips the EOS
        assert final["done"] and final["reward"] == 1.0 and final["observations"] == []
    finally:
        env.close()
        if replay is not None:
            replay.close()


@pytest.mark.timeout(600)
def test_skyrl_env_episode_driven_by_a_random_init_v4_policy(tok, dsec_server):
    torch.set_num_threads(2)
    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0).eval()
    problem = problems(["arithmetic"], "train", 1, 0)[0]
    env = _make_env(dsec_server, problem, f"skyrl-{time.time_ns()}/policy")
    try:
        env.init([])
        ids = prompt_ids(tok, problem, "non-think")
        for turn in range(4):
            new = sample(model, [ids], [sample_generator(0, turn)], max_new_tokens=[12], eos_id=tok.eos_id,
                         pad_id=tok.pad_id)[0]
            out = env.step(tok.decode(new))
            if out["done"]:
                break
            ids += new + tok.encode(USER + out["observations"][0]["content"] + assistant_opener("non-think"))
        assert out["done"] and out["reward"] == 0.0 and 1 <= env.turns <= 3  # max_turns 3 ends the episode
    finally:
        env.close()

"""The policy gateway (`python -m trainer.gateway`) driven by the real `openai` client and a small agent harness
whose tool calls run in a dsec sandbox inside `dsec.trajectory(...)`.

The policy is the tiny V4 model over-fitted on one arithmetic demonstration, so greedy decoding reliably calls
`run_python` and then copies the tool result: the test can follow a real multi-turn tool conversation.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import dsec
from trainer import tito
from trainer.config import AlgoConfig, SFTConfig
from trainer.data import corpus, demo_pieces, problems, tokenize_pieces
from trainer.encoding import USER
from trainer.learner import Learner
from trainer.policy import build_policy
from trainer.rollout import Rollout, prompt_ids
from trainer.sft import train_sft
from trainer.tasks import get_task
from trainer.tokenizer import V4Tokenizer, train

MODEL = "dsec-policy"


@pytest.fixture(scope="module")
def overfit(tmp_path_factory) -> dict:
    """A tokenizer and a tiny V4 policy that has memorised one arithmetic demonstration (tool call, then answer)."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("gateway")
    tok = train(corpus(["arithmetic", "fix_module"], 0, 200, "non-think"), 1024)
    tok.save(out / "tokenizer.json")
    problem = problems(["arithmetic"], "train", 1, 0)[0]
    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    demo = tokenize_pieces(tok, demo_pieces(problem, "non-think"))
    train_sft(model, [demo], SFTConfig(steps=60, batch_size=1, lr=1e-2), tok.pad_id, 0)
    torch.save(model.state_dict(), out / "policy.pt")
    return {"tokenizer": out / "tokenizer.json", "weights": out / "policy.pt", "problem": problem}


@contextlib.contextmanager
def started_gateway(overfit: dict, *extra: str):
    """`python -m trainer.gateway` on a free port; waits on its ready line (not a sleep), stops it after."""
    proc = subprocess.Popen([sys.executable, "-m", "trainer.gateway", "--tokenizer", str(overfit["tokenizer"]),
                             "--weights", str(overfit["weights"]), "--port", "0", "--max-tokens", "96", *extra],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("gateway listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def gateway(overfit):
    with started_gateway(overfit) as url:
        yield url


def _openai_tools(family: str) -> list[dict]:
    return [{"type": "function", "function": t.model_dump()} for t in get_task(family).tools]


def run_harness(base_url: str, client: dsec.Client, tid: str, problem, sandboxes: list) -> list:
    """A minimal agent: OpenAI chat calls; each tool call runs in this trajectory's dsec sandbox."""
    oa = openai.OpenAI(base_url=base_url, api_key="unused", default_headers={"X-Dsec-Trajectory": tid}, max_retries=0)
    task = get_task(problem.family)
    trajectory = dsec.trajectory(tid, client=client)
    sandbox = trajectory.sandbox(lambda: client.create(image="python", substrate="container", timeout_s=600))
    sandboxes.append(sandbox)
    messages: list = [{"role": "system", "content": task.system}, {"role": "user", "content": problem.prompt}]
    responses = []
    for _ in range(3):
        resp = oa.chat.completions.create(model=MODEL, messages=messages, tools=_openai_tools(problem.family),
                                          temperature=0, logprobs=True, top_logprobs=2, max_tokens=96)
        responses.append(resp)
        message = resp.choices[0].message
        messages.append(message)  # the client's own object, echoed back as harnesses do
        if not message.tool_calls:
            break
        for call in message.tool_calls:
            code = json.loads(call.function.arguments)["code"]
            with trajectory:
                result = sandbox.exec(["python3", "-c", code], timeout=30)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result.stdout.decode()})
    return responses


@pytest.mark.timeout(600)
def test_harness_through_the_gateway_yields_exact_samples_and_tools_run_once(gateway, overfit, dsec_server):
    problem = overfit["problem"]
    tok = V4Tokenizer.load(overfit["tokenizer"])
    tid = f"gw-{time.time_ns()}/prompt-0/sample-0"
    sandboxes: list = []
    with dsec.Client(address=dsec_server.address) as client:
        try:
            before = dsec_server.steps()
            first = run_harness(gateway, client, tid, problem, sandboxes)
            after_first = dsec_server.steps()
            # turn 1: a DSML tool call, parsed into OpenAI tool_calls; turn 2: the answer copied from the result
            call_turn, answer_turn = first[0].choices[0], first[-1].choices[0]
            # OpenAI tools rendered by trainer.encoding: the very prompt ids a dsec rollout of this problem starts from
            assert first[0].model_extra["prompt_token_ids"] == prompt_ids(tok, problem, "non-think")
            assert call_turn.finish_reason == "tool_calls"
            assert call_turn.message.tool_calls[0].function.name == "run_python"
            assert json.loads(call_turn.message.tool_calls[0].function.arguments) == {
                "code": f"print({problem.data['expr']})"}
            assert answer_turn.finish_reason == "stop" and answer_turn.message.content == problem.answer
            assert all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in call_turn.logprobs.content)
            assert after_first["executed"] - before["executed"] == 1

            samples = httpx.get(f"{gateway}/trajectories/{tid}/samples").json()["samples"]
            assert len(samples) == 1
            s = samples[0]
            r = Rollout(**s["rollout"])
            assert r.turns == 2 and r.tool_calls == 1 and len(s["logprobs"]) == sum(r.mask)
            recorded = iter(s["logprobs"])
            assert r.logprobs == [next(recorded) if m else 0.0 for m in r.mask]  # per id, as rollouts record them
            assert r.stop_reason == "eos" and r.policy_version == 1  # the first load of --weights
            # the sample is the exact sequence: prompt ids of turn 1 + sampled ids + tool result + sampled ids
            sampled = [t for resp in first for t in resp.choices[0].model_extra["token_ids"]]
            assert [i for i, m in zip(r.ids, r.mask) if m] == sampled
            last_prompt = first[-1].model_extra["prompt_token_ids"]
            assert r.ids == last_prompt + first[-1].choices[0].model_extra["token_ids"]
            # the tool result's tokens are in the sample and masked out of the loss
            result_ids = tok.encode(USER + f"<tool_result>{problem.answer}\n</tool_result>")
            start = next(i for i in range(len(r.ids)) if r.ids[i:i + len(result_ids)] == result_ids)
            assert not any(r.mask[start:start + len(result_ids)])
            assert not tito.check([(r.trajectory_id, r.ids, r.mask, r.sampled_hash)]).violations

            # re-running the harness with the same trajectory id replays the tool call: nothing executes again
            second = run_harness(gateway, client, tid, problem, sandboxes)
            after_second = dsec_server.steps()
            assert after_second["executed"] == after_first["executed"]
            assert after_second["replayed"] - after_first["replayed"] == 1
            assert second[-1].choices[0].message.content == problem.answer

            # reward, then both runs' samples go through one real GRPO update with the TITO check on
            assert httpx.post(f"{gateway}/trajectories/{tid}/reward", json={"reward": 1.0}).status_code == 200
            samples = httpx.get(f"{gateway}/trajectories/{tid}/samples").json()["samples"]
            rollouts = [Rollout(**x["rollout"]) for x in samples]
            assert len(rollouts) == 2 and all(x.reward == 1.0 for x in rollouts)
            model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
            model.load_state_dict(torch.load(overfit["weights"], weights_only=True))
            algo = AlgoConfig(kl_coef=0.0, rollout_correction="tis_token")
            metrics = Learner(model, algo, 1e-4, 1.0, tok.pad_id).update(rollouts, group_size=2)
            assert metrics["tito_violations"] == 0 and metrics["tito_unchecked"] == 0
            # the gateway's log-probs are the learner's own for the weights that sampled: importance ratio 1
            assert abs(metrics["rollout_is_ratio_max"] - 1) < 1e-3
        finally:
            for sb in sandboxes:
                try:
                    sb.destroy()
                except dsec.DsecError:
                    pass


@pytest.mark.timeout(300)
def test_grouping_n_choices_and_streaming(gateway, overfit):
    problem = overfit["problem"]
    oa = openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0)
    user = f"by-user-{time.time_ns()}"
    messages = [{"role": "user", "content": problem.prompt}]
    resp = oa.chat.completions.create(model=MODEL, messages=messages, n=2, seed=7, max_tokens=8, user=user)
    assert len(resp.choices) == 2 and resp.usage.completion_tokens == sum(len(c.model_extra["token_ids"])
                                                                          for c in resp.choices)
    again = oa.chat.completions.create(model=MODEL, messages=messages, n=2, seed=7, max_tokens=8, user=user)
    assert [c.model_extra["token_ids"] for c in again.choices] == [c.model_extra["token_ids"] for c in resp.choices]
    samples = httpx.get(f"{gateway}/trajectories/{user}/samples").json()["samples"]
    assert len(samples) == 4  # grouped by `user`: two requests x two choices, each its own leaf
    assert all(s["rollout"]["sampled_hash"] is not None for s in samples)
    assert httpx.delete(f"{gateway}/trajectories/{user}").json()["deleted_turns"] == 4  # the recorder's memory
    assert httpx.get(f"{gateway}/trajectories/{user}/samples").status_code == 404

    chunks = list(oa.chat.completions.create(model=MODEL, messages=messages, tools=_openai_tools("arithmetic"),
                                             temperature=0, max_tokens=96, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and calls[0].function.name == "run_python"

    raw = oa.chat.completions.create(model=MODEL, messages=messages, tools=_openai_tools("arithmetic"),
                                     tool_choice="none", temperature=0, max_tokens=96).choices[0]
    assert raw.finish_reason == "stop" and not raw.message.tool_calls and "run_python" in raw.message.content


@pytest.mark.timeout(300)
def test_bad_requests_get_the_status_the_client_expects(gateway, overfit):
    oa = openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0)
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-9", messages=user)
    bad = [
        dict(messages=[]),
        dict(messages=user, temperature=5),
        dict(messages=user, n=0),
        dict(messages=user, tool_choice="required", tools=_openai_tools("arithmetic")),
        dict(messages=user, stop=["\n"]),
        dict(messages=user, top_logprobs=3),
        dict(messages=[*user, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "run_python", "arguments": "{not json"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "1"}]),
        dict(messages=[*user, {"role": "tool", "tool_call_id": "nobody", "content": "1"}]),
        dict(messages=[{"role": "user", "content": "12345 " * 1000}]),
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as info:
            oa.chat.completions.create(model=MODEL, max_tokens=4, **kwargs)
        assert info.value.body["message"], kwargs
    raw = httpx.post(f"{gateway}/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "not JSON" in raw.json()["error"]["message"]
    assert httpx.get(f"{gateway}/trajectories/nope/samples").status_code == 404
    assert httpx.post(f"{gateway}/trajectories/nope/reward", json={"reward": "x"}).status_code == 400


def test_weights_file_changes_are_served(overfit, tmp_path):
    """The gateway follows a trainer that rewrites its checkpoint: a new file means a new policy version."""
    from trainer.gateway import PolicySource

    tok = V4Tokenizer.load(overfit["tokenizer"])
    path = tmp_path / "learner.pt"
    path.write_bytes(Path(overfit["weights"]).read_bytes())
    source = PolicySource(tok, "v4-tiny", path)
    assert source.version == 1
    source.refresh()
    assert source.version == 1
    state = torch.load(overfit["weights"], weights_only=True)
    torch.save({"model": {k: v * 0 for k, v in state.items()}}, tmp_path / "next.pt")
    (tmp_path / "next.pt").replace(path)  # as the learner writes it: temp file, then rename
    source.refresh()
    assert source.version == 2
    assert all(float(p.detach().abs().sum()) == 0 for p in source.model.parameters())
    torch.save({"manifest": {"step": 7}, "model": state}, tmp_path / "next.pt")  # a GRPO checkpoint names its step
    (tmp_path / "next.pt").replace(path)
    source.refresh()
    assert source.version == 7


@pytest.mark.parametrize("with_tools", [True, False])
def test_splice_follows_the_v4_reasoning_rule(overfit, with_tools):
    """Thinking mode: an echoed turn is spliced back as its sampled ids while V4 keeps its reasoning in the prompt
    (tools present, or the turn after the last user message); once V4 drops the reasoning, the ids no longer
    describe the prompt, so the turn is re-rendered and masked."""
    from trainer.encoding import EOS, ToolCall, render_tool_calls
    from trainer.gateway import Gateway, PolicySource
    from trainer.gateway_schema import parse_request
    from trainer.gateway_store import Turn

    tok = V4Tokenizer.load(overfit["tokenizer"])
    gateway = Gateway(PolicySource(tok, "v4-tiny", None), "high")
    tid = "splice"
    reasoning = "I should compute it."
    call = ToolCall(name="run_python", arguments={"code": "print(1 + 2)"})
    body = f"{reasoning}</think>" + ("\n\n" + render_tool_calls([call]) if with_tools else "3") + EOS
    sampled = tok.encode(body)
    gateway.recorder.record(tid, Turn(
        turn_id="call_r1_0", request_id="r1", choice=0, prompt_ids=[], prompt_mask=[], prompt_logprobs=[],
        completion_ids=sampled, logprobs=[-0.5] * len(sampled), content="" if with_tools else "3",
        reasoning=reasoning, tool_calls=[call] if with_tools else [], finish_reason="stop", policy_version=0))
    echo = {"role": "assistant", "content": None if with_tools else "3"}
    if with_tools:
        echo["tool_calls"] = [{"id": "call_r1_0_0", "type": "function",
                               "function": {"name": "run_python", "arguments": '{"code": "print(1 + 2)"}'}}]
    messages = [{"role": "user", "content": "What is 1 + 2?"}, echo]
    messages.append({"role": "tool", "tool_call_id": "call_r1_0_0", "content": "3\n"} if with_tools
                    else {"role": "user", "content": "And 2 + 2?"})
    body_json = {"model": MODEL, "messages": messages}
    if with_tools:
        body_json["tools"] = _openai_tools("arithmetic")
    ids, mask, lps, parents = gateway.prompt(parse_request(body_json), tid)
    if with_tools:  # reasoning kept: the exact sampled ids, trainable, with their log-probs
        assert parents == ["call_r1_0"] and sum(mask) == len(sampled)
        start = mask.index(1)
        assert ids[start:start + len(sampled)] == sampled and lps[start] == -0.5
    else:  # V4 drops reasoning before the last user turn: re-rendered text, nothing trainable
        assert parents == [] and sum(mask) == 0 and reasoning not in tok.decode(ids)


@pytest.mark.timeout(300)
def test_journal_keeps_samples_across_a_restart(overfit, tmp_path):
    from trainer.gateway_store import Recorder

    journal, tid = tmp_path / "samples.jsonl", "journal/prompt-0/sample-0"
    with started_gateway(overfit, "--journal", str(journal)) as url:
        oa = openai.OpenAI(base_url=url, api_key="-", max_retries=0, default_headers={"X-Dsec-Trajectory": tid})
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": overfit["problem"].prompt}],
                                   tools=_openai_tools("arithmetic"), max_tokens=96, temperature=0)
        assert httpx.post(f"{url}/trajectories/{tid}/reward", json={"reward": 0.5}).status_code == 200
        before = httpx.get(f"{url}/trajectories/{tid}/samples").json()
    assert before["samples"][0]["rollout"]["reward"] == 0.5
    with started_gateway(overfit, "--journal", str(journal)) as url:
        assert httpx.get(f"{url}/trajectories/{tid}/samples").json() == before
        assert httpx.delete(f"{url}/trajectories/{tid}").status_code == 200
    assert Recorder(journal).trajectory_ids() == []  # the deletion is journaled too

"""The incremental V4 decoder samples what recomputation samples (trainer.v4_decode behind trainer.sampler).

Random-init policies with the parameters that init to zero (compressor position biases, attention sinks) drawn
at random, so the compression windows and sinks weigh in; ragged prompts from 1 token (shorter than a compression
window) to 300 (past the 64-token sliding window), and per-row budgets that end rows at different steps.
"""

from __future__ import annotations

import pytest
import torch

from trainer import v4_decode
from trainer.policy import build_policy
from trainer.sampler import logits_fn, sample, sample_generator, token_logprobs

EOS, PAD = 1, 2


def policy(name: str) -> torch.nn.Module:
    model = build_policy(name, 1024, 0, EOS, PAD, 0).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "position_bias" in pname or "sinks" in pname:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return model


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 4, 17, 63, 64, 65, 300][:n] + [int(torch.randint(2, 300, (1,), generator=gen))
                                                   for _ in range(max(0, n - 8))]
    return [torch.randint(3, 1024, (length,), generator=gen).tolist() for length in lengths]


def run(model, batch, budgets, temperature, incremental, keys=None):
    logprobs = [[] for _ in batch]
    keys = keys or list(range(len(batch)))
    out = sample(model, batch, [sample_generator("t", k) for k in keys], max_new_tokens=budgets, eos_id=EOS,
                 pad_id=PAD, temperature=temperature, logprobs=logprobs, incremental=incremental)
    return out, logprobs


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return policy("v4-tiny")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_same_ids_and_logprobs_as_recomputation(tiny, temperature):
    batch = prompts(8)
    budgets = [40, 37, 34, 31, 28, 25, 22, 19]
    ref_ids, ref_lp = run(tiny, batch, budgets, temperature, incremental=False)
    ids, lp = run(tiny, batch, budgets, temperature, incremental=True)
    assert ids == ref_ids
    assert [len(x) for x in ids] == budgets or any(EOS in x for x in ids)
    for a, b in zip(lp, ref_lp):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_logprobs_match_the_learner(tiny):
    batch = prompts(8)
    ids, lp = run(tiny, batch, [30] * 8, 1.0, incremental=True)
    full = [p + x for p, x in zip(batch, ids)]
    learner = token_logprobs(tiny, full, PAD)
    for row, (p, x) in enumerate(zip(batch, ids)):
        got = learner[row, len(p) - 1: len(p) - 1 + len(x)]
        assert torch.allclose(got, torch.tensor(lp[row]), atol=1e-5)


def test_a_row_samples_the_same_alone_or_in_any_batch(tiny):
    batch = prompts(8)
    together, _ = run(tiny, batch, [24] * 8, 1.0, incremental=True)
    for row in (0, 5, 7):
        alone, _ = run(tiny, [batch[row]], [24], 1.0, incremental=True, keys=[row])
        assert alone[0] == together[row]
    reordered, _ = run(tiny, batch[::-1], [24] * 8, 1.0, incremental=True, keys=list(range(8))[::-1])
    assert reordered[::-1] == together


def test_sliding_only_layers_match_recomputation():
    torch.set_num_threads(1)
    model = policy("v4-small")
    batch = prompts(6, seed=3)
    budgets = [20, 5, 20, 12, 20, 1]
    assert run(model, batch, budgets, 0.0, True)[0] == run(model, batch, budgets, 0.0, False)[0]


def test_recomputes_where_incremental_decoding_would_not_be_exact(tiny):
    cfg = tiny.config
    limit = (cfg.index_topk + 1) * cfg.compress_rates["compressed_sparse_attention"]
    assert isinstance(logits_fn(tiny, [[5] * (limit - 11)], [10], PAD), v4_decode.V4Decoder)
    # Past the indexer's top-k a query would no longer see every compressed entry: recompute.
    assert not isinstance(logits_fn(tiny, [[5] * (limit - 10)], [10], PAD), v4_decode.V4Decoder)
    assert not isinstance(logits_fn(tiny, [[5] * 10], [10], PAD, incremental=False), v4_decode.V4Decoder)
    qwen = build_policy("qwen3-tiny", 1024, 0, EOS, PAD, 0).eval()
    assert not v4_decode.supports(qwen, 100)
    tiny.train()
    try:
        assert not v4_decode.supports(tiny, 100)
    finally:
        tiny.eval()


def test_decoder_refuses_rows_out_of_step(tiny):
    decoder = v4_decode.V4Decoder(tiny, 64, PAD)
    seqs = [[5, 6, 7], [8, 9]]
    decoder(seqs, [0, 1])
    seqs[0] += [10, 11]
    with pytest.raises(ValueError, match="one new token"):
        decoder(seqs, [0])

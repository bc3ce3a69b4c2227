"""Tokenizer, task generators and the V4 policy configs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data import corpus, demo_pieces, problems, tokenize_pieces
from trainer.encoding import SPECIAL_TOKENS
from trainer.policy import build_policy, size_report
from trainer.sampler import token_logprobs
from trainer.tokenizer import train

TOK = train(corpus(["arithmetic", "fix_module"], 0, 60, "non-think"), 512)


def test_special_tokens_are_single_ids():
    for token in SPECIAL_TOKENS:
        assert len(TOK.encode(token)) == 1, token


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_byte_level_round_trip(text):
    assert TOK.decode(TOK.encode(text)) == text


def test_problems_are_seeded_and_splits_disjoint():
    a = problems(["arithmetic", "fix_module"], "train", 20, 0)
    assert a == problems(["arithmetic", "fix_module"], "train", 20, 0)
    held = problems(["arithmetic", "fix_module"], "heldout", 20, 0)
    assert not {p.prompt for p in a} & {p.prompt for p in held}
    ids, mask = tokenize_pieces(TOK, demo_pieces(a[0], "non-think"))
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)


def test_v4_flash_shape_on_meta_device():
    report = size_report("v4-flash")
    assert 2.7e11 < report["total_params"] < 3.0e11  # the published 284B
    assert 1.2e10 < report["active_params"] < 1.5e10  # and 13B active
    assert report["kv_cache_bytes_per_token"] > 0 and report["flops_per_token"] > 2 * 1.2e10


def test_tiny_policy_is_prefix_causal():
    """Log-probs of a prefix do not change when tokens follow it (sampler and learner must agree)."""
    model = build_policy("v4-tiny", TOK.vocab_size, TOK.bos_id, TOK.eos_id, TOK.pad_id, seed=0).eval()
    seq = torch.randint(10, TOK.vocab_size, (300,)).tolist()
    with torch.no_grad():
        short = token_logprobs(model, [seq[:150]], TOK.pad_id)
        long = token_logprobs(model, [seq, seq[:150]], TOK.pad_id)
    assert torch.allclose(short[0], long[0, :149], atol=1e-5)
    assert torch.allclose(short[0], long[1, :149], atol=1e-5)

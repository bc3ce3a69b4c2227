"""Token sampling for rollouts: batched, tokens in and tokens out, reproducible per sample.

Why not `model.generate`: the rollout needs the exact sampled ids and their log-probs, a per-sample RNG (so a
sample's tokens do not depend on which other samples share its batch, which makes a resumed step identical to
the interrupted one), and per-sequence token budgets. DeepSeek-V4 policies decode incrementally from per-row
state (`trainer.v4_decode`: transformers' cache needs every row at the same position, rollouts are ragged);
any other causal LM, or a V4 context too long for that decoder to be exact, recomputes the right-padded batch
for every token, which is exactly what the learner sees and costs O(T^2) attention per token.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from transformers import PreTrainedModel

from trainer import v4_decode

# Next-token logits [len(active), V] at the last position of each active row of `seqs`.
LogitsFn = Callable[[list[list[int]], list[int]], torch.Tensor]


def sample_generator(*key: object) -> torch.Generator:
    """A torch RNG seeded from any key (run seed, step, prompt, sample): stable across processes."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    return gen


def right_pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p
    sorted_logits[drop] = float("-inf")
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def next_token_logits(model: PreTrainedModel, batch: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last real position only: the output projection runs on B positions, not B x T.

    Why: at these sizes the vocabulary projection over every position is a large share of a forward pass
    (`generate` skips it the same way with `logits_to_keep=1`, which right-padded rows cannot use). The decoder
    and output embeddings are the causal LM's own (`get_decoder`, `get_output_embeddings`), so any architecture
    whose logits are that projection of the last hidden state (DeepSeek-V4, Qwen, Llama…) gets the same numbers.
    """
    hidden = model.get_decoder()(input_ids=batch).last_hidden_state
    return model.get_output_embeddings()(hidden[torch.arange(len(last)), last]).float()


def recompute_logits(model: PreTrainedModel, pad_id: int) -> LogitsFn:
    """The cache-free path: one full forward of the right-padded active rows per token (any causal LM)."""

    def logits(seqs: list[list[int]], active: list[int]) -> torch.Tensor:
        batch = right_pad([seqs[i] for i in active], pad_id)
        return next_token_logits(model, batch, torch.tensor([len(seqs[i]) - 1 for i in active]))

    return logits


def logits_fn(model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: list[int], pad_id: int,
              incremental: bool = True) -> LogitsFn:
    """The incremental V4 decoder when it is exact for these contexts, else recomputation."""
    capacity = max((len(p) + n for p, n in zip(prompts, max_new_tokens)), default=0)
    if incremental and v4_decode.supports(model, capacity):
        return v4_decode.V4Decoder(model, capacity, pad_id)
    return recompute_logits(model, pad_id)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompts: list[list[int]],
    generators: list[torch.Generator],
    *,
    max_new_tokens: list[int],
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    logprobs: list[list[float]] | None = None,
    incremental: bool = True,
    on_done: Callable[[int, list[int]], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt until EOS (kept) or its own budget; returns only the new ids per prompt.

    `logprobs`: when given (one list per prompt), receives log π(token) of each sampled id under the model's
    own distribution (temperature 1, no top-p: what the learner computes), from the logits already at hand, so
    the learner can correct for the sampler being off-policy. `incremental=False` forces recomputation (the
    reference the incremental decoder is tested and benchmarked against).

    `on_done(i, ids)`: called on this thread with row i's new ids as soon as the row is complete (they and its
    log-probs, when asked, are final), while the other rows go on decoding: the rollout loop starts a row's tool calls there, so they run
    in the sandbox while the batch's longer rows are still being sampled. It changes nothing that is sampled.
    """
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    active = [i for i, budget in enumerate(max_new_tokens) if budget > 0]
    if on_done is not None:
        for i, budget in enumerate(max_new_tokens):
            if budget <= 0:
                on_done(i, new[i])
    next_logits = logits_fn(model, seqs, max_new_tokens, pad_id, incremental)
    while active:
        step_logits = next_logits(seqs, active)
        step_logp = torch.log_softmax(step_logits, dim=-1) if logprobs is not None else None
        still: list[int] = []
        for row, i in enumerate(active):
            scores = step_logits[row]
            if temperature <= 0:
                token = int(scores.argmax())
            else:
                probs = torch.softmax(_filter_top_p(scores / temperature, top_p), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generators[i]))
            seqs[i].append(token)
            new[i].append(token)
            if step_logp is not None:
                logprobs[i].append(float(step_logp[row, token]))
            if token != eos_id and len(new[i]) < max_new_tokens[i]:
                still.append(i)
            elif on_done is not None:
                on_done(i, new[i])
        active = still
    return new


def token_logprobs(model: PreTrainedModel, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """log p(token_t | tokens_<t) for each sequence, right-padded: shape [B, T-1] (position t predicts t+1)."""
    batch = right_pad(seqs, pad_id)
    logits = model(input_ids=batch).logits.float()[:, :-1]
    return torch.log_softmax(logits, dim=-1).gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1)

"""Incremental decoding of transformers' DeepSeek-V4 for ragged batches: every row at its own position.

Why: the sampler used to recompute the whole right-padded batch for every new token, which costs O(T^2) attention
per token; at the demo's shapes (32 rows, 150-600-token contexts) that was ~90 % of a GRPO step. Why not
transformers' own cache: its CSA/HCA cache layers keep one compressor buffer and entry count per layer for the
whole batch, so all rows must sit at the same position, while rollouts are ragged (prompts of different lengths,
rows stopping at EOS at different times); left padding would move each row's compression windows and change its
numbers. Here each row keeps its own history: the sliding-window keys (K = V in V4), the compressors' raw
projections, and the compressed entries, each written when the row closes a window.

The math is the full forward's, module by module (the layers' own projections, norms, rotary, hyper-connections,
MoE and attention function), so the logits equal a recomputation's up to float summation order. One part is
skipped: the lightning indexer. It only chooses which compressed entries a query attends to, and while
`index_topk` covers every entry a query can see, it chooses all of them; `supports` says when that holds (the
tiny configs set `index_topk` to 256: contexts up to 1024 tokens), and the sampler recomputes otherwise.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

_LAYER_TYPES = {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}


def supports(model: PreTrainedModel, max_len: int) -> bool:
    """Whether `V4Decoder` decodes `model` exactly for contexts of up to `max_len` tokens."""
    cfg = model.config
    if cfg.model_type != "deepseek_v4" or not isinstance(model, v4.DeepseekV4ForCausalLM) or model.training:
        return False
    if set(cfg.layer_types) - _LAYER_TYPES or cfg._attn_implementation != "eager":
        return False
    if "compressed_sparse_attention" in cfg.layer_types:
        # A query at position p may see (p + 1) // rate entries; the indexer keeps them all while that is <= topk.
        return max_len < (cfg.index_topk + 1) * cfg.compress_rates["compressed_sparse_attention"]
    return True


class _LayerState:
    """One attention layer's per-row history, preallocated for the longest row."""

    def __init__(self, attn: v4.DeepseekV4Attention, rows: int, capacity: int, like: torch.Tensor):
        self.attn = attn
        self.comp = attn.compressor
        self.keys = like.new_zeros((rows, capacity, attn.head_dim))
        if self.comp is not None:
            width = self.comp.kv_proj.out_features
            self.comp_kv = like.new_zeros((rows, capacity, width))
            self.comp_gate = like.new_zeros((rows, capacity, width))
            self.entries = like.new_zeros((rows, capacity // self.comp.compress_rate + 1, attn.head_dim))

    def window_entries(self, rows: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """The compressed entry of window `windows[i]` of row `rows[i]`: the compressor's forward for one window.

        HCA pools the window's m tokens; CSA pools 2m: the previous window's first series (Ca) and this window's
        second (Cb), window 0's missing half weighted zero (zero kv, -inf gate), as in the module.
        """
        comp, m = self.comp, self.comp.compress_rate
        span = windows[:, None] * m + torch.arange(m)
        kv, gate = self.comp_kv[rows[:, None], span], self.comp_gate[rows[:, None], span] + comp.position_bias
        if isinstance(comp, v4.DeepseekV4CSACompressor):
            hd = comp.head_dim
            prev = (span - m).clamp(min=0)
            first = windows == 0
            prev_kv = self.comp_kv[rows[:, None], prev][..., :hd].masked_fill(first[:, None, None], 0.0)
            prev_gate = (self.comp_gate[rows[:, None], prev] + comp.position_bias)[..., :hd]
            prev_gate = prev_gate.masked_fill(first[:, None, None], float("-inf"))
            kv = torch.cat([prev_kv, kv[..., hd:]], dim=1)
            gate = torch.cat([prev_gate, gate[..., hd:]], dim=1)
        pooled = comp.kv_norm((kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(dim=1))[:, None]
        cos, sin = comp.rotary_emb(pooled, position_ids=(windows * m)[:, None], layer_type=comp.rope_layer_type)
        return v4.apply_rotary_pos_emb(pooled.unsqueeze(1), cos, sin)[:, 0, 0]

    def prefill(self, hidden: torch.Tensor, lengths: torch.Tensor, embeddings: dict) -> None:
        """Record what the prompts' full forward computed from this layer's input `hidden` [B, W, D]."""
        attn = self.attn
        width = hidden.shape[1]
        cos, sin = embeddings[attn.rope_layer_type]
        kv = attn.kv_norm(attn.kv_proj(hidden)).view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
        self.keys[:, :width] = v4.apply_rotary_pos_emb(kv, cos, sin)[:, 0]
        if self.comp is None:
            return
        self.comp_kv[:, :width] = self.comp.kv_proj(hidden)
        self.comp_gate[:, :width] = self.comp.gate_proj(hidden)
        counts = lengths // self.comp.compress_rate
        rows = torch.repeat_interleave(torch.arange(len(lengths)), counts)
        windows = torch.cat([torch.arange(int(c)) for c in counts]) if len(rows) else rows
        if len(rows):
            self.entries[rows, windows] = self.window_entries(rows, windows)

    def attend(self, hidden: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, embeddings: dict) -> torch.Tensor:
        """DeepseekV4Attention.forward for one new token per row (`hidden` [R, 1, D] at positions `pos` [R])."""
        attn = self.attn
        shape = (hidden.shape[0], 1, -1, attn.head_dim)
        cos, sin = embeddings[attn.rope_layer_type]
        q_residual = attn.q_a_norm(attn.q_a_proj(hidden))
        q = attn.q_b_norm(attn.q_b_proj(q_residual).view(*shape).transpose(1, 2))
        q = v4.apply_rotary_pos_emb(q, cos, sin)
        kv = attn.kv_norm(attn.kv_proj(hidden)).view(*shape).transpose(1, 2)
        self.keys[rows, pos] = v4.apply_rotary_pos_emb(kv, cos, sin)[:, 0, 0]

        # The sliding window: keys at positions p - window + 1 .. p (transformers' sliding_window_overlay).
        span = pos[:, None] + torch.arange(1 - attn.sliding_window, 1)
        keys = self.keys[rows[:, None], span.clamp(min=0)]
        mask = torch.zeros(span.shape).masked_fill(span < 0, float("-inf"))
        if self.comp is not None:
            m = self.comp.compress_rate
            self.comp_kv[rows, pos] = self.comp.kv_proj(hidden)[:, 0]
            self.comp_gate[rows, pos] = self.comp.gate_proj(hidden)[:, 0]
            closing = (pos + 1) % m == 0
            if bool(closing.any()):
                done, windows = rows[closing], (pos[closing] + 1) // m - 1
                self.entries[done, windows] = self.window_entries(done, windows)
            visible = (pos + 1) // m  # entries of windows that end at or before p
            count = int(visible.max())
            if count:
                keys = torch.cat([keys, self.entries[rows, :count]], dim=1)
                future = torch.arange(count)[None, :] >= visible[:, None]
                mask = torch.cat([mask, torch.zeros(future.shape).masked_fill(future, float("-inf"))], dim=1)
        keys = keys[:, None]
        interface = v4.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                             v4.eager_attention_forward)
        out, _ = interface(attn, q, keys, keys, mask[:, None, None, :].to(q.dtype), dropout=0.0,
                           scaling=attn.scaling, sliding_window=attn.sliding_window, s_aux=attn.sinks)
        out = v4.apply_rotary_pos_emb(out.transpose(1, 2), cos, -sin).transpose(1, 2)
        grouped = attn.o_a_proj(out.reshape(hidden.shape[0], 1, attn.config.o_groups, -1)).flatten(2)
        return attn.o_b_proj(grouped)


class V4Decoder:
    """Next-token logits for a ragged batch, one new token per row per call, from per-row state.

    Called like the sampler's recomputation: `decoder(seqs, active)` returns logits at the last position of each
    active row. The first call runs the prompts' full forward once (the prefill) and records every layer's
    state; later calls must come after one token was appended to each active row.
    """

    def __init__(self, model: PreTrainedModel, capacity: int, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.base: v4.DeepseekV4Model = model.model
        self.capacity = capacity
        self.done: list[int] | None = None  # tokens of each row already in the state
        self.layers: list[_LayerState] = []

    def __call__(self, seqs: list[list[int]], active: list[int]) -> torch.Tensor:
        if self.done is None:
            return self._prefill(seqs, active)
        if any(len(seqs[i]) != self.done[i] + 1 for i in active):
            raise ValueError("V4Decoder: each active row must have exactly one new token since the last call")
        rows = torch.tensor(active)
        pos = torch.tensor([self.done[i] for i in active])
        tokens = torch.tensor([seqs[i][-1] for i in active])
        for i in active:
            self.done[i] += 1
        return self._step(rows, pos, tokens)

    def _embeddings(self, like: torch.Tensor, position_ids: torch.Tensor) -> dict:
        rotary = self.base.rotary_emb
        return {kind: rotary(like, position_ids=position_ids, layer_type=kind) for kind in ("main", "compress")}

    def _prefill(self, seqs: list[list[int]], active: list[int]) -> torch.Tensor:
        rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
        batch = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_id)
        lengths = torch.tensor([len(s) for s in seqs])
        inputs: list[torch.Tensor] = []
        hooks = [layer.self_attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
                 for layer in self.base.layers]
        try:
            hidden = self.base(input_ids=batch).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        positions = torch.arange(batch.shape[1])[None]
        embeddings = self._embeddings(hidden, positions)
        self.layers = [_LayerState(layer.self_attn, len(seqs), self.capacity, hidden) for layer in self.base.layers]
        for state, layer_input in zip(self.layers, inputs):
            state.prefill(layer_input, lengths, embeddings)
        self.done = [len(s) for s in seqs]
        last = torch.tensor([len(seqs[i]) - 1 for i in active])
        return self.model.get_output_embeddings()(hidden[torch.tensor(active), last]).float()

    def _step(self, rows: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """DeepseekV4Model.forward + the LM head for one token per row; each layer as DeepseekV4DecoderLayer."""
        ids = tokens[:, None]
        embeds = self.base.embed_tokens(ids)
        embeddings = self._embeddings(embeds, pos[:, None])
        x = embeds.unsqueeze(2).expand(-1, -1, self.base.config.hc_mult, -1).contiguous()
        for layer, state in zip(self.base.layers, self.layers):
            dtype = x.dtype
            post, comb, collapsed = layer.attn_hc(x)
            attn_out = state.attend(layer.input_layernorm(collapsed), rows, pos, embeddings)
            mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), x)
            x = post.to(dtype).unsqueeze(-1) * attn_out.unsqueeze(-2) + mixed
            post, comb, collapsed = layer.ffn_hc(x)
            mlp_out = layer.mlp(layer.post_attention_layernorm(collapsed), input_ids=ids)
            mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), x)
            x = post.to(dtype).unsqueeze(-1) * mlp_out.unsqueeze(-2) + mixed
        hidden = self.base.norm(self.base.hc_head(x))
        return self.model.get_output_embeddings()(hidden[:, 0]).float()

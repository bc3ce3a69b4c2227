"""The policy: any transformers causal LM, by name; `transformers.DeepseekV4ForCausalLM` unless named otherwise.

Named configs (random init, our tokenizer's vocab): tiny V4 ones that train on 2 CPU cores while still exercising
CSA/HCA attention, mHC and MoE (hash-routed and top-k), a tiny Qwen3 (a second architecture, so nothing in the
trainer leans on V4 internals), and the published V4-Flash shape, only ever built on the meta device to report
its size. Any other name is a local model directory or a model id in the local Hugging Face cache: a directory
holding weights (a Hugging Face export, see trainer.hf_export) is loaded with them; otherwise only the config is
read and the model is built from it with random init. Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# Tiny enough to train on 2 CPU cores, but every V4 block is there: CSA (with the lightning indexer) and HCA
# attention, mHC hyper-connections, hash-routed and top-k MoE. `index_topk` covers every compressed entry of a
# 1024-token context: transformers' indexer picks its top-k before the causal mask, so a smaller k lets future
# tokens change earlier logits, and sampled log-probs would drift from the learner's. `partial_rotary_factor`:
# V4's default ropes 1/8 of a head, which at head_dim 32 is 4 dims (two frequencies) - too little position signal
# to copy digits (measured: 500 SFT steps copy 0/64 held-out expressions exactly; with half the head roped, 64/64).
_TINY: dict[str, Any] = dict(
    hidden_size=64,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    partial_rotary_factor=0.5,
    q_lora_rank=32,
    num_experts_per_tok=2,
    n_routed_experts=4,
    n_shared_experts=1,
    sliding_window=64,
    o_groups=2,
    o_lora_rank=32,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=256,
    hc_mult=2,
    hc_sinkhorn_iters=3,
    max_position_embeddings=2048,
    layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
)

# A Qwen3-style decoder of the same width: grouped-query attention with q/k norms, SwiGLU MLP, untied head.
_QWEN3_TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

# name -> (config class, model class, config kwargs). The published DeepSeek-V4-Flash shape: transformers'
# DeepseekV4Config defaults are that checkpoint's.
NAMED_CONFIGS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "v4-tiny": (DeepseekV4Config, DeepseekV4ForCausalLM, _TINY),
    "v4-small": (DeepseekV4Config, DeepseekV4ForCausalLM, {
        **_TINY, "hidden_size": 128, "num_hidden_layers": 4, "n_routed_experts": 8, "num_attention_heads": 4,
        "layer_types": ["sliding_attention", *_TINY["layer_types"], "compressed_sparse_attention"],
        "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"]}),
    "v4-flash": (DeepseekV4Config, DeepseekV4ForCausalLM, {}),
    "qwen3-tiny": (Qwen3Config, Qwen3ForCausalLM, _QWEN3_TINY),
}

# What a directory must hold for its weights to be loaded rather than only its config (save_pretrained's names).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def named_config(name: str, vocab_size: int | None, bos_id: int = 0, eos_id: int = 1, pad_id: int | None = None
                 ) -> PretrainedConfig:
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown named policy config {name!r}; choose one of {sorted(NAMED_CONFIGS)} or give "
                         "a local model directory")
    config_cls, _, kwargs = NAMED_CONFIGS[name]
    kwargs = dict(kwargs)
    if vocab_size is not None:
        kwargs.update(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return config_cls(**kwargs)


def v4_config(name: str, vocab_size: int | None, bos_id: int = 0, eos_id: int = 1, pad_id: int | None = None
              ) -> DeepseekV4Config:
    cfg = named_config(name, vocab_size, bos_id, eos_id, pad_id)
    if not isinstance(cfg, DeepseekV4Config):
        raise ValueError(f"{name!r} is not a DeepSeek-V4 config ({type(cfg).__name__})")
    return cfg


def has_weights(path: str | Path) -> bool:
    return Path(path).is_dir() and any((Path(path) / f).exists() for f in _WEIGHT_FILES)


def build_policy(name: str, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, seed: int) -> PreTrainedModel:
    """The policy named `name` in float32: random init from a named config or a model directory's config, or
    the weights of a model directory that has them (its vocabulary must then be the tokenizer's: ids index it)."""
    torch.manual_seed(seed)
    if name in NAMED_CONFIGS:
        return NAMED_CONFIGS[name][1](named_config(name, vocab_size, bos_id, eos_id, pad_id))
    if has_weights(name):
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=torch.float32)
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"policy {name!r} has a vocabulary of {model.config.vocab_size} ids but the tokenizer "
                             f"has {vocab_size}: load the tokenizer saved with that model (trainer.hf_export)")
        return model
    try:
        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError as exc:
        raise ValueError(f"policy {name!r} is neither a named config ({sorted(NAMED_CONFIGS)}) nor a model config "
                         "on this machine (nothing is downloaded: save it with save_pretrained first)") from exc
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = vocab_size, bos_id, eos_id, pad_id
    return AutoModelForCausalLM.from_config(cfg)


def size_report(name: str, context: int = 1 << 20) -> dict[str, float]:
    """Parameter counts (meta device: nothing allocated), per-token forward FLOPs and KV-cache bytes.

    FLOPs/token = 2 x active parameters (routed experts scaled by top-k / n_routed; embedding excluded) plus
    the attention score/value products over the entries a token attends to at `context`. KV cache counts one
    shared KV head (MQA) per layer: the sliding window, plus one compressed entry per `compress_rate` tokens
    (CSA also keeps its indexer keys), in bf16.
    """
    cfg = v4_config(name, None)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embed = model.model.embed_tokens.weight.numel()
    active = total - routed + routed * cfg.num_experts_per_tok / cfg.n_routed_experts
    attn_flops = 0.0
    kv_elems = 0.0
    for layer_type in cfg.layer_types:
        attended = min(cfg.sliding_window, context)
        kv_elems += cfg.sliding_window * cfg.head_dim / context
        if layer_type != "sliding_attention":
            rate = cfg.compress_rates[layer_type]
            entries = context / rate
            kv_elems += cfg.head_dim / rate
            if layer_type == "compressed_sparse_attention":
                kv_elems += cfg.index_head_dim / rate
                attn_flops += 2 * cfg.index_n_heads * cfg.index_head_dim * entries  # lightning indexer scores
                entries = min(entries, cfg.index_topk)
            attended += entries
        attn_flops += 4 * cfg.num_attention_heads * cfg.head_dim * attended
    return {
        "total_params": float(total),
        "active_params": float(active),
        "active_params_no_embed": float(active - embed),
        "flops_per_token": 2 * (active - embed) + attn_flops,
        "kv_cache_bytes_per_token": kv_elems * 2,
        "context": float(context),
        "layers": float(cfg.num_hidden_layers),
    }

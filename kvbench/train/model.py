"""Model construction for training, keyed by `model.arch`: `llama`, or `block` (a Block Transformer,
`kvbench.block_model`, Ho et al., NeurIPS 2024, arXiv 2406.02657).

A CLA model (Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention",
NeurIPS 2024, arXiv 2405.12981) is a stock `LlamaForCausalLM` whose config carries `kvbench_kv_sharing: s`;
kvbench's registered attention function makes layer i attend over the keys and values of layer i - i % s
(`kvbench.attention.shared_key_value`, fed by the `kvbench_shared_kv` dict each forward gets). Deviation
from the paper: the consumer layers keep their own k_proj / v_proj (transformers' Llama always has them);
they never reach the output, so they get no gradient, stay at their initial values, are left out of the
parameter counts, and cost the compute of two small projections per consumer layer.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from kvbench import attention, block_model
from kvbench.attention import KV_SHARING_CONFIG, SHARED_KV_KWARG
from kvbench.train.config import ModelShape


def _llama(shape: ModelShape, vocab_size: int, bos_id: int | None, eos_id: int | None) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.resolved_intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.resolved_head_dim,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        **{KV_SHARING_CONFIG: shape.kv_sharing},
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention.register())


def _block(shape: ModelShape, vocab_size: int, bos_id: int | None, eos_id: int | None) -> PreTrainedModel:
    block_layers = shape.resolved_block_layers
    config = block_model.BlockConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.resolved_intermediate,
        block_layers=block_layers,
        token_layers=shape.layers - block_layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.resolved_head_dim,
        block_len=shape.block_len,
        prefix_tokens=shape.prefix_tokens,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    block_model.register()
    return AutoModelForCausalLM.from_config(config)


ARCHITECTURES: dict[str, Callable[..., PreTrainedModel]] = {"llama": _llama, "block": _block}


def build_model(
    shape: ModelShape, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None
) -> PreTrainedModel:
    """A freshly initialised model (transformers' own initialisation; seed torch first for a given draw)."""
    return ARCHITECTURES[shape.arch](shape, vocab_size, bos_id, eos_id)


def forward_kwargs() -> dict:
    """Keywords of every training or evaluation forward: a new dict through which CLA layers share K/V."""
    return {SHARED_KV_KWARG: {}}


def unused_parameters(model: PreTrainedModel) -> set[str]:
    """Names of the parameters a CLA model never uses: the K/V projections of every consumer layer."""
    sharing = getattr(model.config, KV_SHARING_CONFIG, 1)
    return {
        f"model.layers.{idx}.self_attn.{proj}.weight"
        for idx in range(model.config.num_hidden_layers)
        if idx % sharing
        for proj in ("k_proj", "v_proj")
    }


def parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Parameters the model uses (tied embeddings counted once); `non_embedding` leaves out the token
    embedding and the output head, the part that tracks a model's compute per token."""
    unused = unused_parameters(model)
    seen: set[int] = set()
    total = embedding = 0
    for name, param in model.named_parameters():  # yields a tied tensor once
        if name in unused or id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if "embed_tokens" in name or "lm_head" in name:
            embedding += param.numel()
    unused_count = sum(p.numel() for n, p in model.named_parameters() if n in unused)
    return {"params": total, "params_non_embedding": total - embedding, "params_unused": unused_count}


def kv_bytes_per_token(model: PreTrainedModel, bytes_per_element: int) -> float:
    """What the architecture stores per token (2 x KV-producing layers x kv heads x head_dim x element size):
    the formula, for reference next to bytes measured from a kvbench cache."""
    config = model.config
    if config.model_type == block_model.MODEL_TYPE:
        # One block-decoder entry per L_B tokens; the token decoder's P + L_B - 1 local entries and the start
        # block's are per sequence, not per token (`block_model.kv_bytes_formula` counts them for a length).
        per_block = 2 * config.block_layers * config.num_key_value_heads * config.head_dim * bytes_per_element
        return per_block / config.block_len
    producers = len(range(0, config.num_hidden_layers, getattr(config, KV_SHARING_CONFIG, 1)))
    return 2 * producers * config.num_key_value_heads * config.head_dim * bytes_per_element

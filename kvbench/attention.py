"""The attention function kvbench registers with transformers (`AttentionInterface`), and decode attention.

transformers calls the function with the keys/values the cache's `update` returned; it hands them to the
cache layer's `attend`. The engine passes its cache to the forward as the keyword `kvbench_cache`, which
transformers forwards untouched to every attention call: nothing is patched, nothing global is looked up
(a context variable would break `torch.compile` graphs), and a forward without it is plain causal attention.

A model trained with cross-layer KV sharing (CLA) is a stock model whose config carries
`kvbench_kv_sharing: s`: layer i attends over the keys and values of layer i - i % s. With a kvbench cache,
the cache's layers do the sharing (`kvbench.cache.SharedLayer`). Without one (training, sliding-window
perplexity), the caller passes an empty dict per forward as `kvbench_shared_kv`: producer layers put their
keys and values in it, the layers after them read theirs from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvbench import kernels

if TYPE_CHECKING:
    from kvbench.cache import KVCache

NAME = "kvbench"
CACHE_KWARG = "kvbench_cache"
SHARED_KV_KWARG = "kvbench_shared_kv"
KV_SHARING_CONFIG = "kvbench_kv_sharing"  # the model config's key for its sharing factor


def kvbench_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache: KVCache | None = kwargs.get(CACHE_KWARG)
    if cache is None:
        # A forward without a kvbench cache (e.g. sliding-window perplexity): plain causal attention.
        key, value = shared_key_value(module, key, value, kwargs.get(SHARED_KV_KWARG))
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2), None
    return cache.layer_for(module.layer_idx).attend(query, key, value, scaling), None


def shared_key_value(
    module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, shared: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values this layer attends over in a forward without a cache: its own, unless the model
    shares them across layers; then a producer records its own in `shared` and a consumer reads its
    producer's (recorded earlier in the same forward)."""
    sharing = getattr(module.config, KV_SHARING_CONFIG, 1)
    if sharing == 1:
        return key, value
    if shared is None:
        raise RuntimeError(
            f"this model shares keys and values across layers ({KV_SHARING_CONFIG}={sharing}): pass "
            f"{SHARED_KV_KWARG}={{}} (a new empty dict) to each forward, or a kvbench cache"
        )
    producer = module.layer_idx - module.layer_idx % sharing
    if producer == module.layer_idx:
        shared[producer] = (key, value)
        return key, value
    return shared[producer]


def register() -> str:
    """Register the attention function (idempotent) and return the name to select it with."""
    from transformers import AttentionInterface  # 1.5 s of imports: only once a model is about to load

    AttentionInterface.register(NAME, kvbench_attention)
    return NAME


def _kernels():
    """kvbench.kernels where Triton is installed, else None (PyTorch serves)."""
    return kernels if kernels.triton is not None else None


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    with_received: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per sequence over a fixed slot buffer, live slots only (positions >= 0, or below the length).

    query [B, Hq, D], keys/values [B, Hkv, S, D], positions [B, Hkv, S], or each sequence's length [B] for
    a cache whose slot i holds position i (`kernels.decode_attention`); returns out [B, Hq, D] and, if
    asked, the attention each slot received, summed over each KV head's query heads (float32 [B, Hkv, S],
    0 on empty slots). KV heads are never expanded: on CUDA Triton flash-decoding kernels read each K/V
    tile once for all the query heads of its group (and the received attention comes from their
    log-sum-exp); elsewhere SDPA with `enable_gqa` and a mask, whose CPU kernels do not expand either.
    """
    triton_kernels = _kernels() if query.is_cuda else None
    if triton_kernels is not None:
        out, lse = triton_kernels.decode_attention(query, keys, values, positions, scaling)
        received = triton_kernels.received_attention(query, keys, positions, scaling, lse) if with_received else None
        return out, received
    group = query.shape[1] // keys.shape[1]
    positions = kernels.as_positions(positions, keys)
    live = (positions >= 0).repeat_interleave(group, dim=1).unsqueeze(2)  # [B, Hq, 1, S]
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2), keys, values, attn_mask=live, scale=scaling, enable_gqa=True
    )
    received = received_attention(query, keys, positions, scaling) if with_received else None
    return out.squeeze(2), received


def received_attention(
    query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention each live slot receives from one decode query, summed over each KV head's query heads.

    query [B, Hq, D], keys [B, Hkv, S, D], positions [B, Hkv, S]; returns float32 [B, Hkv, S], 0 on empty slots.
    """
    b, hq, d = query.shape
    hkv = keys.shape[1]
    q = query.view(b, hkv, hq // hkv, d).float()
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.float()) * scaling
    logits = logits.masked_fill((positions < 0).unsqueeze(2), float("-inf"))
    return logits.softmax(dim=-1).sum(dim=2)


def received_attention_prefill(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention each key receives from a chunk of causal prefill queries, summed over queries and each KV
    head's query heads: float32 [B, Hkv, S].

    query [B, Hq, T, D] are the last T of the S positions in `keys` [B, Hkv, S, D]. On CUDA two Triton
    kernels compute it without materialising any probabilities (`kernels.received_attention_prefill`);
    elsewhere the PyTorch reference does, over blocks of queries.
    """
    triton_kernels = _kernels() if query.is_cuda else None
    if triton_kernels is not None:
        return triton_kernels.received_attention_prefill(query, keys, scaling)
    return kernels.received_attention_prefill_reference(query, keys, scaling)

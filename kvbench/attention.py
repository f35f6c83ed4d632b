"""The attention function kvbench registers with transformers (`AttentionInterface`).

transformers calls it with the keys/values the cache's `update` returned; it hands them to the cache
layer's `attend`, which masks by slot and never expands KV heads under GQA. The active cache is bound per
forward call by the engine (`bind`), so nothing is patched and nothing global outlives a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvbench.cache import KVCache

NAME = "kvbench"
_active_cache: ContextVar[KVCache | None] = ContextVar("kvbench_active_cache", default=None)


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
    cache = _active_cache.get()
    if cache is None:
        # A forward without a kvbench cache (e.g. sliding-window perplexity): plain causal attention.
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2), None
    return cache.layers[module.layer_idx].attend(query, key, value, scaling), None


def register() -> str:
    """Register the attention function (idempotent) and return the name to select it with."""
    AttentionInterface.register(NAME, kvbench_attention)
    return NAME


@contextmanager
def bind(cache: KVCache | None) -> Iterator[None]:
    """Make `cache` the one attention uses for forwards inside this block."""
    token = _active_cache.set(cache)
    try:
        yield
    finally:
        _active_cache.reset(token)

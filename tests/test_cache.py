"""The cache container: batching finished prefills into one decode batch."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from kvbench.cache import KVCache, ModelSpec
from kvbench.method import Method
from kvbench.methods.arkvale import ArkVale
from kvbench.methods.full import Full

MODEL = ModelSpec("test", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, max_positions=256)


def prefilled(prompt_len: int, seed: int, method: Method | None = None) -> KVCache:
    cache = (method or Full()).make_cache(MODEL, prompt_len, decode_len=4)
    generator = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        keys = torch.randn(1, 2, prompt_len, 8, generator=generator)
        layer.update(keys, keys + 1)
        layer.observe(torch.randn(1, 4, prompt_len, 8, generator=generator), None)  # ArkVale ranks pages by it
    cache.finish_prefill()
    return cache


def test_stack_frees_each_sequences_layers_as_it_goes():
    """Stacking must not hold every sequence's cache and the batch's at once (twice the KV: a 4 x 30k
    batch of a 7B MHA model then no longer fits an 80 GB GPU); each sequence's layer is released once
    stacked."""
    caches = [prefilled(16, seed) for seed in range(3)]
    expected = [torch.cat([c.layers[i].keys for c in caches]) for i in range(3)]
    first_layers = [weakref.ref(c.layers[0]) for c in caches]
    stacked = KVCache.stack(caches)
    gc.collect()
    assert all(ref() is None for ref in first_layers)
    for i, layer in enumerate(stacked.layers):
        assert torch.equal(layer.keys, expected[i])
        assert layer.seen.tolist() == [16, 16, 16]


def test_stack_frees_the_layers_of_a_method_with_a_step_schedule():
    """Also where the cache lists its layers a second time (those with step variants: ArkVale's host
    backups, a batch's whole size again in host memory, stayed alive until the batch finished)."""
    method = ArkVale(budget=16, page_size=4, n_win_pages=1, page_topk=2, exempt_layers=0)
    caches = [prefilled(40, seed, method) for seed in range(3)]
    assert all(cache.variant_layers for cache in caches)
    held = [weakref.ref(layer.host_keys) for cache in caches for layer in cache.layers]
    stacked = KVCache.stack(caches)
    assert all(ref() is None for ref in held)
    assert all(layer.host_keys.shape[0] == 3 for layer in stacked.layers)


def test_an_active_layer_is_what_every_layer_index_gets_in_a_trace_and_a_mismatch_raises_outside():
    """The engine's compiled layers reach their cache layer as the cache's active one (one trace for every
    layer alike); with none active, a layer's index picks it; outside a trace, another index than the
    active one is an error, not the active layer's cache."""
    cache = prefilled(16, seed=0)
    assert cache.layer_for(2) is cache.layers[2]
    cache.activate(1)
    assert cache.layer_for(1) is cache.layers[1]
    with pytest.raises(RuntimeError, match="layer 0 asked for its cache while layer 1 is active"):
        cache.layer_for(0)
    traced = torch.compile(lambda x: x + 1 if cache.layer_for(0) is cache.layers[1] else x, backend="eager")
    assert torch.equal(traced(torch.zeros(1)), torch.ones(1))  # in a trace: the active one, unchecked
    cache.activate(None)
    assert cache.layer_for(0) is cache.layers[0]

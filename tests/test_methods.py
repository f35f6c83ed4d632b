"""Invariants every method must keep, over every method config in configs/method/."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvbench.config import build
from kvbench.engine import Engine
from kvbench.methods.full import Full
from tests.conftest import compose_config, method_names

PROMPT = list(range(100, 340))  # 240 token ids
NEW_TOKENS = 12


def make_method(name: str, budget: int | None):
    overrides = [f"method={name}"]
    cfg = compose_config(*overrides)
    method = build(cfg).method
    names = {f.name for f in dataclasses.fields(method)}
    if budget is not None and "budget" in names:
        changes = {"budget": budget}
        if "page_size" in names:
            changes["page_size"] = 8  # paged methods: 64 tokens must hold sinks + window + selected pages
        method = dataclasses.replace(method, **changes)
    return method


@pytest.mark.parametrize("name", method_names())
def test_budget_at_least_context_reproduces_full_cache(tiny, name):
    model, tokenizer, spec = tiny
    reference = Engine(model, tokenizer, Full(), spec, prefill_chunk=64)
    engine = Engine(model, tokenizer, make_method(name, budget=1024), spec, prefill_chunk=64)
    expected = reference.generate(PROMPT, NEW_TOKENS)
    got = engine.generate(PROMPT, NEW_TOKENS)
    assert got.token_ids == expected.token_ids
    # The continuation's log-likelihood depends on every logit along the way: it must match exactly.
    continuation = list(range(400, 420))
    assert (
        engine.score_continuation(PROMPT, continuation).nll_sum
        == reference.score_continuation(PROMPT, continuation).nll_sum
    )


@pytest.mark.parametrize("name", [n for n in method_names() if n != "full"])
def test_small_budget_stores_fewer_bytes_than_dense(tiny, name):
    model, tokenizer, spec = tiny
    small = Engine(model, tokenizer, make_method(name, budget=64), spec, prefill_chunk=64).generate(PROMPT, 8)
    larger = Engine(model, tokenizer, make_method(name, budget=128), spec, prefill_chunk=64).generate(PROMPT, 8)
    m_small, m_larger = small.measurement, larger.measurement
    assert m_small.kv_bytes_device < m_larger.kv_bytes_device < m_small.dense_kv_bytes
    assert m_small.kv_bytes_device_peak >= m_small.kv_bytes_device  # prefill holds the whole prompt
    assert len(small.token_ids) == 8


def test_full_bytes_equal_dense_formula(tiny):
    model, tokenizer, spec = tiny
    m = Engine(model, tokenizer, Full(), spec).generate(PROMPT, NEW_TOKENS).measurement
    # Dense slot buffers are allocated in multiples of 64 slots: 252 tokens take 256.
    assert m.kv_bytes_device == m.dense_kv_bytes == 2 * 4 * 2 * 32 * 4 * 256


@pytest.mark.parametrize("name", [n for n in method_names() if n not in ("full",)])
def test_cache_shapes_stay_fixed_during_decode(tiny, name):
    model, tokenizer, spec = tiny
    method = make_method(name, budget=64)
    engine = Engine(model, tokenizer, method, spec, prefill_chunk=64)
    cache = engine.new_cache(len(PROMPT), 6)
    with torch.inference_mode():
        engine._prefill(cache, PROMPT)
        cache.finish_prefill()
        shapes = [tuple(layer.keys.shape) for layer in cache.layers]
        for step in range(6):
            engine._forward(cache, [500 + step], len(PROMPT) + step)
            assert [tuple(layer.keys.shape) for layer in cache.layers] == shapes

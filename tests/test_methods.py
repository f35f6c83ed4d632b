"""Invariants every method must keep, over every method config in configs/method/."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvbench import cache as cache_module
from kvbench import quantized_layer
from kvbench.cache import FullLayer, SharedLayer
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


def budget_for(method, tokens: int | None) -> object:
    """`method` with a budget of exactly `tokens` (rounded up to whole pages for paged methods); None: 1024."""
    if tokens is None:
        return method
    page = getattr(method, "page_size", 1)
    return dataclasses.replace(method, budget=-(-tokens // page) * page)


@pytest.mark.parametrize("at", ["above", "run length", "tokens held"])
@pytest.mark.parametrize("name", [n for n in method_names() if n != "full"])
def test_budget_at_least_context_reproduces_full_cache(tiny, name, at):
    """A budget at or above the tokens a run holds keeps them all: the full cache's tokens and likelihoods,
    far above that (1024), at the run's length (prompt + new tokens: what SnapStream's budget must cover),
    and at the tokens the cache ever holds (one fewer: the last token is never fed), where a "fits" test
    that is off by one evicts."""
    model, tokenizer, spec = tiny
    method = make_method(name, budget=1024)
    if not getattr(method, "exact", True):
        pytest.skip("lossy whatever the budget (quantization, cross-layer sharing): its own tests bound or check it")
    if name == "snapstream" and at == "tokens held":
        pytest.skip("SnapStream keeps the whole prompt only where the budget covers prompt + every new token")
    continuation = list(range(400, 420))
    short = {"above": None, "run length": 0, "tokens held": 1}[at]
    generating = budget_for(method, None if short is None else len(PROMPT) + NEW_TOKENS - short)
    scoring = budget_for(method, None if short is None else len(PROMPT) + len(continuation) - short)
    reference = Engine(model, tokenizer, Full(), spec, prefill_chunk=64)
    expected = reference.generate(PROMPT, NEW_TOKENS)
    got = Engine(model, tokenizer, generating, spec, prefill_chunk=64).generate(PROMPT, NEW_TOKENS)
    assert got.token_ids == expected.token_ids
    # The continuation's log-likelihood depends on every logit along the way: it must match exactly.
    assert (
        Engine(model, tokenizer, scoring, spec, prefill_chunk=64).score_continuation(PROMPT, continuation).nll_sum
        == reference.score_continuation(PROMPT, continuation).nll_sum
    )


@pytest.mark.parametrize("name", [n for n in method_names() if n != "full"])
def test_small_budget_stores_fewer_bytes_than_dense(tiny, name):
    model, tokenizer, spec = tiny
    if "budget" not in make_method(name, None).describe():
        # No token budget that matters (quantization and cross-layer sharing keep every token; a budget left out
        # of the record has no effect): its default setting must still hold fewer bytes.
        m = Engine(model, tokenizer, make_method(name, None), spec, prefill_chunk=64).generate(PROMPT, 8).measurement
        assert 0 < m.kv_bytes_device < m.dense_kv_bytes and m.kv_bytes_device_peak >= m.kv_bytes_device
        return
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
def test_decode_attention_sees_fixed_shapes_while_the_cache_fills_and_evicts(tiny, name, monkeypatch):
    """What attention reads (keys, values, positions) keeps one shape every step, not just the buffers."""
    model, tokenizer, spec = tiny
    seen_shapes: list[tuple] = []
    original = cache_module.decode_attention

    def recording(query, keys, values, positions, scaling, with_received=False):
        seen_shapes.append((tuple(keys.shape), tuple(values.shape), tuple(positions.shape)))
        return original(query, keys, values, positions, scaling, with_received)

    def flat(value):  # the tensors in nested arguments: stores (`PackedSlots`) and lists of them
        if isinstance(value, (tuple, list)):
            return [t for item in value for t in flat(item)]
        return [value] if isinstance(value, torch.Tensor) else []

    def recording_tensors(function):  # quantized layers attend over packed parts and a window, merged
        def record(*args):
            seen_shapes.append(tuple(tuple(t.shape) for t in flat(args)))
            return function(*args)

        return record

    monkeypatch.setattr(cache_module, "decode_attention", recording)
    monkeypatch.setattr(
        quantized_layer, "packed_decode_attention", recording_tensors(quantized_layer.packed_decode_attention)
    )
    monkeypatch.setattr(
        quantized_layer, "packed_sets_attention", recording_tensors(quantized_layer.packed_sets_attention)
    )
    monkeypatch.setattr(
        quantized_layer.kernels, "decode_attention", recording_tensors(quantized_layer.kernels.decode_attention)
    )
    engine = Engine(model, tokenizer, make_method(name, budget=64), spec, prefill_chunk=64)
    engine.generate(PROMPT, 40)
    steps = 39  # the first token comes from the prefill's logits
    assert len(seen_shapes) >= steps * spec.num_layers  # every decode step of every layer was seen
    assert len(seen_shapes) % steps == 0
    first_step = set(seen_shapes[: len(seen_shapes) // steps])
    assert set(seen_shapes) == first_step  # every later step reads what the first one read


@pytest.mark.parametrize("name", [n for n in method_names() if n not in ("full",)])
def test_compressing_keeps_distinct_real_tokens(tiny, name):
    """When the budget is below the context (so selection and eviction run, unlike the tests above),
    every live slot holds a distinct position the sequence has seen, with that position's exact key, and
    the number of live slots is what the method promises."""
    model, tokenizer, spec = tiny
    method = make_method(name, budget=64)
    engines = [Engine(model, tokenizer, m, spec, prefill_chunk=64) for m in (Full(), method)]
    caches = [engine.new_cache(len(PROMPT), 30) for engine in engines]
    if all(isinstance(layer, SharedLayer) or layer.capacity >= len(PROMPT) + 30 for layer in caches[1].layers):
        pytest.skip("keeps every token (quantization, cross-layer sharing): nothing is selected or evicted")
    with torch.inference_mode():
        for engine, cache in zip(engines, caches, strict=True):
            engine._prefill(cache, PROMPT)
            cache.finish_prefill()
        check_live_slots(caches, seen=len(PROMPT))  # right after the prompt is cut
        for engine, cache in zip(engines, caches, strict=True):
            for step in range(30):
                engine._forward(cache, [500 + step], len(PROMPT) + step)
        check_live_slots(caches, seen=len(PROMPT) + 30)  # after decode evicted and refilled


def check_live_slots(caches, seen: int) -> None:
    for full_layer, layer in zip(caches[0].layers, caches[1].layers, strict=True):
        if isinstance(layer, FullLayer):
            continue
        live_counts = set()
        for h in range(layer.keys.shape[1]):
            slots = (layer.positions[0, h] >= 0).nonzero().view(-1)
            positions = layer.positions[0, h, slots]
            assert len(set(positions.tolist())) == len(slots)  # no token twice
            assert int(positions.min()) >= 0 and int(positions.max()) < seen
            # Prompt tokens' keys come from the same full-attention prefill in both caches (later tokens'
            # keys differ once attention sees a compressed cache); StreamingLLM's sink slots hold rotated
            # sinks (its in-cache positions), so they are left out.
            prompt = (positions < len(PROMPT)) & (positions >= getattr(layer, "sinks", 0))
            assert torch.equal(layer.keys[0, h, slots[prompt]], full_layer.keys[0, h, positions[prompt]])
            assert int(prompt.sum()) > 0
            live_counts.add(len(slots))
        assert len(live_counts) == 1 and 0 < live_counts.pop() <= layer.capacity < seen

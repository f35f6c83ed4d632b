"""Quantized caches flush their window only on the steps that need it: the host schedules each decode step's
variant ("flush" / "no flush") from counters it keeps itself, and the compiled step has one version per variant.

References: the eager engine with a flush on every step (the branch-free step from before the schedule, exact
because the flush's device mask commits only the rows that are due) and the eager engine on the schedule.
"""

from __future__ import annotations

import pytest
import torch

from kvbench.cache import KVCache
from kvbench.engine import Engine, Measurement, Request
from kvbench.methods.kivi import KIVI
from kvbench.methods.quarot import QuaRot
from kvbench.methods.zipcache import ZipCache
from kvbench.quantized_layer import QuantizedLayer

NEW_TOKENS = 40
# Prompt lengths that differ modulo the flush period (8 tokens below), so rows are due on different steps;
# ZipCache's buffer starts empty after every prompt, so its rows are staggered by question tokens.
PROMPTS = [list(range(100, 171)), list(range(300, 386)), list(range(500, 597))]
QUESTIONS = [(), (7, 8, 9), (11,)]
METHODS = {
    "kivi": KIVI(bits=4, group=8, window=16),
    "zipcache": ZipCache(gap=8, low_ratio=0.25),
    "quarot16": QuaRot(bits=16),
}


def _requests() -> list[Request]:
    return [Request(p, NEW_TOKENS, question_ids=q) for p, q in zip(PROMPTS, QUESTIONS, strict=True)]


def _flush_every_step(monkeypatch) -> None:
    """The reference: every step of a layer that can flush runs the flush (QuaRot at 16 bits never can)."""
    monkeypatch.setattr(QuantizedLayer, "decode_variant", lambda self: True in self.decode_variants())


def _generate(engine: Engine) -> tuple[list[list[int]], KVCache]:
    """Tokens of the batch, and the cache as decode left it."""
    kept = {}
    decode = engine._decode

    def keep_cache(cache, state):
        kept["cache"] = cache
        return decode(cache, state)

    engine._decode = keep_cache
    tokens = [g.token_ids for g in engine.generate_batch(_requests())]
    return tokens, kept["cache"]


def _stored(cache: KVCache) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": t for i, layer in enumerate(cache.layers) for name, t in layer.tensors().items()}


def _compiled(tiny, method) -> tuple[Engine, list]:
    """A compiled engine whose backend counts the graphs it is handed (one per compiled version)."""
    model, tokenizer, spec = tiny
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs) -> object:
        graphs.append(gm)
        return gm.forward

    engine = Engine(model, tokenizer, method, spec, prefill_chunk=32, engine="compiled")
    engine.compile_options = {"backend": counting_backend}
    torch._dynamo.reset()
    return engine, graphs


@pytest.mark.parametrize("name", METHODS)
def test_compiled_schedule_gives_the_always_flushing_tokens_and_stores(tiny, name, monkeypatch):
    """The compiled step on the schedule (two versions), the eager step on the schedule and the eager step
    that flushes every step produce the same tokens and leave the same codes, scales and windows."""
    model, tokenizer, spec = tiny
    method = METHODS[name]
    scheduled_tokens, scheduled_cache = _generate(Engine(model, tokenizer, method, spec, prefill_chunk=32))
    engine, graphs = _compiled(tiny, method)
    compiled_tokens, compiled_cache = _generate(engine)
    with monkeypatch.context() as patch:
        _flush_every_step(patch)
        reference_tokens, reference_cache = _generate(Engine(model, tokenizer, method, spec, prefill_chunk=32))
    assert compiled_tokens == reference_tokens and scheduled_tokens == reference_tokens
    reference = _stored(reference_cache)
    for got in (_stored(scheduled_cache), _stored(compiled_cache)):
        assert got.keys() == reference.keys()
        for key, tensor in reference.items():
            assert torch.equal(got[key], tensor), key
    # One compiled version per variant ("flush", "no flush"; QuaRot-16 never flushes), not one per step; a
    # version is one graph of the whole step, or one graph every decoder layer runs where the engine
    # compiles layers (each reaches its cache layer as the cache's `active` one, not by its index).
    assert len(compiled_cache.decode_variants()) == (1 if name == "quarot16" else 2)
    # Layer scope: the final norm and the token choice are two more graphs, the same in every version.
    layer_scope = getattr(engine, "compile_scope", "step") == "layer"
    assert len(graphs) == len(compiled_cache.decode_variants()) + (2 if layer_scope else 0)


@pytest.mark.parametrize("name", ["kivi", "zipcache"])
def test_host_says_flush_exactly_when_the_device_finds_a_row_due(tiny, name, monkeypatch):
    """Eager steps that all run the flush (always exact): per step, the host's variant, decided before the
    step from its counters, is "flush" exactly when the flush's device `due` mask has a True row."""
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, METHODS[name], spec, prefill_chunk=32)
    device_due: list[bool] = []
    due_rows = QuantizedLayer.due_rows

    def recorded(self) -> torch.Tensor:
        due = due_rows(self)
        device_due.append(bool(due.any()))
        return due

    monkeypatch.setattr(QuantizedLayer, "due_rows", recorded)
    requests = _requests()
    caches, logits = [], []
    for request in requests:
        cache, last = engine._prefill_one(request, max(map(len, PROMPTS)), 3 + NEW_TOKENS, Measurement())
        caches.append(cache)
        logits.append(last)
    cache = KVCache.stack(caches)
    state = engine._decode_state(requests, [len(r.prompt_ids) + len(r.question_ids) for r in requests])
    engine._choose(torch.stack(logits), state)
    layers = cache.variant_layers
    host, device, rows_due = [], [], set()
    for _ in range(NEW_TOKENS - 1):
        host.append(cache.decode_variant())
        rows_due.add(tuple(tokens + 1 > layers[0].window for tokens in layers[0].window_tokens))
        cache.select_variant(True)  # every step flushes: the device decides, row by row
        device_due.clear()
        engine._step(cache, state)
        assert len(device_due) == len(layers)
        device.append(any(device_due))
        device_counts = [(layer.seen - layer.quantized).tolist() for layer in layers]
        assert [layer.window_tokens for layer in layers] == device_counts
    assert host == device
    assert True in host and False in host
    assert any(0 < sum(rows) < len(requests) for rows in rows_due), "rows should be due on different steps"


@pytest.mark.parametrize("name", ["kivi", "zipcache"])
def test_no_compiled_step_skips_a_due_flush(tiny, name, monkeypatch):
    """After every compiled step (before the host moves its counters) no row's window holds more than
    `window` tokens, and the host's window counts equal the device's: checked from outside the step."""
    engine, _ = _compiled(tiny, METHODS[name])
    checks: list[tuple[bool, bool]] = []
    advance = KVCache.advance

    def checked(self) -> None:
        layers = self.variant_layers
        overflow = any(layer.window_overflow() for layer in layers)
        advance(self)
        counts_agree = all(layer.window_tokens == (layer.seen - layer.quantized).tolist() for layer in layers)
        checks.append((overflow, counts_agree))

    monkeypatch.setattr(KVCache, "advance", checked)
    _generate(engine)
    assert len(checks) == NEW_TOKENS - 1
    assert checks == [(False, True)] * len(checks)


def test_a_batch_due_on_every_step_still_times_its_decode(tiny):
    """Four rows whose windows fill on successive steps (KIVI, flush every 4 tokens): some row is due on
    every step, so "no flush" is never safe. The warm-up waits for it one flush period at most (the schedule
    repeats with that period), and the steps after it take the captured "flush" version: the decode is
    timed, and its tokens are the eager ones."""
    model, tokenizer, spec = tiny
    method = KIVI(bits=4, group=4, window=8)
    requests = [Request(list(range(100, 100 + n)), 20) for n in (100, 101, 102, 103)]
    expected = [g.token_ids for g in Engine(model, tokenizer, method, spec).generate_batch(requests)]
    engine, _ = _compiled(tiny, method)
    got = engine.generate_batch(requests)
    assert [g.token_ids for g in got] == expected
    steps = got[0].measurement.decode_steps
    assert steps >= 19 - 4 - 2, steps  # 19 steps after the prefill token, one period of warm-up at most

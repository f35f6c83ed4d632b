"""WikiText-2 perplexity: the stream protocol with a full cache equals one teacher-forced forward."""

from __future__ import annotations

import math

import torch

from kvbench import attention
from kvbench.engine import Engine
from kvbench.methods.full import Full
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.tasks.wikitext2 import WikiText2


def test_stream_protocol_with_full_cache_equals_teacher_forcing(tiny, shared_data):
    model, tokenizer, spec = tiny
    task = WikiText2(data_dir=str(shared_data / "wikitext2"), prefix_tokens=96, continuation_tokens=32, limit=2)
    samples = list(task.samples(tokenizer))
    assert len(samples) == 2 and len(samples[0].continuation_ids) == 32
    engine = Engine(model, tokenizer, Full(), spec, prefill_chunk=40)
    rows = [task.score(s, task.evaluate(engine, s)) for s in samples]
    metrics = task.aggregate(rows)

    nll, count = 0.0, 0
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.continuation_ids])
        with torch.inference_mode(), attention.bind(None):
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
        targets = ids[0, len(s.prompt_ids) :]
        predictions = logits[len(s.prompt_ids) - 1 : -1]
        nll += float(torch.nn.functional.cross_entropy(predictions, targets, reduction="sum"))
        count += targets.numel()
    assert math.isclose(metrics["perplexity"], math.exp(nll / count), rel_tol=1e-4)
    assert metrics["scored_tokens"] == 64


def test_eviction_changes_stream_perplexity(tiny, shared_data):
    model, tokenizer, spec = tiny
    task = WikiText2(data_dir=str(shared_data / "wikitext2"), prefix_tokens=96, continuation_tokens=32, limit=1)
    (sample,) = task.samples(tokenizer)
    full = task.evaluate(Engine(model, tokenizer, Full(), spec), sample)
    evicted = task.evaluate(Engine(model, tokenizer, StreamingLLM(budget=16, sinks=4), spec), sample)
    assert full.nll_sum != evicted.nll_sum


def test_sliding_protocol_scores_every_token_once(tiny, shared_data):
    model, tokenizer, spec = tiny
    task = WikiText2(data_dir=str(shared_data / "wikitext2"), protocol="sliding", window=64, stride=32, max_tokens=200)
    (sample,) = task.samples(tokenizer)
    scored = task.evaluate(Engine(model, tokenizer, Full(), spec), sample)
    assert scored.tokens == 199  # every token but the first is predicted exactly once


def test_without_data_dir_the_text_comes_from_datasets(monkeypatch, shared_data):
    """No hub here: stub `load_dataset` and check the call and that rows rebuild the raw test file."""
    import datasets

    raw = (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = raw.splitlines(keepends=True)  # the hub's rows: one line each, newline kept
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or {"text": rows})
    assert WikiText2().text() == raw
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]

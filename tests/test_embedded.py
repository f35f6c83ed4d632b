"""The embedded SmolLM2: our engine against stock transformers, and passkey retrieval with a full cache."""

from __future__ import annotations

import torch

from kvbench.engine import Engine
from kvbench.methods.full import Full
from kvbench.tasks.passkey import Passkey


def test_engine_matches_stock_transformers_generate(embedded):
    model, tokenizer, spec = embedded
    ids = tokenizer("The history of the printing press begins", return_tensors="pt")["input_ids"]
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            expected = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
    finally:
        model.set_attn_implementation("kvbench")
    got = Engine(model, tokenizer, Full(), spec, prefill_chunk=4).generate(ids[0].tolist(), 24)
    assert got.token_ids == expected


def test_full_cache_passkey_at_a_few_thousand_tokens(embedded):
    """Guards the whole path: a broken cache, mask or position shows up as a wrong key."""
    model, tokenizer, spec = embedded
    task = Passkey(context_lengths=[1500], depths=[0.2, 0.8], seed=3)
    engine = Engine(model, tokenizer, Full(), spec)
    rows = [task.score(s, task.evaluate(engine, s)) for s in task.samples(tokenizer)]
    assert all(1400 <= row["prompt_tokens"] <= 1500 for row in rows)
    assert task.aggregate(rows)["accuracy"] == 1.0, [row["prediction"] for row in rows]


def test_chat_style_passkey_prompts_are_the_templates_token_ids(embedded):
    """`task.prompt_style=chat`: the prompt is one user turn of the tokenizer's chat template, as token ids
    (transformers 5's `apply_chat_template(tokenize=True)` returns an encoding, whose keys once became the
    "ids"), near the asked length, with the needle inside."""
    _, tokenizer, _ = embedded
    task = Passkey(context_lengths=[400], depths=[0.5], prompt_style="chat", seed=1)
    (sample,) = task.samples(tokenizer)
    assert all(isinstance(token, int) for token in sample.prompt_ids)
    assert 350 <= len(sample.prompt_ids) <= 400
    text = tokenizer.decode(sample.prompt_ids)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "@@@"}], add_generation_prompt=True, tokenize=False
    )
    before, after = rendered.split("@@@")
    assert text.startswith(before) and text.endswith(after)
    assert sample.reference in text


def test_chat_style_needs_a_chat_template(embedded):
    """Without a template the prompt would silently be plain text recorded as chat: refused instead."""
    import copy

    import pytest

    from kvbench.errors import ConfigError

    _, tokenizer, _ = embedded
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError) as caught:
        next(Passkey(context_lengths=[400], depths=[0.5], prompt_style="chat").samples(plain))
    assert caught.value.key == "task.prompt_style"

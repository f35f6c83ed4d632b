"""Engine behaviour that tasks rely on: seeded sampling and its limits."""

from __future__ import annotations

import torch

from kvbench.engine import DecodeState, Engine, Sampling
from kvbench.methods.full import Full

PROMPT = list(range(200, 260))


def test_sampling_is_seeded_and_reduces_to_greedy(tiny):
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, Full(), spec)
    greedy = engine.generate(PROMPT, 12).token_ids
    hot = [engine.generate(PROMPT, 12, sampling=Sampling(temperature=2.0, seed=s)).token_ids for s in (1, 1, 2)]
    assert hot[0] == hot[1]  # same seed, same tokens
    assert hot[0] != hot[2]  # another seed draws other tokens (12 draws at temperature 2)
    # A nucleus so small that only the top token survives is greedy decoding.
    assert engine.generate(PROMPT, 12, sampling=Sampling(temperature=1.0, top_p=1e-6, seed=5)).token_ids == greedy


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(300, -1)
    b = logits.shape[0]
    state = DecodeState(
        tokens=torch.zeros(b, dtype=torch.long),
        positions=torch.zeros(b, dtype=torch.long),
        count=torch.zeros(b, dtype=torch.long),
        done=torch.zeros(b, dtype=torch.bool),
        output=torch.zeros(b, 2, dtype=torch.long),
        stop_mask=torch.zeros(b, 4, dtype=torch.bool),
        min_new=torch.zeros(b, dtype=torch.long),
        max_new=torch.ones(b, dtype=torch.long),
        temperature=1.0,
        top_p=0.7,
    )
    torch.manual_seed(0)
    Engine._choose(logits, state)
    assert set(state.tokens.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: tokens 2 and 3 are cut


def test_min_new_tokens_refuses_stop_tokens_until_reached(tiny):
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, Full(), spec)
    first = engine.generate(PROMPT, 1).token_ids[0]
    assert engine.generate(PROMPT, 5, stop_ids=[first]).token_ids == [first]  # stops at once
    forced = engine.generate(PROMPT, 5, stop_ids=[first], min_new_tokens=1).token_ids
    assert forced[0] != first and len(forced) >= 2

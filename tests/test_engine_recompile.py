"""The compiled engine in a long-lived process: a sweep's runs (a new Engine each) and a run's many cache
sizes each compile the decode step, past dynamo's default recompile limit of 8, and stay compiled."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # dynamo's own view of a code's cache

from kvbench.engine import Engine
from kvbench.methods.full import Full
from kvbench.methods.streamingllm import StreamingLLM

PROMPT = list(range(100, 170))
NEW_TOKENS = 4


def compiled_engine(tiny, method, scope: str) -> Engine:
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, method, spec, engine="compiled", compile_scope=scope)
    engine.compile_options = {"backend": "eager"}  # dynamo's caches and limits without inductor's minutes
    return engine


def compiled_entries(tiny, scope: str) -> int:
    """Dynamo's compiled versions of what the scope compiles: the step, or the decoder layers' forward (one
    code object for every layer, and one trace for every layer: each reaches its cache layer as the cache's
    `active` one, not by its index)."""
    model = tiny[0]
    code = Engine._step if scope == "step" else type(model.get_decoder().layers[0]).forward
    return len(_debug_get_cache_entry_list(code))


@pytest.mark.parametrize("scope", ["step", "layer"])
def test_ten_engines_in_one_process_each_compile_their_step(tiny, scope):
    """As a sweep does: one Engine per run, each with another budget (another cache shape). Before the fix
    the 9th raised FailOnRecompileLimitHit (fullgraph). Each engine starts from empty caches: the step's
    code object holds only its own compile, so a sweep's runs never add up to a limit."""
    model, tokenizer, spec = tiny
    for budget in range(32, 32 + 10 * 8, 8):
        method = StreamingLLM(budget=budget)
        expected = Engine(model, tokenizer, method, spec).generate(PROMPT, NEW_TOKENS).token_ids
        got = compiled_engine(tiny, method, scope).generate(PROMPT, NEW_TOKENS)
        assert got.measurement.engine == "compiled" and got.token_ids == expected, budget
        assert compiled_entries(tiny, scope) == 1, budget


@pytest.mark.parametrize("scope", ["step", "layer"])
def test_one_engine_compiles_a_step_per_cache_size_beyond_eight(tiny, scope):
    """A dense cache over ten prompt lengths in different aligned sizes (as LongBench's prompts are): one
    compile each, none refused by the recompile limit."""
    model, tokenizer, spec = tiny
    eager = Engine(model, tokenizer, Full(), spec)
    engine = compiled_engine(tiny, Full(), scope)
    for size in range(1, 11):
        prompt = list(range(100, 100 + 64 * size + 10))
        got = engine.generate(prompt, NEW_TOKENS)
        assert got.measurement.engine == "compiled" and got.measurement.compile_s > 0, size
        assert got.token_ids == eager.generate(prompt, NEW_TOKENS).token_ids, size
    torch._dynamo.reset()  # leave no entries for the next test's error_on_recompile checks

"""SnapKV and StreamingLLM keep the same prompt positions as NVIDIA kvpress, on recorded selections.

kvpress is not a dependency: `tests/fixtures/make_kvpress_fixture.py` ran kvpress's `SnapKVPress` and
`StreamingLLMPress` on a random two-layer Llama and recorded which positions each layer and KV head kept.
Here kvbench's engine runs the same model on the same prompt and must keep the same positions.

What is compared is the same algorithm on both sides. kvpress's SnapKV averages the window queries'
attention, average-pools each query head's votes (zero padding counted) and then averages over the query
heads of each KV head; kvbench sums over the window and averages over the group before pooling. Average
pooling is linear and a constant factor does not change a ranking, so with `pooling="avg"` the two agree.
kvbench's default max pooling does not commute with the group average and kvpress has no max pooling:
that configuration has no kvpress counterpart and is not compared.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from kvbench import attention
from kvbench.cache import KVCache, ModelSpec
from kvbench.engine import Engine
from kvbench.method import Method
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "kvpress_selections.json").read_text())


def fixture_maker() -> ModuleType:
    """The fixture's generating script, for its model and prompt (it imports kvpress only when run)."""
    spec = importlib.util.spec_from_file_location("make_kvpress_fixture", FIXTURES / "make_kvpress_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = fixture_maker()


@pytest.fixture(scope="module")
def reference_model() -> tuple[torch.nn.Module, ModelSpec]:
    torch.set_num_threads(2)
    model = MAKER.build_model(attention.register())
    config = model.config
    spec = ModelSpec(
        name="kvpress-reference",
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_positions=config.max_position_embeddings,
    )
    return model, spec


def kvbench_method(case: dict[str, Any]) -> Method:
    if case["press"] == "snapkv":
        return SnapKV(budget=case["budget"], window=case["window"], kernel=case["kernel"], pooling="avg")
    return StreamingLLM(budget=case["budget"], sinks=case["sinks"])


def kvbench_kept(model: torch.nn.Module, spec: ModelSpec, method: Method, ids: list[int], chunk: int) -> list:
    """Positions each layer and KV head holds after prefill, read from `layer.positions` (-1 = empty)."""
    engine = Engine(model, None, method, spec, prefill_chunk=chunk)
    caches: list[KVCache] = []
    stack = KVCache.stack

    def keep_stacked(prefilled: list[KVCache]) -> KVCache:
        # The engine stacks even one sequence's cache, emptying the one it prefilled: keep the stacked one.
        caches.append(stack(prefilled))
        return caches[-1]

    # One new token: the engine prefills, compresses, picks the token and stops before any decode write.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KVCache, "stack", keep_stacked)
        engine.generate(ids, max_new_tokens=1)
    (cache,) = caches
    return [[sorted(p for p in head.tolist() if p >= 0) for head in layer.positions[0]] for layer in cache.layers]


def test_model_and_prompt_are_the_fixtures(reference_model):
    """Same logits as when the fixture was recorded: a mismatch below means the selection differs."""
    model, _ = reference_model
    for length, expected in REFERENCE["last_logits"].items():
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([MAKER.prompt_ids(int(length))]), use_cache=False).logits
        assert torch.allclose(logits[0, -1, :8], torch.tensor(expected), atol=1e-4), f"prompt of {length} tokens"


@pytest.mark.parametrize("chunk", [512, 48], ids=["one-chunk", "chunks-of-48"])
@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: case["name"])
def test_kvbench_keeps_what_kvpress_keeps(reference_model, case, chunk):
    model, spec = reference_model
    kept = kvbench_kept(model, spec, kvbench_method(case), MAKER.prompt_ids(case["prompt_len"]), chunk)
    for layer, (ours, theirs) in enumerate(zip(kept, case["kept"], strict=True)):
        for head, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
            only_ours, only_theirs = sorted(set(mine) - set(reference)), sorted(set(reference) - set(mine))
            assert mine == reference, (
                f"layer {layer}, KV head {head}: kvbench only {only_ours}, kvpress only {only_theirs}"
            )

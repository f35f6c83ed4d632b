"""SnapStream against a plain-Python reference (SnapKV votes, then a ring), its fixed size, batching, bad input."""

from __future__ import annotations

import pytest
import torch

from kvbench.cache import LayerSpec, ModelSpec
from kvbench.config import build
from kvbench.engine import Engine, Request
from kvbench.errors import ConfigError
from kvbench.methods.full import Full
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.snapstream import SnapStream
from tests.conftest import compose_config

B, HQ, HKV, D = 2, 4, 2, 8
G = HQ // HKV
SCALE = D**-0.5
MODEL = ModelSpec("test", num_layers=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_positions=4096)


def reference_pooled_votes(method: SnapStream, q: torch.Tensor, k: torch.Tensor, b: int, h: int, t: int) -> list[float]:
    """SnapKV's votes for one sequence and KV head, written out: each of the last `window` prompt queries
    (each query head of the group) spreads softmax attention over the keys it sees; prefix tokens collect
    votes, averaged over the group; votes are pooled over `kernel` neighbours."""
    w, kernel = method.window, method.kernel
    prefix = t - w
    votes = [0.0] * prefix
    for g in range(h * G, (h + 1) * G):
        for position in range(prefix, t):
            probs = torch.softmax(k[b, h, : position + 1] @ q[b, g, position] * SCALE, dim=0)
            for j in range(prefix):
                votes[j] += float(probs[j]) / G
    half = kernel // 2
    pooled = []
    for j in range(prefix):
        around = votes[max(0, j - half) : j + half + 1]
        # Max pooling ignores the padding; average pooling counts it as zeros (PyTorch's default).
        pooled.append(max(around) if method.pooling == "max" else sum(around) / kernel)
    return pooled


def check_prompt_selection(method: SnapStream, kept: set[int], pooled: list[float], t: int) -> None:
    """The window stays, and the other kept tokens are a top-k of the pooled votes. Max pooling makes
    neighbours tie, and any choice among tied tokens is a correct top-k, so ties may go either way."""
    prefix = t - method.window
    assert set(range(prefix, t)) <= kept
    chosen = kept - set(range(prefix, t))
    assert len(chosen) == method.budget - method.ring - method.window
    dropped = set(range(prefix)) - chosen
    assert min(pooled[j] for j in chosen) >= max(pooled[j] for j in dropped) - 1e-6


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_live_tokens_equal_the_reference_every_step(pooling):
    torch.manual_seed(3)
    method = SnapStream(budget=24, ring_ratio=0.5, window=4, kernel=3, pooling=pooling)  # 12 prompt slots, ring 12
    prompt_len, steps = 40, 30
    total = prompt_len + steps
    q, k, v = torch.randn(B, HQ, total, D) * 3, torch.randn(B, HKV, total, D), torch.randn(B, HKV, total, D)
    layer = method.make_layer(LayerSpec(1, MODEL, B, prompt_len, steps + 1))
    for start in range(0, prompt_len, 16):
        stop = min(start + 16, prompt_len)
        keys, values = layer.update(k[:, :, start:stop], v[:, :, start:stop])
        layer.attend(q[:, :, start:stop], keys, values, SCALE)
    layer.finish_prefill()
    kept = [[{p for p in layer.positions[b, h].tolist() if p >= 0} for h in range(HKV)] for b in range(B)]
    for b in range(B):
        for h in range(HKV):
            pooled = reference_pooled_votes(method, q, k, b, h, prompt_len)
            check_prompt_selection(method, kept[b][h], pooled, prompt_len)
    for step in range(steps + 1):
        if step:
            position = prompt_len + step - 1
            keys, values = layer.update(k[:, :, position : position + 1], v[:, :, position : position + 1])
            layer.attend(q[:, :, position : position + 1], keys, values, SCALE)
        ring = set(range(prompt_len, prompt_len + step)[-method.ring :])  # the most recent decode tokens
        for b in range(B):
            for h in range(HKV):
                slots = (layer.positions[b, h] >= 0).nonzero().view(-1)
                assert set(layer.positions[b, h, slots].tolist()) == kept[b][h] | ring, f"step {step}"
                # Each live slot holds its own token's key (the ring overwrote the right slot).
                assert torch.equal(layer.keys[b, h, slots], k[b, h, layer.positions[b, h, slots]])


def test_cache_never_grows_after_prefill(tiny):
    """SnapKV's cache grows with every generated token; SnapStream's holds the same bytes however long
    the generation."""
    model, tokenizer, spec = tiny
    prompt = list(range(100, 340))

    def device_bytes(method, new_tokens: int) -> int:
        engine = Engine(model, tokenizer, method, spec, prefill_chunk=64)
        return engine.generate(prompt, new_tokens).measurement.kv_bytes_device

    stream = SnapStream(budget=64)
    assert device_bytes(stream, 8) == device_bytes(stream, 72)
    assert device_bytes(SnapKV(budget=64), 8) < device_bytes(SnapKV(budget=64), 72)


def test_budget_covering_prompt_and_generation_keeps_the_long_prompt_whole(tiny):
    """A prompt longer than budget - ring is kept whole when the whole generation fits the budget."""
    model, tokenizer, spec = tiny
    prompt = list(range(100, 300))  # 200 tokens > 256 - 128 prompt slots; 200 + 20 fits in 256
    expected = Engine(model, tokenizer, Full(), spec, prefill_chunk=64).generate(prompt, 20).token_ids
    got = Engine(model, tokenizer, SnapStream(budget=256), spec, prefill_chunk=64).generate(prompt, 20).token_ids
    assert got == expected


def test_compiled_batch_selects_per_sequence(tiny):
    """Sequences of different lengths decoded together by the compiled step (one graph): each keeps its
    own prompt selection and ring, and gets the tokens it gets alone in the eager engine."""
    model, tokenizer, spec = tiny
    method = SnapStream(budget=64)
    # Two prompts cut to the 32 prompt slots, one kept whole with a longer ring; 50 tokens wrap every ring.
    prompts = [list(range(100, 340)), list(range(500, 520)), list(range(700, 901))]
    eager = Engine(model, tokenizer, method, spec, prefill_chunk=64)
    alone = [eager.generate(p, 50).token_ids for p in prompts]
    compiled = Engine(model, tokenizer, method, spec, prefill_chunk=64, engine="compiled", compile_scope="step")
    compiled.compile_options = {"backend": "eager"}  # dynamo's tracing alone: what breaks a graph breaks here
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        together = compiled.generate_batch([Request(p, 50) for p in prompts])
    assert [g.token_ids for g in together] == alone
    assert {g.measurement.batch_size for g in together} == {3} and together[0].measurement.engine == "compiled"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(budget=0), "method.budget"),
        (dict(budget=-64), "method.budget"),
        (dict(budget=64, window=40), "method.budget"),  # the window does not fit the prompt's 32 slots
        (dict(budget=256, window=300), "method.budget"),  # a window larger than the budget
        (dict(window=0), "method.window"),
        (dict(window=-4), "method.window"),
        (dict(window=4, kernel=7), "method.kernel"),  # a pooling kernel larger than the window
        (dict(kernel=4), "method.kernel"),
        (dict(kernel=-1), "method.kernel"),
        (dict(ring_ratio=0.0), "method.ring_ratio"),
        (dict(ring_ratio=1.0), "method.ring_ratio"),
        (dict(ring_ratio=-0.5), "method.ring_ratio"),
        (dict(pooling="min"), "method.pooling"),
        (dict(exempt_layers=-1), "method.exempt_layers"),
    ],
)
def test_bad_hyper_parameters_fail_at_construction(kwargs, key):
    with pytest.raises(ConfigError) as caught:
        SnapStream(**kwargs)
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_bad_config_fails_before_the_model_loads():
    with pytest.raises(ConfigError) as caught:
        build(compose_config("method=snapstream", "method.kernel=33"))
    assert caught.value.key == "method.kernel"
    with pytest.raises(ConfigError) as caught:
        SnapStream(budget=8192).check(MODEL)
    assert caught.value.key == "method.budget"

"""Cross-layer KV sharing: the post-hoc `cla` method and natively shared models (`kvbench_kv_sharing`).

The reference is transformers' own eager attention with each consumer layer's k_proj/v_proj outputs replaced
by its producer's (forward hooks): after RoPE at the same positions, the consumer then attends over exactly
the producer's keys and values, which is what CLA means.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvbench.run as run_module
from kvbench import attention
from kvbench import cache as cache_module
from kvbench.__main__ import main
from kvbench.cache import ModelSpec
from kvbench.config import build
from kvbench.engine import Engine, Request
from kvbench.errors import ConfigError
from kvbench.methods.cla import CLA
from kvbench.methods.full import Full
from kvbench.methods.kivi import KIVI
from kvbench.methods.snapkv import SnapKV
from kvbench.models import ModelConfig, model_spec
from tests.conftest import compose_config

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
PROMPT = [(7 * i + 3) % 500 for i in range(100)]  # 100 token ids, prefilled in chunks of 48
DECODE = [11, 250, 3, 499, 42, 77]  # fed one at a time through the decode path


def llama_config(num_layers: int, kv_sharing: int | None = None) -> LlamaConfig:
    config = LlamaConfig(
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=512,
        max_position_embeddings=1024,
    )
    if kv_sharing is not None:
        config.kvbench_kv_sharing = kv_sharing
    return config


def tiny_llama(num_layers: int = 4, kv_sharing: int | None = None, attn: str = "") -> LlamaForCausalLM:
    """A random fp32 Llama on kvbench's attention; projections scaled up so attention is peaked and sharing
    changes the logits a lot (near-uniform random attention would hide a wrong producer)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(num_layers, kv_sharing))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "proj" in name:
                param.mul_(8)
    model.set_attn_implementation(attn or attention.register())
    return model.eval()


def spec_of(model: LlamaForCausalLM) -> ModelSpec:
    config = model.config
    sharing = getattr(config, "kvbench_kv_sharing", 1)
    return ModelSpec("tiny", config.num_hidden_layers, HEADS, KV_HEADS, HEAD_DIM, 1024, kv_sharing=sharing)


def reference_logits(model: LlamaForCausalLM, ids: list[int], producer_of: Callable[[int], int]) -> torch.Tensor:
    """Logits [T, vocab] of transformers' eager attention, no cache, where layer i's key and value
    projections output those of layer producer_of(i) (computed from that layer's own input)."""
    reference = tiny_llama(model.config.num_hidden_layers, attn="eager")
    reference.load_state_dict(model.state_dict())
    produced: dict[tuple[int, str], torch.Tensor] = {}

    def share(idx: int, name: str):
        def hook(module, inputs, output):
            if producer_of(idx) == idx:
                produced[idx, name] = output
                return None
            return produced[producer_of(idx), name]

        return hook

    handles = [
        getattr(layer.self_attn, name).register_forward_hook(share(idx, name))
        for idx, layer in enumerate(reference.model.layers)
        for name in ("k_proj", "v_proj")
    ]
    try:
        with torch.no_grad():
            return reference(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()


def cached_logits(model: LlamaForCausalLM, method, spec: ModelSpec) -> torch.Tensor:
    """Logits [T, vocab] through the method's cache: PROMPT prefilled in chunks, then DECODE one at a time."""
    engine = Engine(model, None, method, spec, prefill_chunk=48)
    cache = engine.new_cache(len(PROMPT), len(DECODE))
    with torch.inference_mode():
        logits = [engine._prefill(cache, PROMPT, all_logits=True)]
        cache.finish_prefill()
        for step, token in enumerate(DECODE):
            logits.append(engine._forward(cache, [token], len(PROMPT) + step))
    return torch.cat(logits)


# ----- the post-hoc method -----
def test_sharing_1_reproduces_the_full_cache_exactly(tiny):
    model, tokenizer, spec = tiny
    prompt = list(range(100, 340))
    full, shared = (Engine(model, tokenizer, m, spec, prefill_chunk=64) for m in (Full(), CLA(sharing=1)))
    assert shared.generate(prompt, 12).token_ids == full.generate(prompt, 12).token_ids
    assert torch.equal(cached_logits(model, CLA(sharing=1), spec), cached_logits(model, Full(), spec))


@pytest.mark.parametrize(("sharing", "exempt", "producers"), [(2, 0, [0, 0, 2, 2]), (3, 1, [0, 1, 1, 1])])
def test_logits_equal_the_reference_with_consumers_on_the_producers_kv(sharing, exempt, producers):
    """Prefill and decode logits through the cache equal the hooked reference; groups start after the
    exempt layers (s=3 and one exempt: layer 0 alone, then layer 1 produces for 2 and 3)."""
    model = tiny_llama()
    got = cached_logits(model, CLA(sharing=sharing, exempt_layers=exempt), spec_of(model))
    expected = reference_logits(model, PROMPT + DECODE[:-1], producers.__getitem__)
    # The feed of the last decode token predicts a token the reference does not see: compare the rest.
    torch.testing.assert_close(got[:-1], expected, rtol=1e-4, atol=1e-4)
    dense = reference_logits(model, PROMPT + DECODE[:-1], lambda i: i)
    assert (got[:-1] - dense).abs().max() > 0.1  # 1000x the tolerance: sharing changes the logits, the check can fail


def test_device_kv_bytes_fall_by_the_sharing_factor():
    """Bytes counted from the cache's tensors: 6 layers, s = 2 and 3 divide them exactly; exempting two
    layers keeps 2 + 2 of 6 layers' KV with s = 2."""
    model = tiny_llama(num_layers=6)
    spec = spec_of(model)

    def measured(method) -> int:
        scored = Engine(model, None, method, spec, prefill_chunk=64).score_continuation(PROMPT, DECODE)
        return scored.measurement.kv_bytes_device

    full = measured(Full())
    assert full > 0
    assert measured(CLA(sharing=2)) * 2 == full
    assert measured(CLA(sharing=3)) * 3 == full
    assert measured(CLA(sharing=2, exempt_layers=2)) * 6 == full * 4


def test_records_say_posthoc_and_drop_the_budget():
    method = build(compose_config("method=cla", "method.budget=256")).method
    assert isinstance(method, CLA) and method.sharing == 2
    described = method.describe()
    assert described["posthoc"] is True and "budget" not in described and described["sharing"] == 2


@pytest.mark.parametrize(
    ("method", "key", "says"),
    [
        (lambda: CLA(sharing=0), "method.sharing", ">= 1"),
        (lambda: CLA(exempt_layers=-1), "method.exempt_layers", ">= 0"),
        (lambda: CLA(sharing=5).check(spec_of(tiny_llama())), "method.sharing", "4 layers"),
        (lambda: CLA(exempt_layers=5).check(spec_of(tiny_llama())), "method.exempt_layers", "4 layers"),
        (lambda: CLA(sharing=2).check(spec_of(tiny_llama(kv_sharing=2))), "method.sharing", "native"),
        (lambda: KIVI().check(spec_of(tiny_llama(kv_sharing=2))), "method", "key/value slots"),
    ],
    ids=["sharing-0", "exempt-negative", "sharing-above-layers", "exempt-above-layers", "native", "packed"],
)
def test_bad_input_is_one_line_naming_the_key(method, key, says):
    with pytest.raises(ConfigError) as caught:
        method()
    assert caught.value.key == key and says in str(caught.value) and "\n" not in str(caught.value)


def test_a_cache_built_directly_refuses_a_packed_producer():
    """What `check` refuses before loading, building the cache refuses too (for code that skips `check`)."""
    with pytest.raises(ValueError, match="layer 1 shares layer 0's keys and values, but QuantizedLayer"):
        KIVI().make_cache(spec_of(tiny_llama(kv_sharing=2)), len(PROMPT), len(DECODE))


@pytest.fixture
def native_folder(tmp_path):
    """A model folder whose config says kvbench_kv_sharing=2 (no weights: nothing may load them)."""
    llama_config(4, kv_sharing=2).save_pretrained(tmp_path / "native")
    return tmp_path / "native"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["method=cla", "method.sharing=9"], "method.sharing=9 is not valid: at most the model's 4 layers"),
        (["method=cla", "model=hf", "model.path={native}"], "method.sharing=2 is not valid: a model without native"),
        (["method=kivi", "model=hf", "model.path={native}"], "method='KIVI' is not valid"),
    ],
    ids=["sharing-above-layers", "cla-on-native", "kivi-on-native"],
)
def test_cli_refuses_before_any_model_loads(overrides, says, native_folder, monkeypatch, capsys, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_model", refuse)
    args = ["model=tiny-llama", "model.device=cpu", "task=passkey", f"kvbench.results_dir={tmp_path}/results"]
    args += [override.format(native=native_folder) for override in overrides]
    monkeypatch.setattr(sys, "argv", ["kvbench", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(lines) == 1 and says in lines[0], lines


# ----- natively shared models -----
def test_model_spec_reads_the_sharing_factor_from_the_config(native_folder, tmp_path):
    assert model_spec(ModelConfig(name="n", source="hf", path=str(native_folder))).kv_sharing == 2
    llama_config(4).save_pretrained(tmp_path / "plain")
    assert model_spec(ModelConfig(name="p", source="hf", path=str(tmp_path / "plain"))).kv_sharing == 1
    llama_config(4, kv_sharing=0).save_pretrained(tmp_path / "bad")
    with pytest.raises(ConfigError) as caught:
        model_spec(ModelConfig(name="b", source="hf", path=str(tmp_path / "bad")))
    assert caught.value.key.startswith("kvbench_kv_sharing") and "from 1 to the model's 4 layers" in str(caught.value)


def test_cache_free_forward_shares_through_the_keyword_and_refuses_without_it():
    model = tiny_llama(kv_sharing=2)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        free = model(input_ids=ids, **{attention.SHARED_KV_KWARG: {}}).logits[0]
        with pytest.raises(RuntimeError, match=attention.SHARED_KV_KWARG):
            model(input_ids=ids)
    cached = cached_logits(model, Full(), spec_of(model))[: len(PROMPT)]
    torch.testing.assert_close(free, cached, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(free, reference_logits(model, PROMPT, lambda i: i - i % 2), rtol=1e-4, atol=1e-4)


def test_exempt_layers_of_a_native_model_still_share():
    spec = spec_of(tiny_llama(kv_sharing=2))
    layers = SnapKV(budget=64, exempt_layers=2).make_cache(spec, len(PROMPT), len(DECODE)).layers
    assert [type(layer).__name__ for layer in layers] == ["FullLayer", "SharedLayer", "SnapKVLayer", "SharedLayer"]
    assert layers[1].producer is layers[0] and layers[3].producer is layers[2]


def test_consumers_attend_over_the_producers_selection(monkeypatch):
    """SnapKV on a natively shared model: every decode step, a consumer attends over the very buffers and
    live slots its producer selected (which hold fewer tokens than the context), and caches nothing."""
    model = tiny_llama(kv_sharing=2)
    spec = spec_of(model)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = cache_module.decode_attention

    def recording(query, keys, values, positions, scaling, with_received=False):
        calls.append((keys, values, positions.clone()))
        return original(query, keys, values, positions, scaling, with_received)

    monkeypatch.setattr(cache_module, "decode_attention", recording)
    engine = Engine(model, None, SnapKV(budget=48, window=8), spec, prefill_chunk=48)
    generation = engine.generate(PROMPT, 8)
    assert len(calls) >= 7 * spec.num_layers and len(calls) % spec.num_layers == 0  # every layer, every step
    for step in range(0, len(calls), spec.num_layers):
        for producer in (0, 2):
            (keys, values, positions), consumer = calls[step + producer], calls[step + producer + 1]
            assert consumer[0] is keys and consumer[1] is values and torch.equal(consumer[2], positions)
            assert 0 < int((positions[0, 0] >= 0).sum()) < len(PROMPT)  # a selection, not everything
    dense = Engine(model, None, SnapKV(budget=48, window=8), dataclasses.replace(spec, kv_sharing=1))
    assert generation.measurement.kv_bytes_device * 2 == dense.generate(PROMPT, 8).measurement.kv_bytes_device


def test_native_batch_of_different_lengths_decodes_each_as_alone():
    """Stacking caches re-binds each consumer to the stacked producer."""
    model = tiny_llama(kv_sharing=2)
    engine = Engine(model, None, SnapKV(budget=48, window=8), spec_of(model), prefill_chunk=48)
    prompts = [PROMPT, PROMPT[:70], PROMPT[10:95]]
    alone = [engine.generate(prompt, 8).token_ids for prompt in prompts]
    assert [g.token_ids for g in engine.generate_batch([Request(p, 8) for p in prompts])] == alone


@pytest.mark.parametrize("method", [Full(), SnapKV(budget=48, window=8)], ids=["full", "snapkv"])
def test_native_compiled_step_is_one_graph_with_the_eager_tokens(method):
    model = tiny_llama(kv_sharing=2)
    spec = spec_of(model)
    expected = Engine(model, None, method, spec, prefill_chunk=48).generate(PROMPT, 20).token_ids
    compiled = Engine(model, None, method, spec, prefill_chunk=48, engine="compiled", compile_scope="step")
    compiled.compile_options = {"backend": "eager"}  # dynamo's tracing: what breaks a graph breaks here
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.generate(PROMPT, 20)
    assert got.token_ids == expected and got.measurement.engine == "compiled"

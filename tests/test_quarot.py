"""QuaRot (KV-cache part) and its RTN ablation: what is stored is the rotated (and quantized) K/V, the value
rotation equals folding H into v_proj/o_proj, 16 bits is the full cache, 8 bits within a stated bound,
rotation lowers the error on outlier channels, bytes follow the formula, bad input fails before loading."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kvbench.cache import LayerSpec, ModelSpec
from kvbench.config import build
from kvbench.engine import Engine
from kvbench.errors import ConfigError
from kvbench.hadamard import hadamard_matrix, hadamard_transform
from kvbench.methods.full import Full
from kvbench.methods.quarot import QuaRot, QuaRotLayer
from kvbench.quant import Quantized, dequantize, fake_quantize
from kvbench.quantized_layer import QuantSpec
from tests.conftest import compose_config

PROMPT = list(range(100, 340))
CONTINUATION = list(range(400, 424))


def decode_logits(engine: Engine, prompt: list[int], continuation: list[int]) -> tuple[torch.Tensor, object]:
    """Logits [len(continuation), vocab] predicting each continuation token (prefill, then one token at a
    time through the decode path), and the cache."""
    with torch.inference_mode():
        cache = engine.new_cache(len(prompt), len(continuation))
        logits = [engine._prefill(cache, prompt)[-1]]
        cache.finish_prefill()
        for i, token in enumerate(continuation[:-1]):
            logits.append(engine._forward(cache, [token], len(prompt) + i)[-1])
    return torch.stack(logits).float(), cache


def prefilled(engine: Engine, prompt: list[int]):
    with torch.inference_mode():
        cache = engine.new_cache(len(prompt), 4)
        engine._prefill(cache, prompt)
        return cache


# ----- what is stored -----
@pytest.mark.parametrize(
    "method",
    [
        QuaRot(),
        QuaRot(rotate=False),
        QuaRot(bits=3, group=16, clip_ratio=0.8),
        QuaRot(bits=2, group=8, clip_ratio=1.0, rotate=False),
    ],
    ids=["quarot", "rtn", "quarot3_g16", "rtn2_g8"],
)
def test_stored_keys_and_values_are_the_rotated_prompt_quantized_per_token(tiny, method):
    """Each layer's store holds exactly quantize(H k) and quantize(H v) (k, v without H for RTN) of the
    full cache's prompt keys/values, with the method's bits, group and clip ratio."""
    model, tokenizer, spec = tiny
    full = prefilled(Engine(model, tokenizer, Full(), spec, prefill_chunk=64), PROMPT)
    cache = prefilled(Engine(model, tokenizer, method, spec, prefill_chunk=64), PROMPT)
    with torch.inference_mode():
        cache.finish_prefill()
    group = method.group or spec.head_dim
    for full_layer, layer in zip(full.layers, cache.layers, strict=True):
        part = layer.parts[0]
        n = len(PROMPT)
        assert int(part.length) == n
        for store, plain in ((part.keys, full_layer.keys[:, :, :n]), (part.values, full_layer.values[:, :, :n])):
            stored = dequantize(
                Quantized(store.codes[:, :, :n], store.scale[:, :, :n], store.zero[:, :, :n]),
                method.bits,
                "token",
                group,
            )
            expected = hadamard_transform(plain) if method.rotate else plain
            assert torch.equal(stored, fake_quantize(expected, method.bits, "token", group, method.clip_ratio))


def fold_value_rotation(model: torch.nn.Module, head_dim: int) -> torch.nn.Module:
    """QuaRot's `rotate_ov_proj` on a copy: H into each KV head's v_proj output rows, H^T into each query
    head's o_proj input columns."""
    folded = copy.deepcopy(model)
    h = hadamard_matrix(head_dim, dtype=torch.float64)
    with torch.no_grad():
        for layer in folded.model.layers:
            v, o = layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight
            rows = v.double().unflatten(0, (-1, head_dim))  # [Hkv, D, hidden]
            v.copy_(torch.einsum("ij,hjk->hik", h, rows).flatten(0, 1))
            cols = o.double().unflatten(1, (-1, head_dim))  # [hidden, Hq, D]
            o.copy_(torch.einsum("khj,ij->khi", cols, h).flatten(1, 2))
    return folded


def test_rotating_values_in_the_cache_equals_folding_the_rotation_into_the_weights(tiny):
    """The implementation choice, checked: values rotated as written and attention outputs rotated back give
    the logits of a model whose v_proj/o_proj carry the rotation, and store what its v_proj outputs."""
    model, tokenizer, spec = tiny
    folded = fold_value_rotation(model, spec.head_dim)
    dense_folded, folded_cache = decode_logits(Engine(folded, tokenizer, Full(), spec), PROMPT, CONTINUATION)
    rotated, cache = decode_logits(Engine(model, tokenizer, QuaRot(bits=16), spec), PROMPT, CONTINUATION)
    assert torch.allclose(rotated, dense_folded, atol=1e-4, rtol=0)
    seen = len(PROMPT) + len(CONTINUATION) - 1
    for folded_layer, layer in zip(folded_cache.layers, cache.layers, strict=True):
        # bits 16: every token sits in the window, token t in ring slot t.
        # Values are O(10) here, and later layers carry earlier layers' float32 rounding: 2e-5 was measured.
        assert torch.allclose(layer.window_values[:, :, :seen], folded_layer.values[:, :, :seen], atol=1e-4, rtol=0)
    # The rotation is not a no-op: unrotated values differ from what the folded v_proj stores.
    plain = prefilled(Engine(model, tokenizer, Full(), spec), PROMPT).layers[0].values
    n = len(PROMPT)
    assert not torch.allclose(plain[:, :, :n], folded_cache.layers[0].values[:, :, :n], atol=1e-2)


# ----- against the full cache -----
@pytest.mark.parametrize("rotate", [True, False], ids=["quarot", "rtn"])
def test_sixteen_bits_gives_the_full_cache_logits(tiny, rotate):
    model, tokenizer, spec = tiny
    expected, _ = decode_logits(Engine(model, tokenizer, Full(), spec), PROMPT, CONTINUATION)
    got, _ = decode_logits(Engine(model, tokenizer, QuaRot(bits=16, rotate=rotate), spec), PROMPT, CONTINUATION)
    # float32 rotations in and out: rounding only (logits here are O(10)).
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


EIGHT_BIT_KL_BOUND = 1e-3  # nats, mean over predicted tokens
EIGHT_BIT_TOKEN_KL_BOUND = 1e-2  # nats, any one predicted token


@pytest.mark.slow
def test_eight_bits_stays_close_to_the_full_cache_on_the_embedded_model(embedded, shared_data):
    """The stated bound: at 8 bits (clip 1.0, so rounding is the only error, at most half a step of
    range / 255 per element) the next-token distributions on WikiText-2 stay within a mean KL of 1e-3 nats
    of the full cache's, and within 1e-2 at every token; at 4 bits the mean exceeds the bound (so it is not
    vacuous). Measured on this text (mean / max): 8 bits 8.5e-5 / 7.3e-4 (QuaRot), 1.7e-4 / 1.2e-3 (RTN);
    4 bits ~2e-2 mean. (The greedy token is not compared: a near-tie flips at 8 bits.)"""
    model, tokenizer, spec = embedded
    text = (shared_data / "wikitext2" / "wiki.test.raw").read_text()[:20000]
    ids = tokenizer(text)["input_ids"]
    prompt, continuation = ids[:256], ids[256:296]
    expected, _ = decode_logits(Engine(model, tokenizer, Full(), spec, prefill_chunk=256), prompt, continuation)
    reference = expected.log_softmax(-1)

    def kl_per_token(bits: int, rotate: bool) -> torch.Tensor:
        method = QuaRot(bits=bits, clip_ratio=1.0, rotate=rotate)
        got, _ = decode_logits(Engine(model, tokenizer, method, spec, prefill_chunk=256), prompt, continuation)
        return (reference.exp() * (reference - got.log_softmax(-1))).sum(-1)

    for rotate in (True, False):
        kl8 = kl_per_token(8, rotate)
        assert float(kl8.mean()) <= EIGHT_BIT_KL_BOUND, (rotate, kl8)
        assert float(kl8.max()) <= EIGHT_BIT_TOKEN_KL_BOUND, (rotate, kl8)
        assert float(kl_per_token(4, rotate).mean()) > EIGHT_BIT_KL_BOUND, rotate


# ----- why rotate -----
def test_rotation_lowers_the_attention_error_when_keys_have_outlier_channels():
    """Keys with a few large channels (as real post-RoPE keys have): per-token RTN spends its range on the
    outliers; rotated first, the outliers are spread over every channel and 4-bit attention is closer."""
    model = ModelSpec("outliers", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, max_positions=4096)
    gen = torch.Generator().manual_seed(0)
    prompt = 200
    keys = torch.randn(1, 2, prompt + 1, 64, generator=gen)
    keys[..., [3, 40]] *= 25.0
    values = torch.randn(1, 2, prompt + 1, 64, generator=gen)
    values[..., 7] *= 25.0
    query = torch.randn(1, 4, 1, 64, generator=gen) * 0.3
    exact = F.scaled_dot_product_attention(query, keys, values, scale=64**-0.5, enable_gqa=True).transpose(1, 2)

    def error(rotate: bool) -> float:
        quant = QuantSpec(4, "token", 64, 1.0)
        layer = QuaRotLayer(LayerSpec(0, model, 1, prompt, 1), quant, "packed", rotate=rotate, quantizes=True)
        layer.update(keys[:, :, :prompt], values[:, :, :prompt])
        layer.finish_prefill()
        layer.update(keys[:, :, prompt:], values[:, :, prompt:])
        out = layer.attend(query, None, None, 64**-0.5)
        return float((out - exact).norm() / exact.norm())

    rotated, plain = error(True), error(False)
    assert rotated < 0.7 * plain, (rotated, plain)  # measured: 0.32 against 0.60


# ----- memory -----
@pytest.mark.parametrize(("bits", "group"), [(4, None), (3, 16), (2, 8), (8, None)])
def test_measured_bytes_are_packed_codes_plus_float16_parameters(tiny, bits, group):
    model, tokenizer, spec = tiny
    method = QuaRot(bits=bits, group=group)
    m = Engine(model, tokenizer, method, spec, prefill_chunk=64).generate(PROMPT, 12).measurement
    slots = 256  # 240 + 12 tokens, buffers aligned to 64 slots
    d = spec.head_dim
    per_token_head = d * bits // 8 + 2 * 2 * (d // (group or d))  # codes + a float16 scale and zero per group
    assert m.kv_bytes_device == 2 * spec.num_layers * spec.num_kv_heads * slots * per_token_head


def test_sixteen_bits_holds_the_prompt_and_decode_tokens_in_full_precision(tiny):
    model, tokenizer, spec = tiny
    m = Engine(model, tokenizer, QuaRot(bits=16), spec, prefill_chunk=64).generate(PROMPT, 12).measurement
    ring = len(PROMPT) + 12 + 1  # the window: every token, plus the one being written
    assert m.kv_bytes_device == 2 * spec.num_layers * spec.num_kv_heads * ring * spec.head_dim * 4  # float32


# ----- bad input -----
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.bits=5", "method.bits"),
        ("method.bits=1", "method.bits"),
        ("method.group=0", "method.group"),
        ("method.clip_ratio=0", "method.clip_ratio"),
        ("method.clip_ratio=1.2", "method.clip_ratio"),
        ("method.storage=int4", "method.storage"),
    ],
)
@pytest.mark.parametrize("name", ["quarot", "rtn"])
def test_bad_hyper_parameters_fail_when_the_config_is_built(name, override, key):
    with pytest.raises(ConfigError) as error:
        build(compose_config(f"method={name}", override))
    assert error.value.key == key
    assert "\n" not in str(error.value)


LLAMA_SHAPE = ModelSpec("llama", num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_positions=8192)


@pytest.mark.parametrize(
    ("changes", "model", "key"),
    [
        ({"group": 48}, LLAMA_SHAPE, "method.group"),  # does not divide 128
        ({"group": 256}, LLAMA_SHAPE, "method.group"),
        ({}, dataclasses.replace(LLAMA_SHAPE, head_dim=80), "method.rotate"),  # not a power of two
        ({"rotate": False}, dataclasses.replace(LLAMA_SHAPE, head_dim=20), "method.group"),  # 20 codes don't pack
    ],
)
def test_bad_hyper_parameters_for_the_model_fail_at_check(changes, model, key):
    method = dataclasses.replace(QuaRot(), **changes)
    with pytest.raises(ConfigError) as error:
        method.check(model)
    assert error.value.key == key


def test_rtn_needs_no_power_of_two_head_dim():
    QuaRot(rotate=False).check(dataclasses.replace(LLAMA_SHAPE, head_dim=80))
    QuaRot(group=32).check(LLAMA_SHAPE)


def test_the_ablation_config_is_quarot_without_rotation():
    quarot = build(compose_config("method=quarot")).method
    rtn = build(compose_config("method=rtn")).method
    assert (quarot.rotate, rtn.rotate) == (True, False)
    assert dataclasses.replace(rtn, rotate=True) == quarot


# ----- the static decode step -----
@pytest.mark.parametrize("method", [QuaRot(bits=16), QuaRot(bits=3, group=8)], ids=["bits16", "bits3_g8"])
def test_compiled_step_is_one_graph_with_the_eager_tokens(tiny, method):
    """The settings the generic engine test (configs as shipped) does not reach."""
    model, tokenizer, spec = tiny
    expected = Engine(model, tokenizer, method, spec, prefill_chunk=64).generate(PROMPT, 20).token_ids
    compiled = Engine(model, tokenizer, method, spec, prefill_chunk=64, engine="compiled", compile_scope="step")
    compiled.compile_options = {"backend": "eager"}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert compiled.generate(PROMPT, 20).token_ids == expected

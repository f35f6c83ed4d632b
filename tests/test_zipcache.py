"""ZipCache: hyper-parameter checks, probe saliency against a full-matrix reference, the salient/low split at
prefill and at each decode flush, byte accounting, compiled and batched decode, closeness on the real model."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench import plane_kernel, quant_kernels
from kvbench.cache import LayerSpec, ModelSpec
from kvbench.config import build
from kvbench.engine import Engine, Request
from kvbench.errors import ConfigError
from kvbench.methods.full import Full
from kvbench.methods.zipcache import ZipCache, ascending_order
from kvbench.quant import fake_quantize
from tests.conftest import compose_config
from tests.test_kivi import _logits, wikitext_ids  # noqa: F401 (a fixture)

MODEL = ModelSpec("test", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32, max_positions=4096)
SCALE = 0.25


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(high_bits=5), "method.high_bits"),
        (dict(low_bits=16), "method.low_bits"),
        (dict(low_ratio=1.5), "method.low_ratio"),
        (dict(low_ratio=-0.1), "method.low_ratio"),
        (dict(probe_recent=0.0), "method.probe_recent"),
        (dict(probe_random=2.0), "method.probe_random"),
        (dict(gap=1), "method.gap"),
        (dict(storage="fp8"), "method.storage"),
        (dict(saliency="h2o"), "method.saliency"),
    ],
)
def test_bad_hyper_parameters_fail_at_construction(kwargs, key):
    with pytest.raises(ConfigError) as caught:
        ZipCache(**kwargs)
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_config_builds_the_paper_defaults():
    method = build(compose_config("method=zipcache")).method
    assert (method.high_bits, method.low_bits, method.low_ratio, method.gap) == (4, 2, 0.4, 100)
    assert (method.probe_recent, method.probe_random) == (0.05, 0.05)
    described = method.describe()
    assert described["average_bits"] == pytest.approx(3.2) and described["storage"] == "packed"


def _layer(method: ZipCache, prompt: int, decode: int):
    return method.make_layer(LayerSpec(0, MODEL, 1, prompt, decode))


def _prefill(layer, keys, values, queries, chunk: int = 50) -> None:
    for start in range(0, keys.shape[2], chunk):
        stop = start + chunk
        layer.update(keys[:, :, start:stop], values[:, :, start:stop])
        layer.attend(queries[:, :, start:stop], layer.keys[:, :, :stop], layer.values[:, :, :stop], SCALE)


def _sequence(tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, tokens, 32, generator=gen) * (1 + 3 * torch.rand(1, 1, 1, 32, generator=gen))
    return keys, torch.randn(1, 2, tokens, 32, generator=gen), torch.randn(1, 4, tokens, 32, generator=gen)


def _reference_saliency(keys, queries, probe_recent: float, probe_random: float, normalized: bool = True):
    """Normalized (or accumulated) attention from the probe rows of the full causal attention matrix:
    [B, Hkv, L]."""
    length = keys.shape[2]
    recent = math.ceil(probe_recent * length)
    # The method's rule written out here, not imported: a wrong constant there would otherwise be the
    # reference's too. frac(p / golden ratio) < share spreads about `share` of the positions evenly.
    golden = (math.sqrt(5) - 1) / 2
    early = [p for p in range(length - recent) if (p * golden) % 1 < probe_random]
    assert abs(len(early) - probe_random * (length - recent)) <= 2  # the share the paper asks for
    probes = early + list(range(length - recent, length))
    k = keys.repeat_interleave(2, dim=1)  # each KV head to its 2 query heads
    logits = queries @ k.transpose(-1, -2) * SCALE
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)[:, :, probes]  # [B, Hq, P, L]
    summed = probs.sum(2).view(1, 2, 2, length).sum(2)
    seen_by = (torch.tensor(probes).view(-1, 1) >= torch.arange(length)).sum(0)
    return summed / seen_by if normalized else summed


@pytest.mark.parametrize("saliency", ["normalized", "accumulated"])
def test_saliency_is_the_probes_normalized_attention(saliency: str):
    method = ZipCache(probe_recent=0.05, probe_random=0.1, saliency=saliency)
    keys, values, queries = _sequence(230, seed=1)
    layer = _layer(method, 230, 10)
    _prefill(layer, keys, values, queries)
    got = layer.saliency(layer.keys[:, :, :230])
    expected = _reference_saliency(keys, queries, 0.05, 0.1, normalized=saliency == "normalized")
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_prefill_puts_the_least_salient_share_at_low_bits():
    """Per KV head, the low_ratio least salient tokens are stored (per-channel over their set) at low
    bits, the rest at high bits; values are divided by CSTQuant's channel scales first."""
    method = ZipCache(high_bits=4, low_bits=2, low_ratio=0.4)
    keys, values, queries = _sequence(200, seed=2)
    layer = _layer(method, 200, 10)
    _prefill(layer, keys, values, queries)
    order = _reference_saliency(keys, queries, 0.05, 0.05).argsort(dim=-1, stable=True)
    layer.finish_prefill()
    high, low = layer.parts
    assert int(high.length) == 120 and int(low.length) == 80
    c = values.abs().amax(2, keepdim=True).sqrt().half().float()
    for part, tokens, bits in ((high, order[..., 80:], 4), (low, order[..., :80], 2)):
        index = tokens.sort(-1).values.unsqueeze(-1).expand(-1, -1, -1, 32)
        n = index.shape[2]
        expected_keys = fake_quantize(keys.gather(2, index), bits, "channel", n)
        expected_values = fake_quantize(values.gather(2, index) / c, bits, "token", 32)
        assert torch.equal(quant_kernels.dequantize_slots(part.keys.slots_view())[:, :, :n], expected_keys)
        assert torch.allclose(quant_kernels.dequantize_slots(part.values.slots_view())[:, :, :n], expected_values)


def test_stores_take_the_kernels_lead_fold():
    """Both sets' keys say that row 0 spans their prompt set (`PackedSlots.prompt_row`, set by `fill`), so the
    plane kernel folds it below lead ("lead") for both (4-bit salient set, planar 2-bit rest), and the split
    kernel would for the same layout at 3 bits; the values' stores do not say so, and the launch's fold_lead
    off gives the per-slot modes back."""
    keys, values, queries = _sequence(200, seed=2)
    layer = _layer(ZipCache(), 200, 300)  # 3 decode blocks: rows of 60 and 40 tokens after row 0
    _prefill(layer, keys, values, queries)
    layer.finish_prefill()
    high, low = (part.keys.slots_view() for part in layer.parts)
    assert (high.row_tokens, low.row_tokens, high.prompt_row, low.prompt_row) == (60, 40, True, True)
    assert not any(part.values.slots_view().prompt_row for part in layer.parts)
    launch = quant_kernels.LaunchConfig()
    assert plane_kernel.plane_plan(high, layer.parts[0].values.slots_view(), launch) == ("lead", launch.block_n)
    assert plane_kernel.plane_plan(low, layer.parts[1].values.slots_view(), launch) == ("lead", launch.block_n)
    assert quant_kernels._param_mode(low._replace(bits=3), 32, launch, can_align=True) == "lead"
    off = quant_kernels.LaunchConfig(fold_lead=False)
    assert plane_kernel.plane_plan(high, layer.parts[0].values.slots_view(), off)[0] == "rows"
    assert plane_kernel.plane_plan(low, layer.parts[1].values.slots_view(), off)[0] == "rows"
    assert quant_kernels._param_mode(low._replace(bits=3), 32, off, can_align=True) == "gather"


def test_decode_flush_splits_the_buffer_by_the_current_querys_attention():
    """With gap 8 and low_ratio 0.5: after the 8th buffered token, the 4 tokens that query attended most go
    to the high set, the other 4 to the low set, and the buffer is empty again."""
    method = ZipCache(high_bits=8, low_bits=8, low_ratio=0.5, gap=8)
    keys, values, queries = _sequence(108, seed=3)
    query = torch.randn(32)
    favoured = torch.tensor([1, 2, 5, 6])
    signs = -torch.ones(8)
    signs[favoured] = 1
    keys[:, :, 100:] = signs.view(1, 1, 8, 1) * query * 0.5  # the last query attends to the favoured tokens
    values[:, :, 100:] = torch.arange(8.0).view(1, 1, 8, 1) + 1  # each token's value names it
    queries[:, :, 107] = query * 4
    layer = _layer(method, 100, 8)
    _prefill(layer, keys[:, :, :100], values[:, :, :100], queries[:, :, :100])
    layer.finish_prefill()
    high, low = layer.parts
    before = int(high.length), int(low.length)
    for t in range(100, 108):
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        layer.attend(queries[:, :, t : t + 1], None, None, SCALE)
        flushed = t == 107
        assert (int(high.length), int(low.length)) == (before[0] + 4 * flushed, before[1] + 4 * flushed)
    assert int(layer.quantized) == 108 and bool((layer.window_positions() < 0).all())
    c = layer.channel_scale.float()
    others = torch.tensor([0, 3, 4, 7])
    for part, count, tokens in ((high, before[0], favoured), (low, before[1], others)):
        stored = quant_kernels.dequantize_slots(part.values.slots_view())[:, :, count : count + 4] * c
        names = stored[0, :, :, 0].round().sort(-1).values  # per KV head, the tokens the flush put here
        assert torch.equal(names, (tokens + 1).float().expand(2, 4))


@pytest.mark.parametrize("shape", [(2, 3, 100), (1, 8, 7), (4, 2, 128)])
def test_the_flushs_order_is_a_stable_argsort(shape):
    """`ascending_order` (the flush's ranking without a sort) gives `argsort(stable=True)`'s order exactly:
    distinct scores, scores with many ties (equal scores keep their buffer order), and scores with infinities
    and NaN (last, in buffer order)."""
    gen = torch.Generator().manual_seed(sum(shape))
    tied = torch.randint(0, 4, shape, generator=gen).float()
    distinct = torch.randn(shape, generator=gen)
    odd = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    unusual = torch.where(torch.rand(shape, generator=gen) < 0.3, odd[torch.randint(0, 5, shape, generator=gen)], tied)
    for scores in (tied, distinct, unusual):
        assert torch.equal(ascending_order(scores), scores.argsort(dim=-1, stable=True))


def test_measured_bytes_are_both_sets_parameters_scales_and_buffer():
    method = ZipCache(high_bits=4, low_bits=2, low_ratio=0.4, gap=10)
    keys, values, queries = _sequence(130, seed=4)
    layer = _layer(method, 100, 30)
    _prefill(layer, keys[:, :, :100], values[:, :, :100], queries[:, :, :100])
    layer.finish_prefill()
    h, d = 2, 32
    # high set: 60 prompt + 3 blocks x 6 = 78 tokens -> 128 slots; low: 40 + 3 x 4 = 52 -> 64 slots.
    # Keys: one float16 scale and zero per channel for the prompt's set and each decode block (4 rows);
    # values: one pair per token slot. Channel scales: one float16 per channel. Buffer: 10 float32 tokens.
    high = 128 * d * 4 // 8 * 2 + 4 * d * 2 * 2 + 128 * 2 * 2
    low = 64 * d * 2 // 8 * 2 + 4 * d * 2 * 2 + 64 * 2 * 2
    expected = h * (high + low + d * 2 + 10 * d * 4 * 2)
    assert sum(t.numel() * t.element_size() for t in layer.tensors().values()) == expected


@pytest.fixture(scope="module")
def small_gap():
    return ZipCache(gap=8)


def test_compiled_decode_with_flushes_gives_the_eager_tokens(tiny, small_gap):
    """The flush commits (every 8 tokens) inside the compiled step's "flush" version; the step has two
    versions (flush, no flush: the host picks one per step) and is never retraced past them."""
    model, tokenizer, spec = tiny
    prompt = list(range(100, 340))
    expected = Engine(model, tokenizer, small_gap, spec, prefill_chunk=64).generate(prompt, 30).token_ids
    compiled = Engine(model, tokenizer, small_gap, spec, prefill_chunk=64, engine="compiled", compile_scope="step")
    graphs = []

    def tracing_only(gm: torch.fx.GraphModule, example_inputs) -> object:
        graphs.append(gm)
        return gm.forward

    compiled.compile_options = {"backend": tracing_only}
    torch._dynamo.reset()
    assert compiled.generate(prompt, 30).token_ids == expected
    assert len(graphs) == 2


def test_batched_sequences_flush_on_their_own_schedules(tiny, small_gap):
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, small_gap, spec, prefill_chunk=64)
    prompts = [list(range(100, 340)), list(range(500, 597))]
    alone = [engine.generate(p, 20).token_ids for p in prompts]
    assert [g.token_ids for g in engine.generate_batch([Request(p, 20) for p in prompts])] == alone


def test_eight_bits_stays_close_to_the_full_cache(embedded, wikitext_ids):  # noqa: F811
    """Real model and text, gap 8 so the decode tokens are flushed too: 8/8 bits predicts as the full cache
    (KL < 5e-3 nats at every step); the paper's 4/2 bits moves the distribution more."""
    prefix, continuation = wikitext_ids[:300], wikitext_ids[300:316]
    full = _logits(embedded, Full(), prefix, continuation).log_softmax(-1)

    def kl(method: ZipCache) -> torch.Tensor:
        logp = _logits(embedded, method, prefix, continuation).log_softmax(-1)
        return (logp.exp() * (logp - full)).sum(-1)

    kl8 = kl(ZipCache(high_bits=8, low_bits=8, gap=8))
    kl42 = kl(ZipCache(gap=8))
    assert kl8.max() < 5e-3, kl8
    assert kl42.mean() > 5 * kl8.mean()

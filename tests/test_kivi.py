"""KIVI: hyper-parameter checks, the paper's key/value axes, and closeness to the full cache on the real model."""

from __future__ import annotations

import pytest
import torch

from kvbench.cache import LayerSpec, ModelSpec
from kvbench.config import build
from kvbench.engine import Engine
from kvbench.errors import ConfigError
from kvbench.methods.full import Full
from kvbench.methods.kivi import KIVI
from kvbench.quant import fake_quantize
from kvbench.quantized_layer import QuantSpec
from tests.conftest import SHARED_DATA, compose_config

MODEL = ModelSpec("test", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_positions=4096)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(bits=5), "method.bits"),
        (dict(bits=1), "method.bits"),
        (dict(group=0), "method.group"),
        (dict(window=16), "method.window"),  # below the 32-token key group
        (dict(storage="fake"), "method.storage"),
        (dict(exempt_layers=-1), "method.exempt_layers"),
    ],
)
def test_bad_hyper_parameters_fail_at_construction(kwargs, key):
    with pytest.raises(ConfigError) as caught:
        KIVI(**kwargs)
    assert caught.value.key == key and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "key"), [(dict(group=48), "method.group"), (dict(exempt_layers=3), "method.exempt_layers")]
)
def test_bad_hyper_parameters_for_the_model_fail_in_check(kwargs, key):
    with pytest.raises(ConfigError) as caught:
        KIVI(**kwargs).check(MODEL)  # 48 channels do not tile head_dim 64; the model has 2 layers
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_config_builds_the_paper_defaults_and_records_the_storage():
    method = build(compose_config("method=kivi")).method
    assert (method.bits, method.group, method.window, method.storage) == (2, 32, 128, "packed")
    assert build(compose_config("method=kivi", "method.storage=simulated")).method.describe()["storage"] == "simulated"


def test_keys_per_channel_values_per_token():
    layer = KIVI(bits=4, group=32, window=64).make_layer(LayerSpec(0, MODEL, 1, 100, 10))
    assert layer.key_spec == QuantSpec(4, "channel", 32)
    assert layer.value_spec == QuantSpec(4, "token", 32)
    assert layer.window == 64 and layer.block == 32


@pytest.fixture(scope="module")
def wikitext_ids(embedded):
    path = SHARED_DATA / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"no {path}")
    _, tokenizer, _ = embedded
    return tokenizer(path.read_text()[:20000])["input_ids"]


def _logits(embedded, method, prefix: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits predicting each continuation token, fed one at a time through the method's cache."""
    model, tokenizer, spec = embedded
    engine = Engine(model, tokenizer, method, spec)
    cache = engine.new_cache(len(prefix), len(continuation))
    with torch.inference_mode():
        logits = [engine._prefill(cache, prefix)[-1]]
        cache.finish_prefill()
        for i, token in enumerate(continuation[:-1]):
            logits.append(engine._forward(cache, [token], len(prefix) + i)[-1])
    return torch.stack(logits).float()


def test_eight_bits_stays_close_to_the_full_cache_and_two_bits_does_not(embedded, wikitext_ids):
    """On the real model and text, with a window of 32 so most of the 300-token prompt and the decode
    tokens are quantized: 8-bit KIVI predicts as the full cache does (KL < 5e-3 nats at every step, the
    same top token almost everywhere); 2-bit moves the distribution far more (quantization is in effect)."""
    prefix, continuation = wikitext_ids[:300], wikitext_ids[300:316]
    full = _logits(embedded, Full(), prefix, continuation).log_softmax(-1)

    def kl(bits: int) -> torch.Tensor:
        logp = _logits(embedded, KIVI(bits=bits, window=32), prefix, continuation).log_softmax(-1)
        return (logp.exp() * (logp - full)).sum(-1), (logp.argmax(-1) == full.argmax(-1)).float().mean()

    kl8, agree8 = kl(8)
    kl2, _ = kl(2)
    assert kl8.max() < 5e-3 and agree8 >= 0.9, (kl8, agree8)
    assert kl2.mean() > 20 * kl8.mean()


def test_per_channel_keys_lose_less_than_per_token_keys_on_real_keys(embedded, wikitext_ids):
    """KIVI's premise (paper §3): keys have outlier channels, so grouping keys per channel loses less than
    per token at 2 bits. Checked on the embedded model's real post-RoPE keys, all layers."""
    model, tokenizer, spec = embedded
    engine = Engine(model, tokenizer, Full(), spec)
    cache = engine.new_cache(288, 0)
    with torch.inference_mode():
        engine._prefill(cache, wikitext_ids[:288])
    errors = {}
    for axis in ("channel", "token"):
        keys = [layer.keys[:, :, :288] for layer in cache.layers]
        lost = sum((fake_quantize(k, 2, axis, 32) - k).pow(2).sum() for k in keys)
        errors[axis] = float(lost / sum(k.pow(2).sum() for k in keys))
    assert errors["channel"] < 0.5 * errors["token"], errors

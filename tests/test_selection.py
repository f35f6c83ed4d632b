"""Method selections against references written in plain PyTorch, on the same random tensors."""

from __future__ import annotations

import torch

from kvbench.cache import LayerSpec, ModelSpec
from kvbench.methods.h2o import H2O
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM

B, HQ, HKV, D = 1, 4, 2, 16
G = HQ // HKV
SCALE = D**-0.5
MODEL = ModelSpec("test", num_layers=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_positions=4096)


def spec(prompt_len: int, decode_len: int, inv_freq: torch.Tensor | None = None) -> LayerSpec:
    return LayerSpec(0, MODEL, B, prompt_len, decode_len, inv_freq)


def prefill(layer, q, k, v, chunk: int = 32) -> None:
    """Drive a layer as the model would: update then attend, chunk by chunk, then finish the prefill."""
    for start in range(0, k.shape[2], chunk):
        stop = start + chunk
        keys, values = layer.update(k[:, :, start:stop], v[:, :, start:stop])
        layer.attend(q[:, :, start:stop], keys, values, SCALE)
    layer.finish_prefill()


def kept_positions(layer, keys_seen: torch.Tensor) -> list[list[int]]:
    """The original positions each KV head holds (live slots), checked against the stored keys themselves."""
    out = []
    for h in range(HKV):
        slots = (layer.positions[0, h] >= 0).nonzero().view(-1)
        positions = layer.positions[0, h, slots]
        # A slot that claims a position must hold that position's key: no silent mismatch.
        assert torch.equal(layer.keys[0, h, slots], keys_seen[0, h, positions])
        out.append(sorted(positions.tolist()))
    return out


def test_snapkv_selection_matches_reference():
    torch.manual_seed(0)
    t, window, kernel, budget = 200, 16, 5, 64
    q, k, v = torch.randn(B, HQ, t, D), torch.randn(B, HKV, t, D), torch.randn(B, HKV, t, D)
    layer = SnapKV(budget=budget, window=window, kernel=kernel, pooling="max").make_layer(spec(t, 4))
    prefill(layer, q, k, v)

    expected = []
    for h in range(HKV):
        votes = torch.zeros(t - window)
        for g in range(G):
            qh = q[0, h * G + g, -window:]  # the window queries of this query head
            logits = qh @ k[0, h].T * SCALE
            for i in range(window):  # causal: window query i sits at position t - window + i
                logits[i, t - window + i + 1 :] = float("-inf")
            votes += logits.softmax(-1)[:, : t - window].sum(0) / G
        pooled = torch.stack([votes[max(0, i - kernel // 2) : i + kernel // 2 + 1].max() for i in range(t - window)])
        top = pooled.topk(budget - window).indices.tolist()
        expected.append(sorted(top + list(range(t - window, t))))
    assert kept_positions(layer, k) == expected


def h2o_reference(q, k, t: int, total: int, budget: int, recent: int) -> list[list[int]]:
    """H2O (Alg. 1) in plain Python: which positions each KV head holds after every token up to `total`."""
    expected = []
    for h in range(HKV):
        # Prefill: every prompt query's attention, summed over the group's query heads.
        logits = torch.stack([q[0, h * G + g, :t] @ k[0, h, :t].T * SCALE for g in range(G)])
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        score = dict(enumerate(logits.softmax(-1).sum(dim=(0, 1)).tolist()))
        heavy = sorted(range(t - recent), key=lambda p: score[p], reverse=True)[: budget - recent]
        cache = set(heavy) | set(range(t - recent, t))
        for i in range(t, total):
            cache.add(i)
            score[i] = 0.0
            order = sorted(cache)
            keys_now = k[0, h, order]
            for g in range(G):
                probs = (q[0, h * G + g, i] @ keys_now.T * SCALE).softmax(-1)
                for position, p in zip(order, probs.tolist(), strict=True):
                    score[position] += p
            if len(cache) > budget:
                candidates = [p for p in cache if p < i + 1 - recent]
                cache.remove(min(candidates, key=lambda p: score[p]))
        expected.append(sorted(cache))
    return expected


def test_h2o_selection_matches_reference_through_decode():
    torch.manual_seed(1)
    t, steps, budget, recent_ratio = 96, 40, 40, 0.25
    recent = int(budget * recent_ratio)
    total = t + steps
    q, k, v = torch.randn(B, HQ, total, D), torch.randn(B, HKV, total, D), torch.randn(B, HKV, total, D)
    # A prompt token that prefill barely looks at but every decode query does: it survives only if decode
    # attention accumulates into the scores (Alg. 1), so a layer that stops accumulating fails here.
    k[:, :, 20] = 0.0
    k[:, :, 20, 0] = 4.0
    q[:, :, t:, 0] = 4.0
    layer = H2O(budget=budget, recent_ratio=recent_ratio).make_layer(spec(t, steps))
    prefill(layer, q[:, :, :t], k[:, :, :t], v[:, :, :t])
    for i in range(t, total):
        keys, values = layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        layer.attend(q[:, :, i : i + 1], keys, values, SCALE)
        # Alg. 1: budget + 1 tokens attend, then one is evicted: `budget` stay live between steps.
        assert int((layer.positions >= 0).sum(-1).min()) == int((layer.positions >= 0).sum(-1).max()) == budget
    expected = h2o_reference(q, k, t, total, budget, recent)
    assert kept_positions(layer, k) == expected  # live positions, so a duplicated slot would show twice
    assert all(20 in held for held in expected)


def test_h2o_prompt_cut_takes_heavy_hitters_outside_the_recent_window():
    """The prompt cut keeps the recent window once and fills the rest with the heaviest older tokens."""
    torch.manual_seed(6)
    t, budget, recent_ratio = 64, 24, 0.5
    recent = int(budget * recent_ratio)
    q, k, v = torch.randn(B, HQ, t, D), torch.randn(B, HKV, t, D), torch.randn(B, HKV, t, D)
    q[:, :, :, 0] = 5.0
    k[:, :, t - recent :, 0] = 5.0  # the recent tokens are the heaviest of all: a cut that ignores the window
    layer = H2O(budget=budget, recent_ratio=recent_ratio).make_layer(spec(t, 4))
    prefill(layer, q, k, v)
    held = kept_positions(layer, k)
    for h in range(HKV):
        assert len(held[h]) == len(set(held[h])) == budget
    assert held == h2o_reference(q, k, t, t, budget, recent)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = positions[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_streamingllm_position_shift_equals_rerotated_cache():
    """Sinks + window with in-cache positions: same attention as re-rotating every key to 0..n-1."""
    torch.manual_seed(2)
    t, steps, budget, sinks = 80, 10, 24, 4
    total = t + steps
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    raw_q, raw_k = torch.randn(B, HQ, total, D), torch.randn(B, HKV, total, D)
    v = torch.randn(B, HKV, total, D)
    pos = torch.arange(total)
    q, k = rope(raw_q, pos, inv_freq), rope(raw_k, pos, inv_freq)  # post-RoPE, original positions
    layer = StreamingLLM(budget=budget, sinks=sinks).make_layer(spec(t, steps, inv_freq))
    prefill(layer, q[:, :, :t], k[:, :, :t], v[:, :, :t])
    for i in range(t, total):
        keys, values = layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        out = layer.attend(q[:, :, i : i + 1], keys, values, SCALE)

    kept = list(range(sinks)) + list(range(total - (budget - sinks), total))
    in_cache = torch.arange(len(kept))
    ref_k = rope(raw_k[:, :, kept], in_cache, inv_freq)
    ref_q = rope(raw_q[:, :, -1:], in_cache[-1:], inv_freq)
    ref = torch.nn.functional.scaled_dot_product_attention(ref_q, ref_k, v[:, :, kept], enable_gqa=True)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-5)
    # Sink slots hold the shifted sinks; the layer keeps them at their original positions aside.
    assert torch.equal(layer.sink_keys, k[:, :, :sinks])
    layer.keys[:, :, :sinks] = layer.sink_keys
    assert kept_positions(layer, k) == [kept] * HKV


def test_snapkv_compresses_a_prompt_just_over_budget():
    """A prompt between budget and budget + decode tokens must still be cut to the budget."""
    torch.manual_seed(3)
    t, budget = 70, 64
    q, k, v = torch.randn(B, HQ, t, D), torch.randn(B, HKV, t, D), torch.randn(B, HKV, t, D)
    layer = SnapKV(budget=budget, window=8).make_layer(spec(t, 20))
    prefill(layer, q, k, v)
    assert int((layer.positions >= 0).sum(-1).max()) == budget and layer.capacity == budget + 20

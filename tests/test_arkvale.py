"""ArkVale against plain-PyTorch references: exactness at a large budget, the digest bound, recall."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvbench.cache import FullLayer, KVCache, LayerSpec, ModelSpec, aligned_slots
from kvbench.config import build
from kvbench.cuboid_scores import cuboid_scores
from kvbench.engine import Engine, Request
from kvbench.errors import ConfigError
from kvbench.methods import arkvale as arkvale_module
from kvbench.methods.arkvale import ArkVale, ArkValeLayer, page_digest
from kvbench.methods.full import Full
from tests.conftest import compose_config

B, HQ, HKV, D = 1, 4, 2, 16
G = HQ // HKV
SCALE = D**-0.5
MODEL = ModelSpec("test", num_layers=4, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_positions=4096)


def make_layer(method: ArkVale, prompt_len: int, decode_len: int) -> ArkValeLayer:
    return method.make_layer(LayerSpec(3, MODEL, B, prompt_len, decode_len))


def prefill(layer: ArkValeLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 32) -> None:
    """Drive a layer as the model does: update then attend, chunk by chunk, then finish the prefill."""
    for start in range(0, k.shape[2], chunk):
        keys, values = layer.update(k[:, :, start : start + chunk], v[:, :, start : start + chunk])
        layer.attend(q[:, :, start : start + chunk], keys, values, SCALE)
    layer.finish_prefill()


def decode(layer: ArkValeLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
    keys, values = layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
    return layer.attend(q[:, :, i : i + 1], keys, values, SCALE)


def reference_attention(layer: ArkValeLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int):
    """Attention of query i over the pages `slot_page` names, rebuilt from the inputs, plus the current page."""
    p, per_group = layer.page_size, HKV // layer.groups
    current = i // p
    outputs = []
    for h in range(HKV):
        pages = [pg for pg in layer.slot_page[0, h // per_group].tolist() if pg != current]
        positions = [pg * p + t for pg in pages for t in range(p)] + list(range(current * p, i + 1))
        qh = q[:, h * G : (h + 1) * G, i : i + 1]
        outputs.append(F.scaled_dot_product_attention(qh, k[:, h : h + 1, positions], v[:, h : h + 1, positions]))
    return torch.cat(outputs, dim=1).transpose(1, 2)


def check_slots(layer: ArkValeLayer, k: torch.Tensor, v: torch.Tensor) -> None:
    """Every page slot holds exactly the tokens of the page `slot_page` names; the protected pages are in."""
    p, per_group = layer.page_size, HKV // layer.groups
    seen = int(layer.seen[0])
    current = (seen - 1) // p
    for g in range(layer.groups):
        heads = slice(g * per_group, (g + 1) * per_group)
        pages = layer.slot_page[0, g].tolist()
        assert len(set(pages)) == len(pages)
        assert set(range(layer.method.n_sink_pages)) <= set(pages)
        assert set(range(current - layer.method.n_win_pages + 1, current + 1)) <= set(pages)
        for slot, page in enumerate(pages):
            length = min(p, seen - page * p)
            stored = layer.keys[0, heads, slot * p : slot * p + length]
            assert torch.equal(stored, k[0, heads, page * p : page * p + length])
            assert torch.equal(
                layer.values[0, heads, slot * p : slot * p + length], v[0, heads, page * p : page * p + length]
            )


# ----- 1. budget >= context: exactly the full cache -----
def test_budget_at_least_context_reproduces_full_cache_exactly(tiny):
    model, tokenizer, spec = tiny
    prompt, new_tokens = list(range(100, 360)), 12
    full = Engine(model, tokenizer, Full(), spec, prefill_chunk=64)
    arkvale = Engine(model, tokenizer, ArkVale(budget=1024, page_size=32), spec, prefill_chunk=64)
    assert full.generate(prompt, new_tokens).token_ids == arkvale.generate(prompt, new_tokens).token_ids

    # Every logit along a teacher-forced continuation, through the decode path, bit for bit.
    continuation = list(range(500, 524))
    caches = [engine.new_cache(len(prompt), len(continuation)) for engine in (full, arkvale)]
    with torch.inference_mode():
        logits = [engine._prefill(cache, prompt) for engine, cache in zip((full, arkvale), caches, strict=True)]
        assert torch.equal(logits[0], logits[1])
        for cache in caches:
            cache.finish_prefill()
        for step, token in enumerate(continuation):
            position = len(prompt) + step
            out = [engine._forward(c, [token], position) for engine, c in zip((full, arkvale), caches, strict=True)]
            assert torch.equal(out[0], out[1])
    assert caches[1].stats()["selection_steps"] == 0  # never more pages than the budget: no selection


def test_small_budget_recalls_through_the_engine(tiny):
    model, tokenizer, spec = tiny
    method = ArkVale(budget=128, page_size=16, page_topk=5)
    engine = Engine(model, tokenizer, method, spec, prefill_chunk=64)
    generation = engine.generate(list(range(100, 400)), max_new_tokens=24, question_ids=list(range(600, 612)))
    stats = generation.measurement.method_stats
    ark_layers = spec.num_layers - method.exempt_layers
    steps = 12 + generation.measurement.decode_steps  # question tokens, then generated ones
    assert stats["selection_steps"] == ark_layers * steps  # every decode step
    assert stats["pages_recalled"] > 0


def _generate_keeping_cache(engine: Engine, requests: list[Request]) -> tuple[list[list[int]], KVCache]:
    kept = {}
    decode = engine._decode

    def keep_cache(cache, state):
        kept["cache"] = cache
        return decode(cache, state)

    engine._decode = keep_cache
    return [g.token_ids for g in engine.generate_batch(requests)], kept["cache"]


def test_compiled_page_schedule_gives_the_every_step_tokens_and_pages(tiny, monkeypatch):
    """Rows of a batch start pages on different steps. The compiled step on the host's page schedule (slot moves
    and digests only on steps that start or end some row's page) gives the tokens, slots, pages and full-page
    digests of the eager step that moves and digests on every step, and after every compiled step the host's
    token counts equal the device's."""
    model, tokenizer, spec = tiny
    method = ArkVale(budget=128, page_size=16, page_topk=5)
    prompts = [list(range(100, 400)), list(range(500, 807)), list(range(900, 1211))]
    requests = [Request(p, 30, question_ids=q) for p, q in zip(prompts, [(), (7, 8, 9), (11,)], strict=True)]
    with monkeypatch.context() as patch:
        patch.setattr(ArkValeLayer, "decode_variant", lambda self: True)
        reference = _generate_keeping_cache(Engine(model, tokenizer, method, spec, prefill_chunk=64), requests)
    steps: list[tuple[bool, bool]] = []
    advance = KVCache.advance

    def checked(self: KVCache) -> None:
        page_step = self.variant_layers[0].page_step
        advance(self)
        steps.append((page_step, all(layer.written == layer.seen.tolist() for layer in self.variant_layers)))

    monkeypatch.setattr(KVCache, "advance", checked)
    torch._dynamo.reset()
    tokens, cache = _generate_keeping_cache(
        Engine(model, tokenizer, method, spec, prefill_chunk=64, engine="compiled"), requests
    )
    assert tokens == reference[0]
    for got, expected in zip(cache.layers, reference[1].layers, strict=True):
        if not isinstance(got, ArkValeLayer):
            continue
        assert torch.equal(got.slot_page, expected.slot_page) and torch.equal(got.positions, expected.positions)
        assert torch.equal(got.counters, expected.counters)
        torch.testing.assert_close(got.keys, expected.keys, rtol=1e-4, atol=1e-4)
        full_pages = int(got.seen.min()) // method.page_size
        for name in ("digest_upper", "digest_lower"):
            got_digest, expected_digest = getattr(got, name), getattr(expected, name)
            torch.testing.assert_close(
                got_digest[:, :, :full_pages], expected_digest[:, :, :full_pages], rtol=1e-4, atol=1e-4
            )
    assert all(agree for _, agree in steps), steps
    page_steps = [s for s, _ in steps]
    assert True in page_steps and False in page_steps  # both versions ran
    assert sum(page_steps) < len(page_steps) / 2  # most steps move nothing


# ----- memory accounting -----
def test_bytes_count_resident_pages_digests_and_host_backups(tiny):
    model, tokenizer, spec = tiny
    method = ArkVale(budget=128, page_size=16)
    engine = Engine(model, tokenizer, method, spec, prefill_chunk=64)
    element = 4  # float32 on CPU
    kv_per_token = 2 * spec.num_kv_heads * spec.head_dim * element  # keys + values, one layer
    measured = {}
    for prompt_len in (200, 400):
        cache = engine.new_cache(prompt_len, 8)
        with torch.inference_mode():
            engine._prefill(cache, list(range(100, 100 + prompt_len)))
            cache.finish_prefill()
        layers = [layer for layer in cache.layers if isinstance(layer, ArkValeLayer)]
        assert all(isinstance(layer, FullLayer) for layer in cache.layers[: method.exempt_layers])
        pages = math.ceil((prompt_len + 8) / 16)
        for layer in layers:
            held = layer.tensors()
            assert held["keys"].shape[2] == held["values"].shape[2] == 128  # the budget, not the context
            assert (
                held["digest_upper"].shape == held["digest_lower"].shape == (1, spec.num_kv_heads, pages, spec.head_dim)
            )
            assert sum(t.numel() * t.element_size() for t in layer.host_tensors().values()) == pages * 16 * kv_per_token
        measured[prompt_len] = cache.kv_bytes()
    # Resident pages are fixed; the digests (1/page_size of the dense KV) and the host backup grow.
    digest_per_page = 2 * spec.num_kv_heads * spec.head_dim * element  # c + r and c - r, one layer
    digest_growth = (math.ceil(408 / 16) - math.ceil(208 / 16)) * digest_per_page * len(layers)
    # The exempt layers keep everything, in slot buffers aligned to 64 slots.
    dense_growth = (aligned_slots(408) - aligned_slots(208)) * kv_per_token * method.exempt_layers
    assert measured[400][0] - measured[200][0] == digest_growth + dense_growth
    assert measured[400][1] > measured[200][1]


# ----- 2. the digest bound -----
def test_max_radius_estimate_bounds_the_true_page_maximum():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        p, d = (
            int(torch.randint(1, 33, (1,), generator=generator)),
            int(torch.randint(2, 65, (1,), generator=generator)),
        )
        scale, shift = torch.rand(1, generator=generator) * 10, torch.randn(d, generator=generator) * 3
        keys = torch.randn(1, 1, 1, p, d, generator=generator) * scale + shift
        query = torch.randn(1, 1, d, generator=generator) * torch.rand(1, generator=generator) * 10
        upper, lower = page_digest(keys, "max")
        estimate = cuboid_scores(query, upper, lower)[0, 0, 0]
        true_max = (keys[0, 0, 0] @ query[0, 0]).max()
        assert estimate >= true_max - 1e-4 * (1 + true_max.abs())
        # The two-matmul form equals the paper's per-channel maximum.
        literal = torch.maximum(query[0, 0] * upper[0, 0, 0], query[0, 0] * lower[0, 0, 0]).sum()
        assert torch.allclose(estimate, literal, rtol=1e-5, atol=1e-4)
        # Smaller radii give smaller (tighter, no longer bounding) estimates.
        mean_estimate = cuboid_scores(query, *page_digest(keys, "mean"))[0, 0, 0]
        assert mean_estimate <= estimate + 1e-4 * (1 + estimate.abs())


def test_scores_average_over_every_query_head_of_a_kv_head():
    torch.manual_seed(3)
    query, upper = torch.randn(2, HQ, D), torch.randn(2, HKV, 5, D)
    lower = upper - torch.rand(2, HKV, 5, D)
    got = cuboid_scores(query, upper, lower)
    for b in range(2):
        for h in range(HKV):
            per_head = [
                torch.maximum(query[b, h * G + g] * upper[b, h], query[b, h * G + g] * lower[b, h]).sum(-1)
                for g in range(G)
            ]
            assert torch.allclose(got[b, h], torch.stack(per_head).mean(0), atol=1e-5)


# ----- 3. a planted page: evicted at prefill, recalled when a later query aligns with it -----
@pytest.mark.parametrize("n_groups", [1, 2])
def test_planted_page_is_recalled_and_attention_matches_reference(n_groups):
    torch.manual_seed(4)
    p, prompt_len, steps = 4, 80, 30
    total = prompt_len + steps
    method = ArkVale(budget=32, page_size=p, page_topk=4, n_groups=n_groups, radius="max", exempt_layers=0)
    q, k, v = torch.randn(B, HQ, total, D), torch.randn(B, HKV, total, D) * 0.3, torch.randn(B, HKV, total, D)
    direction = torch.zeros(D)
    direction[0] = 1.0
    planted = 7  # tokens 28..31
    k[:, :, planted * p : (planted + 1) * p] += 6 * direction
    q[:, :, prompt_len - 1] = -3 * direction  # the last prompt query ranks the planted page lowest
    q[:, :, prompt_len + 5] = 3 * direction  # a later query looks for it

    layer = make_layer(method, prompt_len, steps)
    prefill(layer, q[:, :, :prompt_len], k[:, :, :prompt_len], v[:, :, :prompt_len])
    assert int((layer.positions >= 0).sum(-1).max()) == 32 and layer.capacity == 32
    assert planted not in layer.slot_page.flatten().tolist()
    check_slots(layer, k, v)
    for i in range(prompt_len, total):
        recalled_before = layer.stats()["pages_recalled"]
        out = decode(layer, q, k, v, i)
        check_slots(layer, k, v)
        assert torch.allclose(out, reference_attention(layer, q, k, v, i), atol=1e-5)
        if i == prompt_len + 5:
            assert (layer.slot_page == planted).any(dim=-1).all()  # resident for every group
            assert layer.stats()["pages_recalled"] > recalled_before
    assert layer.stats()["selection_steps"] == steps
    assert torch.equal(layer.host_keys[0, :, planted * p : (planted + 1) * p], k[0, :, planted * p : (planted + 1) * p])


def test_prefill_keeps_two_sink_pages_even_when_they_rank_last():
    """The code's prefill eviction keeps max(2, n_sink_pages) first pages, whatever their scores."""
    torch.manual_seed(7)
    p, prompt_len = 4, 80
    method = ArkVale(budget=32, page_size=p, page_topk=4, n_sink_pages=1, radius="max", exempt_layers=0)
    q, k, v = torch.randn(B, HQ, prompt_len, D), torch.randn(B, HKV, prompt_len, D), torch.randn(B, HKV, prompt_len, D)
    direction = torch.zeros(D)
    direction[0] = 1.0
    k[:, :, : 2 * p] -= 8 * direction  # pages 0 and 1 score lowest for the last prompt query
    q[:, :, prompt_len - 1] = 3 * direction
    layer = make_layer(method, prompt_len, 8)
    prefill(layer, q, k, v)
    assert {0, 1} <= set(layer.slot_page[0, 0].tolist())
    check_slots(layer, k, v)


def test_topk_pages_by_reference_scores_are_resident_every_step():
    torch.manual_seed(5)
    p, prompt_len, steps = 4, 60, 40
    total = prompt_len + steps
    method = ArkVale(budget=32, page_size=p, page_topk=5, exempt_layers=0)
    q, k, v = torch.randn(B, HQ, total, D), torch.randn(B, HKV, total, D), torch.randn(B, HKV, total, D)
    layer = make_layer(method, prompt_len, steps)
    prefill(layer, q[:, :, :prompt_len], k[:, :, :prompt_len], v[:, :, :prompt_len])
    for i in range(prompt_len, total):
        decode(layer, q, k, v, i)
        current = i // p
        scores = []
        for page in range(1, current - 1):  # candidates: not the sink page, not the two window pages
            keys = k[0, :, page * p : (page + 1) * p]
            centre = (keys.amax(1) + keys.amin(1)) / 2
            r = (keys - centre[:, None]).abs().mean(1)
            estimate = sum(
                torch.maximum(q[0, h * G + g, i] * (centre[h] + r[h]), q[0, h * G + g, i] * (centre[h] - r[h])).sum()
                for h in range(HKV)
                for g in range(G)
            )
            scores.append((float(estimate), page))
        top = {page for _, page in sorted(scores, reverse=True)[: 5 - 1 - 1]}
        assert top <= set(layer.slot_page[0, 0].tolist())
        check_slots(layer, k, v)


# ----- 4. bad input fails at construction, naming the key -----
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(budget=100, page_size=32), "method.budget"),  # not a multiple of the page size
        (dict(budget=128, page_size=32), "method.budget"),  # only the sinks and the window fit
        (dict(budget=256, page_size=32, page_topk=8), "method.page_topk"),  # more than the budget's pages
        (dict(budget=256, page_size=32, page_topk=1), "method.page_topk"),  # no page left to select
        (dict(budget=160, page_size=32), "method.page_topk"),  # the paper formula leaves none to select
        (dict(page_size=0), "method.page_size"),
        (dict(n_win_pages=0), "method.n_win_pages"),
        (dict(n_sink_pages=-1), "method.n_sink_pages"),
        (dict(radius="sphere"), "method.radius"),
        (dict(n_groups=0), "method.n_groups"),
        (dict(exempt_layers=-1), "method.exempt_layers"),
    ],
)
def test_bad_hyper_parameters_fail_at_construction(kwargs, key):
    with pytest.raises(ConfigError) as caught:
        ArkVale(**kwargs)
    assert caught.value.key == key and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(budget=8192), "method.budget"),  # beyond the model's 4096 positions
        (dict(exempt_layers=5), "method.exempt_layers"),  # beyond its 4 layers
        (dict(n_groups=4), "method.n_groups"),  # its 2 KV heads do not split in 4 groups
    ],
)
def test_bad_hyper_parameters_for_the_model_fail_in_check(kwargs, key):
    method = ArkVale(**kwargs)
    with pytest.raises(ConfigError) as caught:
        method.check(MODEL)
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_config_builds_and_paper_topk_formula():
    method = build(compose_config("method=arkvale")).method
    assert isinstance(method, ArkVale) and method.page_topk is None
    assert method.topk == 16  # min(1280, 1024 / 2) / 32
    assert ArkVale(budget=4096).topk == 40 and ArkVale(budget=512, page_size=16).topk == 16
    with pytest.raises(ConfigError) as caught:
        build(compose_config("method=arkvale", "method.budget=1000"))
    assert caught.value.key == "method.budget"


def test_recall_cap_pins_the_pages_recalled_per_step(tiny):
    """The benchmark's pinned recall count: 0 recalls nothing, 1 at most one page per step and layer, and a
    fraction is a rate (0.25: one page on a quarter of a layer's selection steps at most)."""
    model, tokenizer, spec = tiny
    prompt, question = list(range(100, 400)), list(range(600, 612))
    counts = {}
    for cap in (None, 0, 1, 0.25, 4):  # 4: more than the 3 pages selected freely (page_topk 5)
        method = ArkVale(budget=128, page_size=16, page_topk=5, recall_cap=cap)
        stats = Engine(model, tokenizer, method, spec, prefill_chunk=64).generate(prompt, 24, question).measurement
        counts[cap] = (stats.method_stats["pages_recalled"], stats.method_stats["selection_steps"])
    assert counts[0][0] == 0
    assert 0 < counts[1][0] <= counts[1][1] < counts[None][0]
    assert counts[4] == counts[None]  # a cap above what is selected caps nothing
    # Random weights miss a page on nearly every step: the rate, not the misses, sets the count.
    recalled, steps = counts[0.25]
    assert counts[1][0] > 0.9 * counts[1][1]
    assert 0.2 * steps <= recalled <= 0.25 * steps


def test_decode_never_asks_how_host_copies_run(monkeypatch):
    """The routing of host copies is decided once at prefill: `torch.compile` cannot trace the `is_pinned`
    that deciding needs, so a decode step that asks breaks the compiled step on a GPU."""
    torch.manual_seed(0)
    layer = make_layer(ArkVale(budget=64, page_size=8, page_topk=4, exempt_layers=0), 96, 8)
    q, k, v = torch.randn(B, HQ, 104, D), torch.randn(B, HKV, 104, D), torch.randn(B, HKV, 104, D)
    prefill(layer, q[:, :, :96], k[:, :, :96], v[:, :, :96])

    def asked(*args):
        raise AssertionError("uses_kernels called during decode")

    monkeypatch.setattr("kvbench.host_pages.uses_kernels", asked)
    for i in range(96, 104):
        decode(layer, q, k, v, i)
    assert layer.stats()["pages_recalled"] > 0  # the host copies did run


@pytest.mark.parametrize("n_groups", [1, 2])
def test_host_bytes_read_are_the_bytes_the_recalls_fetch(monkeypatch, n_groups):
    """`host_bytes_read` (what speed.py's floor counts over PCIe) is what the recall copies were asked to move:
    each fetched page's rows of keys and values for every KV head of its group, counted from the copies'
    own arguments."""
    fetched = []
    real_gather = arkvale_module.gather_pages

    def counting_gather(hosts, targets, positions, pages, slots, fetch, page_size, through_kernels=None):
        heads_per_group = hosts[0].shape[1] // pages.shape[1]
        row_bytes = sum(host.shape[-1] * host.element_size() for host in hosts)
        fetched.append(int((fetch != 0).sum()) * heads_per_group * page_size * row_bytes)
        return real_gather(hosts, targets, positions, pages, slots, fetch, page_size, through_kernels)

    monkeypatch.setattr(arkvale_module, "gather_pages", counting_gather)
    torch.manual_seed(1)
    layer = make_layer(ArkVale(budget=32, page_size=4, page_topk=4, n_groups=n_groups, exempt_layers=0), 80, 24)
    q, k, v = torch.randn(B, HQ, 104, D), torch.randn(B, HKV, 104, D), torch.randn(B, HKV, 104, 2 * D)
    prefill(layer, q[:, :, :80], k[:, :, :80], v[:, :, :80])
    for i in range(80, 104):
        decode(layer, q, k, v, i)
    assert sum(fetched) > 0
    assert layer.stats()["host_bytes_read"] == sum(fetched)

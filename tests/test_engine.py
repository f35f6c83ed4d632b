"""Engine behaviour that tasks rely on: seeded sampling and its limits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from kvbench.config import build
from kvbench.engine import DecodeState, Engine, Request, Sampling, first_argmax, parse_inductor_options
from kvbench.methods.full import Full
from tests.conftest import compose_config, method_names

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


def chosen_tokens(probs: list[float], temperature: float, top_p: float, draws: int) -> torch.Tensor:
    """`draws` independent picks by `Engine._choose` from `probs` [draws]."""
    logits = torch.log(torch.tensor([probs])).expand(draws, -1)
    state = DecodeState(
        tokens=torch.zeros(draws, dtype=torch.long),
        positions=torch.zeros(draws, dtype=torch.long),
        count=torch.zeros(draws, dtype=torch.long),
        done=torch.zeros(draws, dtype=torch.bool),
        output=torch.zeros(draws, 2, dtype=torch.long),
        stop_mask=torch.zeros(draws, len(probs), dtype=torch.bool),
        min_new=torch.zeros(draws, dtype=torch.long),
        max_new=torch.ones(draws, dtype=torch.long),
        temperature=temperature,
        top_p=top_p,
    )
    torch.manual_seed(0)
    Engine._choose(logits, state)
    return state.tokens


def draw(probs: list[float], temperature: float, top_p: float, draws: int = 4000) -> list[float]:
    """The share of each token among `draws` picks."""
    tokens = chosen_tokens(probs, temperature, top_p, draws)
    return (torch.bincount(tokens, minlength=len(probs)).float() / draws).tolist()


@pytest.mark.parametrize(
    ("temperature", "top_p", "expected"),
    [
        (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
        (0.5, 1.0, [0.25 / 0.365, 0.09 / 0.365, 0.0225 / 0.365, 0.0025 / 0.365]),  # p^(1/T), renormalized
        (2.0, 1.0, [p**0.5 / sum(q**0.5 for q in (0.5, 0.3, 0.15, 0.05)) for p in (0.5, 0.3, 0.15, 0.05)]),
        (1.0, 0.7, [0.625, 0.375, 0.0, 0.0]),  # the nucleus {0, 1}, renormalized
    ],
)
def test_sampling_draws_from_the_tempered_nucleus(temperature, top_p, expected):
    """Not only which tokens may come out: how often. 4000 draws put each share within 0.03 (about 4
    standard deviations) of its probability; a uniform draw over the nucleus or an ignored temperature fails."""
    shares = draw([0.5, 0.3, 0.15, 0.05], temperature, top_p)
    assert all(abs(got - want) < 0.03 for got, want in zip(shares, expected, strict=True)), (shares, expected)


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    tokens = chosen_tokens([0.5, 0.3, 0.15, 0.05], 1.0, 0.7, 300)
    assert set(tokens.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: tokens 2 and 3 are cut


def test_min_new_tokens_refuses_stop_tokens_until_reached(tiny):
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, Full(), spec)
    first = engine.generate(PROMPT, 1).token_ids[0]
    assert engine.generate(PROMPT, 5, stop_ids=[first]).token_ids == [first]  # stops at once
    forced = engine.generate(PROMPT, 5, stop_ids=[first], min_new_tokens=1).token_ids
    assert forced[0] != first and len(forced) >= 2


@pytest.mark.parametrize(("engine", "ran"), [("eager", "eager"), ("graph", "eager"), ("compiled", "compiled")])
def test_a_measurement_names_the_engine_that_ran(tiny, engine, ran):
    """On CPU `graph` has no graph to capture and runs the eager step: records say eager (`path`)."""
    model, tokenizer, spec = tiny
    assert Engine(model, tokenizer, Full(), spec, engine=engine).generate(PROMPT, 3).measurement.engine == ran


@pytest.mark.parametrize("scope", ["step", "layer"])
@pytest.mark.parametrize("name", method_names())
def test_compiled_step_is_one_graph_with_the_eager_tokens(tiny, name, scope):
    """The decode step (or, `compile_scope="layer"`, each decoder layer) traces whole (fullgraph) and is
    never retraced while the cache fills, evicts and recalls: shapes stay fixed and no step depends on a host
    value, except the variant the host picks for each step (a quantized window flushes or not): one
    compiled version per variant (and, in layer scope, per kind of layer: every decoder layer reaches its
    cache layer as the cache's `active` one, so layers alike share one trace). Its tokens are the eager
    path's."""
    model, tokenizer, spec = tiny
    method = small_budget_method(name)
    prompt = list(range(100, 340))
    expected = Engine(model, tokenizer, method, spec, prefill_chunk=64).generate(prompt, 40).token_ids
    compiled = Engine(model, tokenizer, method, spec, prefill_chunk=64, engine="compiled", compile_scope=scope)
    graphs = []

    def tracing_only(gm: torch.fx.GraphModule, example_inputs) -> object:
        graphs.append(gm)  # dynamo's tracing alone: what breaks a graph breaks here
        return gm.forward

    compiled.compile_options = {"backend": tracing_only}
    torch._dynamo.reset()
    got = compiled.generate(prompt, 40)
    assert got.token_ids == expected
    cache = compiled.new_cache(len(prompt), 40)
    variants = len(cache.decode_variants() or [None])
    # Per kind of layer, its own versions: layers a method exempts (ArkVale's first two) are another kind,
    # with one; CLA's consumers are another kind than their producers.
    kinds = {(type(layer), variant) for layer in cache.layers for variant in layer.decode_variants() or [None]}
    # Layer scope: and one graph each for the final norm and the token choice, compiled apart
    assert len(graphs) == (len(kinds) + 2 if scope == "layer" else variants)
    # the first token comes from the prefill, then one warm-up step per compiled version, untimed
    assert got.measurement.engine == "compiled" and got.measurement.decode_steps == 40 - 1 - variants


@pytest.mark.parametrize("name", method_names())
def test_inductor_compiled_step_gives_the_eager_tokens(tiny, name):
    """The test above traces with dynamo only; this one runs Inductor's generated code (layer scope, as
    sweeps run it, each version of the step compiled) for every method: its greedy tokens are the eager
    path's. (A CUDA graph's capture and replay need a GPU: `benchmarks/check_gpu.py --checks engines`.)"""
    model, tokenizer, spec = tiny
    method = small_budget_method(name)
    prompt = list(range(100, 340))
    expected = Engine(model, tokenizer, method, spec, prefill_chunk=64).generate(prompt, 24).token_ids
    torch._dynamo.reset()
    got = Engine(model, tokenizer, method, spec, prefill_chunk=64, engine="compiled").generate(prompt, 24)
    assert got.measurement.engine == "compiled" and got.measurement.compile_s > 0
    assert got.token_ids == expected


def test_layer_scope_compiles_only_decode_and_restores_the_layers(tiny):
    """`compile_scope="layer"` swaps each decoder layer's forward (and the final norm's, and the engine's
    token choice) for its compiled one during decode only: prefill runs eagerly (no compile per chunk
    shape), and the modules and the engine are plain again afterwards."""
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, Full(), spec, prefill_chunk=64, engine="compiled", compile_scope="layer")
    shapes = []

    def tracing_only(gm: torch.fx.GraphModule, example_inputs) -> object:
        shapes.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return gm.forward

    engine.compile_options = {"backend": tracing_only}
    torch._dynamo.reset()
    engine.generate(list(range(100, 300)), 6)
    # decode steps only (the 4 prefill chunks compiled nothing): one graph for every decoder layer (each
    # reaches its cache layer as the cache's `active` one), the final norm's and the token choice's
    assert len(shapes) == 1 + 2
    assert all("forward" not in vars(layer) for layer in model.get_decoder().layers)
    assert "forward" not in vars(model.get_decoder().norm) and "_choose" not in vars(engine)


def test_inductor_options_are_checked_before_any_compile_and_merged(tiny) -> None:
    """Experiments pass Inductor config values (speed.py --inductor-option KEY=VALUE): a key Inductor does not
    have, or a value of another type, is refused with the key named; good ones reach torch.compile's options,
    with a mode's (torch.compile refuses a mode with options) or options of one's own, and never a test's
    own backend."""
    model, tokenizer, spec = tiny
    assert parse_inductor_options(["combo_kernels=1", "max_autotune=false"]) == {
        "combo_kernels": True,
        "max_autotune": False,
    }
    with pytest.raises(ValueError, match="'no_such_key=1'"):
        parse_inductor_options(["no_such_key=1"])
    with pytest.raises(ValueError, match="'no_such_key' is not an Inductor config key"):
        Engine(model, tokenizer, Full(), spec, engine="compiled", inductor_options={"no_such_key": 1})
    with pytest.raises(ValueError, match="combo_kernels=1 must be a bool"):
        Engine(model, tokenizer, Full(), spec, engine="compiled", inductor_options={"combo_kernels": 1})
    with pytest.raises(ValueError, match="only for engine=compiled"):
        Engine(model, tokenizer, Full(), spec, inductor_options={"combo_kernels": True})
    assert Engine(model, tokenizer, Full(), spec, engine="compiled")._compile_kwargs() == {}
    engine = Engine(model, tokenizer, Full(), spec, engine="compiled", inductor_options={"combo_kernels": True})
    assert engine._compile_kwargs() == {"options": {"combo_kernels": True}}
    # profile_step's autotuning asks for a mode: its options come along, and ours go on top of given ones.
    engine.compile_options = {"mode": "max-autotune-no-cudagraphs"}
    assert engine._compile_kwargs() == {
        "options": {"max_autotune": True, "coordinate_descent_tuning": True, "combo_kernels": True}
    }
    engine.compile_options = {"options": {"combo_kernels": False, "max_autotune": True}}
    assert engine._compile_kwargs() == {"options": {"combo_kernels": True, "max_autotune": True}}
    engine.compile_options = {"backend": "eager"}
    assert engine._compile_kwargs() == {"backend": "eager"}


@pytest.mark.parametrize("name", method_names())
def test_batch_of_different_lengths_gives_each_sequence_its_own_tokens(tiny, name):
    """Sequences of different prompt lengths decoded together: each selection is per sequence, so every
    sequence gets the tokens it gets alone (and the batch's padding slots are never attended)."""
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, small_budget_method(name), spec, prefill_chunk=64)
    prompts = [list(range(100, 340)), list(range(500, 590)), list(range(700, 901))]
    alone = [engine.generate(p, 10, question_ids=[5, 6, 7] if i == 2 else ()).token_ids for i, p in enumerate(prompts)]
    requests = [Request(p, 10, question_ids=[5, 6, 7] if i == 2 else ()) for i, p in enumerate(prompts)]
    together = engine.generate_batch(requests)
    assert [g.token_ids for g in together] == alone
    assert {g.measurement.batch_size for g in together} == {3}
    assert sum(g.measurement.decode_tokens for g in together) == 3 * 9


@pytest.mark.parametrize("name", ["full", "snapkv", "kivi", "zipcache", "arkvale"])
def test_identical_requests_are_prefilled_once_and_decode_as_if_alone(tiny, name, monkeypatch):
    """A batch's identical requests (prompt and question) share one prefill, and each copy decodes as that
    request does alone; a request with the same prompt but its own question is prefilled on its own."""
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, small_budget_method(name), spec, prefill_chunk=64)
    shared, other = list(range(100, 340)), list(range(500, 590))
    requests = [Request(shared, 8), Request(other, 8), Request(shared, 8, question_ids=[5, 6]), Request(shared, 8)]
    alone = [engine.generate(r.prompt_ids, 8, question_ids=r.question_ids).token_ids for r in requests]
    prefills = []
    prefill_one = engine._prefill_one
    monkeypatch.setattr(engine, "_prefill_one", lambda *args: prefills.append(args[0]) or prefill_one(*args))
    together = engine.generate_batch(requests)
    assert [g.token_ids for g in together] == alone
    assert len(prefills) == 3
    assert [g.measurement.prefill_shared for g in together] == [False, False, False, True]
    assert together[3].measurement.prefill_s == 0 and together[3].measurement.prompt_tokens == len(shared)


@pytest.mark.parametrize("name", ["full", "kivi", "arkvale"])
def test_shared_prefills_are_independent_caches_when_sampling(tiny, name, monkeypatch):
    """Sampled, two copies of one request draw different tokens and write different decode tokens into
    their caches: with the prefill shared they give what two separate prefills give (no copy aliases
    the other's tensors)."""
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, small_budget_method(name), spec, prefill_chunk=64)
    requests = [Request(list(range(100, 340)), 12, sampling=Sampling(temperature=1.5, seed=3))] * 2
    shared = [g.token_ids for g in engine.generate_batch(requests)]
    keys = iter(range(len(requests)))
    monkeypatch.setattr(Engine, "_prefill_key", staticmethod(lambda request: next(keys)))
    separate = engine.generate_batch(requests)
    assert not any(g.measurement.prefill_shared for g in separate)
    assert shared == [g.token_ids for g in separate]
    assert shared[0] != shared[1]  # the copies did decode differently


def small_budget_method(name: str):
    method = build(compose_config(f"method={name}")).method
    names = {f.name for f in dataclasses.fields(method)}
    changes = {key: value for key, value in (("budget", 64), ("page_size", 8)) if key in names}
    return dataclasses.replace(method, **changes)


@pytest.mark.parametrize("name", ["full", "streamingllm", "arkvale"])
def test_compiled_step_writes_the_cache_in_place(tiny, name):
    """Under torch.compile a cache write must stay in place: inductor turns `index_put_` back into an
    in-place write but not `scatter_` or a slice assignment, whose step then copies the whole buffer
    (3x slower at 32k on an H100). Read off inductor's generated CPU code: no loop over a whole buffer."""
    model, tokenizer, spec = tiny
    method = small_budget_method(name) if name != "full" else Full()
    if name != "full":
        method = dataclasses.replace(method, budget=256)
    engine = Engine(model, tokenizer, method, spec, prefill_chunk=256, engine="compiled")
    prompt = list(range(100, 1100))
    torch._dynamo.reset()
    _, sources = run_and_get_code(engine.generate, prompt, 4)
    layer = engine.new_cache(len(prompt), 4).layers[-1]
    buffer_numel = spec.num_kv_heads * layer.slots * spec.head_dim  # one layer's keys (or values), batch 1
    code = "\n".join(sources)
    assert code, "inductor produced no code"
    assert f"<static_cast<int64_t>({buffer_numel}L)" not in code


@pytest.mark.parametrize(("name", "bits"), [("rtn", 4), ("quarot", 4), ("quarot", 2)])
def test_compiled_step_quantizes_into_the_stores_in_place(tiny, name, bits):
    """The decode token's codes and parameters are written by one operator that mutates the stores
    (`token_quant.quantize_tokens_into`, at 4 and 2 bits); under torch.compile that mutation must be
    reinplaced, not turned into a copy of each store per step. Read off inductor's generated CPU code."""
    model, tokenizer, spec = tiny
    method = build(compose_config(f"method={name}", f"method.bits={bits}")).method
    engine = Engine(model, tokenizer, method, spec, prefill_chunk=256, engine="compiled")
    prompt = list(range(100, 1100))
    torch._dynamo.reset()
    _, sources = run_and_get_code(engine.generate, prompt, 4)
    layer = engine.new_cache(len(prompt), 4).layers[-1]
    assert layer.one_launch_tokens and not layer.ring  # the path under test
    code = "\n".join(sources)
    assert "kvbench.quantize_tokens_into" in code
    width, groups = spec.head_dim * bits // 8, spec.head_dim // layer.key_spec.group  # codes, per-token groups
    for row in (width, groups):  # a store's codes, its scales or zero-points: one layer's, batch 1
        assert f"<static_cast<int64_t>({spec.num_kv_heads * layer.slots * row}L)" not in code, row


@pytest.mark.parametrize("vocab", [1, 7, 127, 128, 129, 1000, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_argmax_is_argmax(vocab, dtype):
    """The greedy choice's two-pass argmax picks torch.argmax's token: the first maximum under heavy ties
    (scores from three values), in rows whose every score is negative or -inf (the padding must not win),
    with a NaN, at vocabularies that do and do not fill the chunks."""
    generator = torch.Generator().manual_seed(vocab)
    scores = torch.randint(-3, 0, (5, vocab), generator=generator).to(dtype)
    scores[0] = float("-inf")  # every token blocked
    scores[1] = -1.0  # one tie across the whole row: token 0
    scores[2, vocab // 2] = float("nan")
    assert torch.equal(first_argmax(scores), scores.argmax(dim=-1))
    assert torch.equal(first_argmax(scores, chunks=3), scores.argmax(dim=-1))


def test_two_pass_argmax_compiled_is_argmax():
    """As Inductor compiles it (every compiled step does): its fused max-with-index keeps the first maximum
    under ties too, and -inf rows and NaN give torch.argmax's token."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 0, (4, 1000), generator=generator).float()
    scores[0] = float("-inf")
    scores[1] = -1.0
    scores[2, 500] = float("nan")
    torch._dynamo.reset()
    compiled = torch.compile(first_argmax, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(scores), scores.argmax(dim=-1))

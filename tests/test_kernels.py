"""kvbench.kernels: the Triton decode kernels against the PyTorch references, and their torch.compile wrapping.

The Triton kernels run on CPU tensors under Triton's interpreter, which reads `TRITON_INTERPRET` when
`triton` is first imported; this pytest process may have imported it already (and the other tests want
compiled Triton), so the interpreter checks run in one subprocess: this file run as a script, with
`TRITON_INTERPRET=1`, prints a JSON dict of measurements per case that the tests below assert on.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from kvbench import kernels
from kvbench.hadamard import hadamard_matrix
from tests.conftest import compile_for_hopper, run_under_triton_interpreter, spill_operations

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-2}
LSE_TOLERANCE = 1e-4  # the logits are float32 math whatever the input dtype
# Prefill scores: float32 sums of probabilities from exact products of the inputs (16-bit inputs' products are
# exact in float32), so only the order of additions differs from the reference (~1e-7 measured); a causal
# mask one key off moved the bfloat16 case by 2e-2.
PREFILL_TOLERANCE = 1e-4

# name: (batch, kv heads, group, slots, head dim, value dim, dtype, positions dtype). Under the interpreter
# `_num_sms` is 4, so these cover one split per program, several tiles per split, and many splits.
CASES = {
    "mha_fp32": (4, 4, 1, 200, 64, 64, "float32", "int64"),
    "gqa_bf16": (2, 2, 4, 1000, 128, 128, "bfloat16", "int64"),
    "gqa_fp16_odd_dims": (3, 1, 4, 333, 80, 48, "float16", "int32"),
    "gqa8_fp32_many_splits": (1, 1, 8, 777, 32, 32, "float32", "int64"),
}


def _case_inputs(name: str, seed: int) -> dict:
    """Random inputs whose masks hold every hard case: random empty slots, whole splits empty, and the
    last sequence with no live slot at all. The odd-dims case also has strided (non-contiguous) keys and
    stride-0 positions (one row of positions for every sequence and head)."""
    b, hkv, group, s, d, dv, dtype, pos_dtype = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    query = torch.randn(b, hkv * group, d, generator=gen).to(dt)
    if name == "gqa_fp16_odd_dims":
        keys = torch.randn(b, s, hkv, d, generator=gen).to(dt).transpose(1, 2)  # strided like a [B, S, H, D] cache
        positions = torch.arange(s).masked_fill(torch.rand(s, generator=gen) < 0.3, -1).to(getattr(torch, pos_dtype))
        positions = positions.expand(b, hkv, s)
    else:
        keys = torch.randn(b, hkv, s, d, generator=gen).to(dt)
        positions = torch.arange(s).repeat(b, hkv, 1)
        positions = positions.masked_fill(torch.rand(b, hkv, s, generator=gen) < 0.3, -1).to(getattr(torch, pos_dtype))
        num_splits, split_len = kernels._split_plan(b * hkv, s, 4)
        if num_splits > 2:
            positions[0, 0, split_len : 3 * split_len] = -1  # two whole splits empty
        if b > 1:
            positions[-1] = -1  # a sequence with no live slot
    values = (torch.randn(b, hkv, s, dv, generator=gen) * 2 + 0.5).to(dt)
    # Scale 1/sqrt(d) * 3 sharpens the softmax, so a wrong mask or head mapping moves the output a lot.
    return {"query": query, "keys": keys, "values": values, "positions": positions, "scale": 3 * d**-0.5}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


_torch_empty = torch.empty


def _poisoned_empty(*args, **kwargs) -> torch.Tensor:
    """torch.empty filled with NaN (or -7 for integers), so a kernel that skips a store shows up."""
    t = _torch_empty(*args, **kwargs)
    return t.fill_(float("nan") if t.is_floating_point() else -7)


def _measure(name: str) -> dict:
    x = _case_inputs(name, seed=len(name))
    args = (x["query"], x["keys"], x["values"], x["positions"], x["scale"])
    ref_out, ref_lse = kernels.decode_attention_reference(*args)
    out, lse = kernels.decode_attention(*args)
    received = kernels.received_attention(x["query"], x["keys"], x["positions"], x["scale"], lse)
    ref_received = kernels.received_attention_reference(x["query"], x["keys"], x["positions"], x["scale"], ref_lse)
    live = x["positions"] >= 0
    group = x["query"].shape[1] // x["keys"].shape[1]
    any_live = live.any(-1).repeat_interleave(group, dim=1)  # [B, Hq]
    finite = torch.isfinite(ref_lse)
    return {
        "dtype": str(out.dtype).removeprefix("torch."),
        "out_dtype_ok": out.dtype == x["query"].dtype and lse.dtype == torch.float32,
        "nan": bool(out.isnan().any() or lse.isnan().any() or received.isnan().any()),
        "out_rel": _rel(out[any_live], ref_out[any_live]),
        "lse_rel": _rel(lse[finite], ref_lse[finite]),
        "lse_inf_where_ref": bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))),
        "dead_rows": int((~any_live).sum()),
        "dead_out_zero": bool((out[~any_live] == 0).all()),
        "received_rel": _rel(received, ref_received),
        "received_empty_zero": bool((received[~live] == 0).all()),
        # each query head's probabilities sum to 1, so a KV head's received sums to G where any slot is live
        "received_sum_err": (received.sum(-1) - live.any(-1) * group).abs().max().item(),
        "splits": kernels._split_plan(x["keys"].shape[0] * x["keys"].shape[1], x["keys"].shape[2], 4)[0],
    }


# name: (case whose shapes and dtype it takes, live lengths: none, a tile boundary, one, odd).
# Sequences past the listed ones are full (length = slots).
LENGTH_CASES = {
    "gqa_bf16_lengths": ("gqa_bf16", [0, 64]),
    "gqa_fp16_lengths": ("gqa_fp16_odd_dims", [1, 100]),  # strided keys and lengths; the third sequence full
    "gqa8_fp32_lengths": ("gqa8_fp32_many_splits", [333]),
}


def _measure_lengths(name: str) -> dict:
    """Lengths [B] (a dense cache's slots below each length live) against the reference over the positions
    they stand for, and against the kernel given those positions."""
    case, lengths = LENGTH_CASES[name]
    x = _case_inputs(case, seed=7)
    lengths = torch.tensor(lengths[: x["keys"].shape[0]] + [x["keys"].shape[2]] * (x["keys"].shape[0] - len(lengths)))
    if name == "gqa_fp16_lengths":  # int32, a column of a wider tensor: the kernel reads the lengths' stride
        lengths = torch.stack([lengths, -lengths], dim=1).int()[:, 0]
    positions = kernels.as_positions(lengths, x["keys"])
    out, lse = kernels.decode_attention(x["query"], x["keys"], x["values"], lengths, x["scale"])
    by_positions = kernels.decode_attention(x["query"], x["keys"], x["values"], positions, x["scale"])
    ref_out, ref_lse = kernels.decode_attention_reference(x["query"], x["keys"], x["values"], positions, x["scale"])
    received = kernels.received_attention(x["query"], x["keys"], lengths, x["scale"], lse)
    ref_received = kernels.received_attention_reference(x["query"], x["keys"], positions, x["scale"], ref_lse)
    group = x["query"].shape[1] // x["keys"].shape[1]
    any_live = (lengths > 0).view(-1, 1).expand(-1, x["query"].shape[1])
    finite = torch.isfinite(ref_lse)
    return {
        "dtype": str(out.dtype).removeprefix("torch."),
        "lengths": lengths.tolist(),
        "out_rel": _rel(out[any_live], ref_out[any_live]),
        "lse_rel": _rel(lse[finite], ref_lse[finite]),
        "dead_out_zero": bool((out[~any_live] == 0).all()) and bool(torch.isneginf(lse[~any_live]).all()),
        "same_as_positions": torch.equal(out, by_positions[0]) and torch.equal(lse, by_positions[1]),
        "received_rel": _rel(received, ref_received),
        "received_sum_err": (received.sum(-1) - (lengths > 0).view(-1, 1) * group).abs().max().item(),
    }


# name: (sequences, query heads, splits, value dim, rotate). The combine reads every split's output in one
# load when they fit its register budget, else loops; a row's channels are split between programs (32 each)
# unless it rotates. 300 and 513 splits loop without a rotation (513: a short last pass, three chunks of 80
# channels); 34 and 70 loop with one; 48 channels leave a half-masked second chunk; 16 channels, one chunk.
COMBINE_CASES = {
    "combine_one_split": (1, 4, 1, 128, False),
    "combine_one_load": (2, 8, 66, 128, False),
    "combine_odd_channels": (3, 2, 17, 48, False),
    "combine_few_channels": (2, 2, 9, 16, False),
    "combine_looped": (2, 2, 300, 128, False),
    "combine_looped_three_chunks": (1, 3, 513, 80, False),
    "combine_rotated_one_load": (2, 4, 9, 128, True),
    "combine_rotated_looped": (2, 4, 34, 128, True),
    "combine_rotated_looped_more": (1, 4, 70, 64, True),
}
# Scaled per channel (ZipCache's channel scales, per sequence and KV head), (batch, query heads, splits,
# channels, rotated, KV heads): 4 query heads a KV head; 2 a head over a half-masked chunk; after a rotation;
# splits read in passes.
SCALED_COMBINE_CASES = {
    "combine_scaled_one_load": (2, 8, 66, 128, False, 2),
    "combine_scaled_odd_channels": (3, 2, 17, 48, False, 1),
    "combine_scaled_rotated": (2, 4, 9, 128, True, 2),
    "combine_scaled_looped": (1, 4, 300, 128, False, 2),
}


def _measure_combine(name: str) -> dict:
    """The combine kernel alone, on random partials (every split of one row empty, more splits empty at
    random), against the same combine written in PyTorch: outputs weighted by exp2(lse2 - logsumexp2). Its
    outputs go to a view of a wider NaN buffer and its lse to a buffer one float longer, so a write outside
    a program's own channels or rows shows as a padding value changed (the interpreter runs the programs in
    order, so a later program would overwrite an earlier one's stray write inside the outputs)."""
    b, hq, splits, dv, rotate, *scaled = COMBINE_CASES.get(name) or SCALED_COMBINE_CASES[name]
    gen = torch.Generator().manual_seed(splits)
    o_part = torch.randn(b * hq, splits, dv, generator=gen)
    lse_part = torch.randn(b * hq, splits, generator=gen) * 4
    lse_part[torch.rand(b * hq, splits, generator=gen) < 0.3] = float("-inf")
    lse_part[-1] = float("-inf")  # a row with no live slot in any split
    o_part[torch.isneginf(lse_part)] = 0.0  # what the split kernels store for an empty split
    rotation = hadamard_matrix(dv, torch.int8, normalized=False) if rotate else None
    out_buffer = torch.full((b, hq, dv + 32), float("nan"))
    lse_buffer = torch.full((b * hq + 1,), float("nan"))
    # the scales [B, Hkv, Dv] as ZipCache holds them (float16, a view whose sequences and heads are strided)
    out_scale = (torch.rand(b, scaled[0], 3, dv, generator=gen) + 0.5).half()[:, :, 1] if scaled else None
    kernels._launch_combine(o_part, lse_part, out_buffer[..., :dv], lse_buffer, rotation, out_scale)
    out, lse = out_buffer[..., :dv].reshape(b * hq, dv), lse_buffer[:-1]
    weights = torch.softmax(lse_part * math.log(2), dim=1).nan_to_num(0.0)  # log2 units; NaN where all -inf
    want = (weights[:, :, None] * o_part).sum(1)
    if rotate:
        want = want @ rotation.float() * dv**-0.5
    if scaled:  # query head h takes KV head h // (hq / Hkv)'s scales
        want = want * out_scale.float().repeat_interleave(hq // scaled[0], dim=1).reshape(b * hq, dv)
    want_lse = torch.logsumexp(lse_part * math.log(2), dim=1)
    return {
        "out_err": (out - want).abs().max().item(),
        "lse_err": (lse - want_lse).nan_to_num(0.0).abs().max().item(),
        "lse_inf_where_ref": bool(torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))),
        "dead_out_zero": bool((out[-1] == 0).all()),
        "padding_untouched": bool(out_buffer[..., dv:].isnan().all() and lse_buffer[-1].isnan()),
    }


# name: (batch, kv heads, group, queries, keys, head dim, dtype). Tiles of 128 (query, head) rows and 64 keys
# (`kernels.PREFILL_ROWS`, `PREFILL_KEYS`): no count is a multiple of a tile; every case has a row tile that
# reads key tiles both unmasked and masked, and the first two have key tiles that skip the row tiles before
# their first query. One query is 4 rows of a 128-row tile; 3 heads a query put a query's rows across tiles.
PREFILL_CASES = {
    "prefill_first_chunk_fp32": (2, 2, 4, 100, 100, 64, "float32"),  # the first chunk: S == T
    "prefill_later_chunk_bf16": (2, 2, 4, 70, 230, 128, "bfloat16"),  # keys before the chunk, a tile not aligned
    "prefill_one_query_fp16": (2, 2, 4, 1, 77, 64, "float16"),
    "prefill_group3_strided_fp16": (1, 2, 3, 45, 150, 80, "float16"),  # 3 heads a row's query; head dim padded
}


def _measure_prefill(name: str) -> dict:
    """The two prefill kernels against the reference. The strided case takes its query and keys as
    transformers' projections give them (views of [B, T, H, D])."""
    b, hkv, group, t, s, d, dtype = PREFILL_CASES[name]
    gen = torch.Generator().manual_seed(t)
    dt = getattr(torch, dtype)
    if name == "prefill_group3_strided_fp16":
        query = torch.randn(b, t, hkv * group, d, generator=gen).to(dt).transpose(1, 2)
        keys = torch.randn(b, s, hkv, d, generator=gen).to(dt).transpose(1, 2)
    else:
        query = torch.randn(b, hkv * group, t, d, generator=gen).to(dt)
        keys = torch.randn(b, hkv, s, d, generator=gen).to(dt)
    scale = 3 * d**-0.5  # sharpened, as `_case_inputs`: a key off by one moves the sums a lot
    received = kernels.received_attention_prefill(query, keys, scale)
    ref = kernels.received_attention_prefill_reference(query, keys, scale)
    return {
        "dtype": dtype,
        "out_ok": received.dtype == torch.float32 and received.shape == ref.shape,
        "nan": bool(received.isnan().any()),
        "received_rel": _rel(received, ref),
        # each query's probabilities sum to 1 over the keys it sees, so a KV head's sums add up to G * T
        "received_sum_rel": ((received.sum(-1) - group * t).abs().max() / (group * t)).item(),
    }


def _worker() -> None:
    assert kernels._INTERPRETED, "run with TRITON_INTERPRET=1"
    torch.empty = _poisoned_empty  # every buffer the kernels allocate, outputs and split partials alike
    measured = {name: _measure(name) for name in CASES}
    measured |= {name: _measure_lengths(name) for name in LENGTH_CASES}
    measured |= {name: _measure_prefill(name) for name in PREFILL_CASES}
    combined = {name: _measure_combine(name) for name in [*COMBINE_CASES, *SCALED_COMBINE_CASES]}
    print(json.dumps(measured | combined))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


@pytest.mark.parametrize("name", list(CASES))
def test_decode_attention_matches_reference(interpreted: dict, name: str) -> None:
    m = interpreted[name]
    assert m["out_dtype_ok"]
    assert not m["nan"]
    assert m["out_rel"] < TOLERANCE[m["dtype"]], m
    assert m["lse_rel"] < LSE_TOLERANCE, m


def test_cases_cover_the_hard_paths(interpreted: dict) -> None:
    measured = [interpreted[name] for name in CASES]
    assert min(m["splits"] for m in measured) == 1
    assert max(m["splits"] for m in measured) > 4
    assert sum(m["dead_rows"] for m in measured) > 0


@pytest.mark.parametrize("name", list(LENGTH_CASES))
def test_lengths_attend_to_the_slots_below_them(interpreted: dict, name: str) -> None:
    """A dense cache passes each sequence's length instead of positions: the kernel reads no positions and
    skips the tiles past the length, with the same result as the positions the lengths stand for."""
    m = interpreted[name]
    assert m["out_rel"] < TOLERANCE[m["dtype"]] and m["lse_rel"] < LSE_TOLERANCE, m
    assert m["dead_out_zero"] and m["same_as_positions"], m
    assert m["received_rel"] < TOLERANCE[m["dtype"]] and m["received_sum_err"] < 1e-3, m


def test_lengths_on_the_pytorch_path_equal_their_positions() -> None:
    """CPU decode attention (SDPA with a mask) and the references take lengths as the positions they stand for."""
    from kvbench.attention import decode_attention

    x = _case_inputs("gqa_bf16", seed=4)
    lengths = torch.tensor([0, 701])
    positions = kernels.as_positions(lengths, x["keys"])
    assert positions[1, 1, 700] == 700 and positions[1, 1, 701] == -1 and (positions[0] == -1).all()
    args = (x["query"], x["keys"], x["values"])
    got = decode_attention(*args, lengths, x["scale"], with_received=True)
    want = decode_attention(*args, positions, x["scale"], with_received=True)
    # SDPA gives NaN for the sequence with no live slot, on both sides
    assert all(torch.allclose(g, w, rtol=0, atol=0, equal_nan=True) for g, w in zip(got, want, strict=True))
    if not kernels._INTERPRETED:  # the CPU operators run the references
        got = kernels.decode_attention(*args, lengths, x["scale"])
        want = kernels.decode_attention_reference(*args, positions, x["scale"])
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("name", [*COMBINE_CASES, *SCALED_COMBINE_CASES])
def test_combine_matches_the_pytorch_combine(interpreted: dict, name: str) -> None:
    m = interpreted[name]
    assert m["out_err"] < 1e-5 and m["lse_err"] < 1e-5, m
    assert m["lse_inf_where_ref"] and m["dead_out_zero"] and m["padding_untouched"], m


@pytest.mark.parametrize("shape", [(2, 2, 64), (1, 2, 128), (2, 3, 128), (2, 2, 64, 2)])
def test_combine_refuses_scales_of_another_shape(shape: tuple) -> None:
    """Scales [B, Hkv, Dv] with Hkv dividing the query heads: any other shape would be read out of bounds."""
    pytest.importorskip("triton")
    o_part, lse_part = torch.zeros(2 * 8, 5, 128), torch.zeros(2 * 8, 5)
    out, lse = torch.empty(2, 8, 128), torch.empty(2 * 8)
    with pytest.raises(ValueError, match="out_scale"):
        kernels._launch_combine(o_part, lse_part, out, lse, None, torch.ones(shape, dtype=torch.float16))


@pytest.mark.parametrize("name", list(CASES))
def test_no_live_slot_gives_zero_and_minus_inf(interpreted: dict, name: str) -> None:
    m = interpreted[name]
    assert m["lse_inf_where_ref"], m
    assert m["dead_out_zero"], m
    assert m["received_empty_zero"], m


@pytest.mark.parametrize("name", list(CASES))
def test_received_attention_matches_reference(interpreted: dict, name: str) -> None:
    m = interpreted[name]
    assert m["received_rel"] < TOLERANCE[m["dtype"]], m
    assert m["received_sum_err"] < 1e-3, m


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_received_attention_prefill_matches_reference(interpreted: dict, name: str) -> None:
    m = interpreted[name]
    assert m["out_ok"] and not m["nan"], m
    assert m["received_rel"] < PREFILL_TOLERANCE, m
    assert m["received_sum_rel"] < 1e-5, m


def test_received_attention_prefill_refuses_more_queries_than_keys() -> None:
    """The queries are the last T of the S positions: with T > S the first queries would see no key at all."""
    with pytest.raises(ValueError, match="does not fit"):
        kernels.received_attention_prefill(torch.randn(1, 4, 9, 16), torch.randn(1, 2, 8, 16), 0.25)


def test_cpu_ops_run_the_references() -> None:
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: CPU tensors go to the interpreted kernels")
    x = _case_inputs("gqa_bf16", seed=1)
    args = (x["query"], x["keys"], x["values"], x["positions"], x["scale"])
    out, lse = kernels.decode_attention(*args)
    ref_out, ref_lse = kernels.decode_attention_reference(*args)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    received = kernels.received_attention(x["query"], x["keys"], x["positions"], x["scale"], lse)
    ref = kernels.received_attention_reference(x["query"], x["keys"], x["positions"], x["scale"], ref_lse)
    assert torch.equal(received, ref)
    from kvbench.attention import received_attention_prefill

    query, keys = torch.randn(1, 8, 30, 128).bfloat16(), x["keys"][:1, :, :100]
    ref = kernels.received_attention_prefill_reference(query, keys, x["scale"])
    assert torch.equal(kernels.received_attention_prefill(query, keys, x["scale"]), ref)
    assert torch.equal(received_attention_prefill(query, keys, x["scale"]), ref)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_ops_compile_without_graph_breaks(backend: str) -> None:
    """fullgraph=True raises on any graph break; the graph holds each operator as one node."""
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: interpreted kernels cannot run on fake tensors")
    x = _case_inputs("gqa_bf16", seed=2)

    def step(query, keys, values, positions):
        out, lse = kernels.decode_attention(query, keys, values, positions, x["scale"])
        return out, kernels.received_attention(query, keys, positions, x["scale"], lse)

    seen: list[str] = []

    def counting(gm: torch.fx.GraphModule, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    inputs = (x["query"], x["keys"], x["values"], x["positions"])
    torch.compile(step, fullgraph=True, backend=counting)(*inputs)
    ops = [target.removesuffix(".default") for target in seen if target.startswith("kvbench.")]
    assert ops == ["kvbench.decode_attention", "kvbench.received_attention"], seen
    assert all(target.startswith("kvbench.") or "getitem" in target for target in seen), seen
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)(*inputs)
    for got, want in zip(compiled, step(*inputs), strict=True):
        assert torch.equal(got, want)


def test_triton_launches_trace_into_a_static_graph() -> None:
    """What Inductor sees on CUDA: the launch path traced with fake tensors (no data, so any host sync or
    data-dependent shape would fail) is three kernel launches on static grids and their allocations."""
    pytest.importorskip("triton")
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: interpreted kernels are not traceable")
    from torch.fx.experimental.proxy_tensor import make_fx

    x = _case_inputs("gqa_bf16", seed=3)

    def launch(query, keys, values, positions):
        out, lse = kernels._decode_attention_triton(query, keys, values, positions, x["scale"])
        return out, kernels._received_attention_triton(query, keys, positions, x["scale"], lse)

    gm = make_fx(launch, tracing_mode="fake")(x["query"], x["keys"], x["values"], x["positions"])
    targets = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count("triton_kernel_wrapper_mutation") == 3, targets
    assert set(targets) == {"triton_kernel_wrapper_mutation", "aten.empty.memory_format"}, targets
    # The dense layer's form, lengths [B]: the split kernel and its combine, nothing expanded to positions.
    lengths = torch.tensor([5, 900])
    gm = make_fx(lambda *a: kernels._decode_attention_triton(*a, x["scale"]), tracing_mode="fake")(
        x["query"], x["keys"], x["values"], lengths
    )
    targets = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count("triton_kernel_wrapper_mutation") == 2, targets
    assert set(targets) == {"triton_kernel_wrapper_mutation", "aten.empty.memory_format"}, targets
    # Prefill scoring: the log-sum-exp kernel and the column sums.
    query = torch.randn(2, 8, 40, 128).bfloat16()
    gm = make_fx(lambda *a: kernels._received_attention_prefill_triton(*a, x["scale"]), tracing_mode="fake")(
        query, x["keys"]
    )
    targets = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count("triton_kernel_wrapper_mutation") == 2, targets
    assert set(targets) == {"triton_kernel_wrapper_mutation", "aten.empty.memory_format"}, targets


@pytest.mark.parametrize(("dtype", "group"), [("bf16", 4), ("fp32", 1)])
def test_kernels_compile_for_hopper(dtype: str, group: int) -> None:
    precision = "ieee" if dtype == "fp32" else "tf32"
    blocks = {"BLOCK_N": kernels.BLOCK_N, "BLOCK_D": 128, "UPCAST": False, "PRECISION": precision, "HEAD_DIM": 128}
    tensors = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "pos_ptr": "*i64", "scale_log2": "fp32"}
    partials = {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32"}
    for prefix in (False, True):  # positions, or lengths
        compile_for_hopper(
            kernels._decode_split_kernel,
            tensors | partials | {"v_ptr": f"*{dtype}"},
            blocks | {"BLOCK_G": kernels._dot_block(group), "BLOCK_DV": 128, "VALUE_DIM": 128, "PREFIX": prefix},
            kernels.NUM_WARPS,
        )
    out_type = {"out_ptr": f"*{dtype}", "lse_ptr": "*fp32", "rotation_ptr": "*i8", "rotation_scale": "fp32"}
    out_type |= {"scale_ptr": "*fp16"}
    # The combine at the tile sizes it launches with: dense at batch 1 and 4 (66 and 17 splits a row on an
    # H100), many splits; rotating QuaRot's outputs back (`kvbench.plane_kernel`), at 34 and 67 splits (the
    # plane kernel's at batch 4 and 1, its window included); scaling ZipCache's channels back (at its pair
    # kernel's 63 splits at batch 4). None may spill: it is latency-bound.
    for splits, rotated, scaled in ((66, 0, 0), (17, 0, 0), (513, 0, 0), (34, 1, 0), (67, 1, 0), (63, 0, 1)):
        tiles = kernels._combine_blocks(splits, 128, rotated)
        compiled = compile_for_hopper(
            kernels._decode_combine_kernel,
            partials | out_type,
            tiles | {"ROTATE": bool(rotated), "SCALE": bool(scaled)},
            kernels.NUM_WARPS,
        )
        assert spill_operations(compiled) == 0, (splits, rotated, scaled, tiles)
    compile_for_hopper(
        kernels._received_kernel,
        tensors | {"lse_ptr": "*fp32", "out_ptr": "*fp32"},
        blocks | {"BLOCK_G": kernels._dot_block(group)},
        kernels.NUM_WARPS,
    )
    # The prefill kernels specialised as launched on transformers' query (a view of [B, T, Hq, D]) and keys:
    # innermost strides 1, the others multiples of 16, pointers aligned. With 16-bit inputs neither may spill;
    # float32's IEEE dots run on FMA units, not tensor cores, and spill (as `_received_kernel`'s do): correct,
    # slow, and not what a model runs.
    prefill = {"HEAD_DIM": 128, "BLOCK_M": kernels.PREFILL_ROWS, "BLOCK_N": kernels.PREFILL_KEYS, "BLOCK_D": 128}
    prefill |= {"UPCAST": False, "PRECISION": precision, "stride_qd": 1, "stride_kd": 1}
    strides = {"stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_ks"}
    for kernel, num_warps in (
        (kernels._prefill_lse_kernel, kernels.PREFILL_LSE_WARPS),
        (kernels._prefill_received_kernel, kernels.NUM_WARPS),
    ):
        aligned = tuple(name for name in kernel.arg_names if name.endswith("_ptr") or name in strides)
        compiled = compile_for_hopper(
            kernel, tensors | {"lse2_ptr": "*fp32", "out_ptr": "*fp32"}, prefill, num_warps, aligned
        )
        assert dtype == "fp32" or spill_operations(compiled) == 0, kernel


def test_without_triton_the_ops_are_the_references() -> None:
    """CPU-only installs have no Triton: the operators are plain custom ops over the references, and
    still compile without graph breaks."""
    script = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch
from kvbench import kernels
assert kernels.triton is None
q, k, v = torch.randn(2, 8, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
pos = torch.arange(40).repeat(2, 2, 1)
pos[1] = -1
def step(q, k, v, pos):
    out, lse = kernels.decode_attention(q, k, v, pos, 0.25)
    return out, lse, kernels.received_attention(q, k, pos, 0.25, lse)
want = (*kernels.decode_attention_reference(q, k, v, pos, 0.25),)
want += (kernels.received_attention_reference(q, k, pos, 0.25, want[1]),)
for got in (step(q, k, v, pos), torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, pos)):
    assert all(torch.equal(g, w) for g, w in zip(got, want)), got
q = torch.randn(2, 8, 10, 16)
want = kernels.received_attention_prefill_reference(q, k, 0.25)
assert torch.equal(kernels.received_attention_prefill(q, k, 0.25), want)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kernel_modules() -> dict[str, ModuleType]:
    """Every kvbench module that defines Triton kernels, by short name (found in the sources, so a new
    module is covered without being listed)."""
    package = Path(kernels.__file__).parent
    stems = sorted(p.stem for p in package.glob("*.py") if "@triton.jit" in p.read_text())
    return {stem: importlib.import_module(f"kvbench.{stem}") for stem in stems}


def test_kernels_call_jit_helpers_by_their_own_names() -> None:
    """Inductor compiles a kernel launched through `wrap_triton` from a copy of its source in which each jit
    function the kernel calls is defined under that function's own `def` name, and under no other (torch
    2.11's user-defined Triton kernel codegen). A helper called under an alias is undefined in that copy and
    the compile fails: seen on the H200, RTN-4's and ZipCache's compiled steps stopped with `InductorError:
    CompilationError` where their kernels called a helper of `kvbench.kernels` under an alias.
    The copy also defines a module global only if it is a `triton.constexpr_function`, an int, string, bool or
    constexpr (a float constant would be undefined too). The CPU suite never compiles that copy, so the rules
    are checked here, over every module with kernels."""
    pytest.importorskip("triton")
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted functions")
    import triton.language as tl
    from triton.runtime.jit import ConstexprFunction, JITFunction

    modules = kernel_modules()
    calls = []  # (kernel, name it calls, the called function's own name)
    uncopied = []  # globals the copy leaves undefined (defined: jit and constexpr functions, int, str, bool, constexpr)
    for module_name, module in modules.items():
        for value in vars(module).values():
            if not isinstance(value, (JITFunction, ConstexprFunction)):  # the copy walks both kinds' bodies
                continue
            for name in value.fn.__code__.co_names:
                if name not in value.fn.__globals__ or name == "tl":  # attributes; the copy imports `tl`
                    continue
                called = value.fn.__globals__[name]
                if isinstance(called, (JITFunction, ConstexprFunction)):
                    calls.append((f"{module_name}.{value.fn.__name__}", name, called.fn.__name__))
                elif not isinstance(called, (int, str, bool, tl.constexpr)):
                    uncopied.append((f"{module_name}.{value.fn.__name__}", name, type(called).__name__))
    assert {"kernels", "plane_kernel", "quant_kernels", "token_quant", "topk"} <= set(modules), sorted(modules)
    # The check reaches helpers shared across modules: both split kernels call kernels' softmax (the plane
    # kernels through their body, `_plane_split`), and the plane kernel calls quant_kernels' `_slot_rows`.
    split_kernels = ("quant_kernels._packed_split_kernel", "plane_kernel._plane_split")
    assert {k for k, _, own in calls if own == "_online_softmax"} >= set(split_kernels), calls
    assert ("plane_kernel._plane_split", "_slot_rows", "_slot_rows") in calls, calls
    assert ("plane_kernel._plane_codes", "_weighted_plane3", "_weighted_plane3") in calls, calls
    for kernel in ("plane_kernel._plane_split_kernel", "plane_kernel._plane_pair_kernel"):
        assert (kernel, "_plane_split", "_plane_split") in calls, calls
    assert [c for c in calls if c[1] != c[2]] == []
    assert uncopied == []


if __name__ == "__main__":
    _worker()

"""`kvbench.score_eviction.accumulate_and_evict`: its Triton kernel against the PyTorch reference (H2O's decode
step as it was written), bit for bit, under Triton's interpreter (in a subprocess: this file as a script with
`TRITON_INTERPRET=1`); the operator on CPU and inside torch.compile; H2O's compiled step; and the kernel
compiled for sm_90."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from kvbench import kernels, score_eviction
from kvbench.cache import batch_head_index
from kvbench.engine import Engine
from kvbench.methods.h2o import H2O
from tests.conftest import compile_for_hopper, run_under_triton_interpreter, spill_operations

Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]  # scores ... recent, capacity
CASES = (
    "h2o_shape",
    "ties",
    "tie_across_tiles",
    "all_protected",
    "received_below_capacity",
    "received_past_capacity",
    "padding_held",
    "int32_positions",
    "capacity_one",
)


def _held_positions(b: int, h: int, s: int, capacity: int, seen: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Every slot below capacity live with a distinct position below its sequence's `seen`, padding empty."""
    rows = [torch.randperm(int(seen[i]), generator=gen)[:capacity] for i in range(b) for _ in range(h)]
    positions = torch.full((b, h, s), -1)
    positions[:, :, :capacity] = torch.stack(rows).view(b, h, capacity)
    return positions


def make_case(name: str, gen: torch.Generator) -> Case:
    """One call's arguments. Rows of 1,088 slots and more take two or three of the kernel's 1,024-slot tiles."""
    if name == "h2o_shape":
        # Budget 2,048 as profiled (2,112 slots, capacity 2,049), recent 1,024, a `seen` per sequence; two rows
        # with empty slots (one at the last slot below capacity), which evict nothing.
        b, h, s, capacity, recent = 3, 2, 2112, 2049, 1024
        seen = torch.tensor([6000, 4000, 2500])
        positions = _held_positions(b, h, s, capacity, seen, gen)
        positions[0, 1, [5, 700, 2000]] = -1
        positions[2, 0, capacity - 1] = -1
        scores, received = torch.rand(b, h, s, generator=gen), torch.rand(b, h, s, generator=gen) * 0.01
        return scores, received, positions, seen, recent, capacity
    if name == "ties":
        # Scores and received of a few integers: exact sums, each row's minimum held by many slots.
        b, h, s, capacity = 2, 3, 1088, 1030
        seen = torch.tensor([3000, 1500])
        scores = torch.randint(0, 3, (b, h, s), generator=gen).float()
        received = torch.randint(0, 2, (b, h, s), generator=gen).float()
        return scores, received, _held_positions(b, h, s, capacity, seen, gen), seen, 64, capacity
    if name == "tie_across_tiles":
        # The minimum at slots 100 (tile 0, lane 100) and 1,030 (tile 1, lane 6): the lower slot wins, not the
        # lower lane; at 5 and 1,029 (one lane): the earlier. Then a minimum at the last slot below capacity
        # (2,048, alone in tile 2) with lower scores in the padding past it, and a row of one score. No slot is
        # recent (every position below seen - recent).
        b, h, s, capacity, recent = 2, 2, 2112, 2049, 16
        seen = torch.tensor([9000, 9000])
        positions = _held_positions(b, h, s, capacity, seen, gen)
        scores = torch.full((b, h, s), 5.0)
        scores[0, 0, [100, 1030]] = 1.0
        scores[0, 1, [5, 1029]] = 1.0
        scores[0, 1, 2100] = 0.5
        scores[1, 0, 2048] = 1.0
        scores[1, 0, 2049:] = 0.5
        return scores, torch.zeros(b, h, s), positions, seen + recent, recent, capacity
    if name == "all_protected":
        # recent covers every position: all +inf, so slot 0 (emptied where the row is full); one row with an
        # empty slot, one with no live slot at all.
        b, h, s, capacity = 2, 2, 64, 40
        seen = torch.tensor([50, 45])
        positions = _held_positions(b, h, s, capacity, seen, gen)
        positions[0, 1, 17] = -1
        positions[1, 1] = -1
        return torch.rand(b, h, s, generator=gen), torch.rand(b, h, s, generator=gen), positions, seen, 100, capacity
    if name in ("received_below_capacity", "received_past_capacity"):
        b, h, s, capacity = 2, 2, 1088, 1030
        received_len = 700 if name == "received_below_capacity" else 1060
        seen = torch.tensor([4000, 2000])
        scores, received = torch.rand(b, h, s, generator=gen), torch.rand(b, h, received_len, generator=gen)
        return scores, received, _held_positions(b, h, s, capacity, seen, gen), seen, 32, capacity
    if name == "padding_held":
        # Padding slots holding old live positions and the lowest scores: neither victims nor counted.
        b, h, s, capacity = 2, 2, 128, 70
        seen = torch.tensor([500, 400])
        positions = _held_positions(b, h, s, capacity, seen, gen)
        positions[:, :, capacity:] = torch.arange(s - capacity)
        positions[1, 0, 3] = -1
        scores = torch.rand(b, h, s, generator=gen)
        scores[:, :, capacity:] = -1.0
        return scores, torch.rand(b, h, s, generator=gen), positions, seen, 8, capacity
    if name == "int32_positions":
        # int32 positions, and `seen` a strided view (every other element of a longer tensor).
        b, h, s, capacity = 3, 2, 192, 129
        seen = torch.tensor([400, -1, 300, -1, 200, -1])[::2]
        positions = _held_positions(b, h, s, capacity, seen, gen).int()
        positions[1, 1, 0] = -1
        return torch.rand(b, h, s, generator=gen), torch.rand(b, h, s, generator=gen), positions, seen, 16, capacity
    if name == "capacity_one":
        b, h, s = 2, 1, 64
        seen = torch.tensor([10, 10])
        positions = torch.full((b, h, s), -1)
        positions[0, 0, 0] = 3  # outside the window: evicted
        return torch.rand(b, h, s, generator=gen), torch.rand(b, h, s, generator=gen), positions, seen, 2, 1
    raise ValueError(name)


def _both(case: Case) -> dict:
    """`accumulate_and_evict` and the reference on copies of one case: equal scores, equal positions, and how
    many slots the reference emptied."""
    scores, received, positions, seen, recent, capacity = case
    got, want = (scores.clone(), positions.clone()), (scores.clone(), positions.clone())
    score_eviction.accumulate_and_evict(got[0], received, got[1], seen, recent, capacity)
    score_eviction.accumulate_and_evict_reference(want[0], received, want[1], seen, recent, capacity)
    return {
        "scores": torch.equal(got[0], want[0]),
        "positions": torch.equal(got[1], want[1]),
        "emptied": int(((want[1] < 0) & (positions >= 0)).sum()),
    }


def _layer_step(scores, received, positions, seen, slot, recent: int, capacity: int) -> None:
    """A decode step's writes to the buffers as `KVLayer._write_slot` and H2O's `on_write` make them, then the
    operation: the buffers mutated before and by it, as in the compiled step."""
    rows, heads = batch_head_index(slot)
    positions[rows, heads, slot] = seen.view(-1, 1).expand_as(slot)
    scores[rows, heads, slot] = scores.new_zeros(())
    seen.add_(1)
    score_eviction.accumulate_and_evict(scores, received, positions, seen, recent, capacity)


def _step_inputs(gen: torch.Generator) -> tuple:
    """A decode step's buffers from the h2o_shape case: each row's new token goes to its first empty slot."""
    scores, received, positions, seen, recent, capacity = make_case("h2o_shape", gen)
    slot = (positions[:, :, :capacity] < 0).int().argmax(dim=-1)
    return scores, received, positions, seen.clone(), slot, recent, capacity


def _compiled_step(backend: str, gen: torch.Generator) -> tuple[bool, str]:
    """Whether `_layer_step` compiled (fullgraph) leaves the buffers as eager does, and inductor's code."""
    inputs = _step_inputs(gen)
    eager, compiled = [_cloned(inputs) for _ in range(2)]
    _layer_step(*eager)
    torch._dynamo.reset()
    _, sources = run_and_get_code(torch.compile(_layer_step, fullgraph=True, backend=backend), *compiled)
    return all(torch.equal(a, b) for a, b in zip(eager[:4], compiled[:4], strict=True)), "\n".join(sources)


def _cloned(inputs: tuple) -> tuple:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def _offsets_past_int32() -> dict:
    """Scores and positions whose third sequence starts past 2^31 elements (batch x heads x slots passes it in
    large batches): int32 offsets wrap and read or write outside the buffers. Uninitialised memory, touched
    only where a row is, so about 17 GB of address space and little memory."""
    stride, h, s, capacity = 2**30 + 4096, 2, 128, 70
    gen = torch.Generator().manual_seed(3)
    scores_case, received, positions_case, seen, recent, _ = make_case("padding_held", gen)
    scores = torch.empty(2 * stride + h * s).as_strided((3, h, s), (stride, s, 1))
    positions = torch.empty(2 * stride + h * s, dtype=torch.int32).as_strided((3, h, s), (stride, s, 1))
    scores[2], positions[2] = scores_case[0], positions_case[0]
    want = scores[2:].clone(), positions[2:].clone()
    score_eviction.accumulate_and_evict_reference(want[0], received[:1], want[1], seen[:1], recent, capacity)
    scores[:2], positions[:2] = 0.0, -1  # no live slot: nothing to evict
    score_eviction.accumulate_and_evict(
        scores, received[:1].expand(3, h, s), positions, seen[:1].expand(3), recent, capacity
    )
    return {
        "scores": torch.equal(scores[2], want[0][0]),
        "positions": torch.equal(positions[2], want[1][0]),
        "others": bool((positions[:2] == -1).all()),
    }


def _interpreted_checks() -> dict:
    assert kernels._INTERPRETED, "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    checks = {name: _both(make_case(name, gen)) for name in CASES}
    checks["compiled"] = _compiled_step("aot_eager", gen)[0]
    checks["past_int32"] = _offsets_past_int32()
    return checks


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_the_reference_bit_for_bit(interpreted: dict, case: str) -> None:
    assert interpreted[case]["scores"] and interpreted[case]["positions"], interpreted[case]


def test_cases_evict_where_they_should(interpreted: dict) -> None:
    """Each case holds what it is named for: full rows evict one slot each, rows with an empty slot none."""
    emptied = {name: interpreted[name]["emptied"] for name in CASES}
    assert emptied == {
        "h2o_shape": 4,  # 6 rows, 2 with empty slots
        "ties": 6,
        "tie_across_tiles": 4,
        "all_protected": 2,  # slot 0 of the full rows of sequence 0 and 1
        "received_below_capacity": 4,
        "received_past_capacity": 4,
        "padding_held": 3,  # 4 rows, 1 with an empty slot
        "int32_positions": 5,
        "capacity_one": 1,  # the second sequence's only slot is empty
    }, emptied


def test_ties_go_to_the_first_slot_of_the_minimum() -> None:
    """What the tie cases assert through the reference, checked on the reference itself (torch.argmin's
    documented first occurrence): the slots `tie_across_tiles` must empty."""
    scores, received, positions, seen, recent, capacity = make_case(
        "tie_across_tiles", torch.Generator().manual_seed(0)
    )
    before = positions.clone()
    score_eviction.accumulate_and_evict_reference(scores, received, positions, seen, recent, capacity)
    emptied = (positions < 0) & (before >= 0)
    slots = emptied.view(4, -1).int().argmax(dim=-1).tolist()
    assert slots == [100, 5, 2048, 0], slots


def test_kernel_writes_past_int32_offsets(interpreted: dict) -> None:
    assert interpreted["past_int32"] == {"scores": True, "positions": True, "others": True}


def test_operator_inside_torch_compile_runs_the_kernel(interpreted: dict) -> None:
    """Compiled (fullgraph, aot_eager) under the interpreter: the opaque operator launches the kernel on the
    step's own buffers, after the slot writes that precede it."""
    assert interpreted["compiled"]


@pytest.mark.parametrize("case", CASES)
def test_cpu_operator_equals_the_reference(case: str) -> None:
    """On CPU without the interpreter the operator runs the reference: through the op's mutation, the same."""
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernel runs")
    checks = _both(make_case(case, torch.Generator().manual_seed(0)))
    assert checks["scores"] and checks["positions"], checks


def test_layouts_the_kernel_does_not_take_run_the_reference() -> None:
    """float16 scores, and positions whose slots are not adjacent: the reference's PyTorch ops, same result."""
    scores, received, positions, seen, recent, capacity = make_case("padding_held", torch.Generator().manual_seed(0))
    strided = torch.full((*positions.shape[:2], 2 * positions.shape[-1]), -5)[..., ::2]
    strided.copy_(positions)
    for scores_in, positions_in in ((scores.half(), positions), (scores, strided)):
        assert not score_eviction._kernel_takes(scores_in, received.to(scores_in.dtype), positions_in)
        want = scores_in.clone(), positions_in.clone()
        score_eviction.accumulate_and_evict_reference(
            want[0], received.to(scores_in.dtype), want[1], seen, recent, capacity
        )
        score_eviction.accumulate_and_evict(
            scores_in, received.to(scores_in.dtype), positions_in, seen, recent, capacity
        )
        assert torch.equal(scores_in, want[0]) and torch.equal(positions_in, want[1])


def _operator_buffers(code: str) -> list[tuple[str, str]]:
    """The (scores, positions) arguments of each operator call in inductor's generated code."""
    return re.findall(r"kvbench\.accumulate_and_evict\.default\((\w+), \w+, (\w+),", code)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_operator_compiles_in_one_graph_in_place(backend: str) -> None:
    """fullgraph=True raises on a graph break; compiled, the step leaves what eager leaves. The operator
    mutates its arguments: inductor must hand it the graph's inputs, not copies (a copy of scores and positions
    per layer per step would cost what the kernel saves)."""
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: interpreted kernels cannot run on fake tensors")
    equal, code = _compiled_step(backend, torch.Generator().manual_seed(1))
    assert equal
    if backend == "inductor":
        calls = _operator_buffers(code)
        assert len(calls) == 1 and not any(name.startswith("buf") for name in calls[0]), calls


def test_h2o_compiled_step_calls_the_operator_in_place(tiny) -> None:
    """H2O's decode step, compiled by inductor as sweeps run it, evicts through the operator on its layer's own
    buffers (its tokens equal the eager path's: tests/test_engine.py checks every method)."""
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, H2O(budget=64), spec, prefill_chunk=64, engine="compiled")
    torch._dynamo.reset()
    _, sources = run_and_get_code(engine.generate, list(range(100, 340)), 4)
    calls = _operator_buffers("\n".join(sources))
    assert calls and not any(name.startswith("buf") for call in calls for name in call), calls


def test_bad_shapes_are_refused() -> None:
    scores, received, positions, seen = (
        torch.zeros(2, 3, 64),
        torch.zeros(2, 3, 64),
        torch.zeros(2, 3, 64),
        torch.zeros(2),
    )
    positions, seen = positions.long(), seen.long()
    with pytest.raises(ValueError, match="capacity=65"):
        score_eviction.accumulate_and_evict(scores, received, positions, seen, 4, 65)
    with pytest.raises(ValueError, match="received"):
        score_eviction.accumulate_and_evict(scores, torch.zeros(2, 3, 65), positions, seen, 4, 10)
    with pytest.raises(ValueError, match="seen"):
        score_eviction.accumulate_and_evict(scores, received, positions, seen[:1], 4, 10)


@pytest.mark.parametrize("positions", ["i64", "i32"])
def test_kernel_compiles_for_hopper_without_spills(positions: str) -> None:
    """Lowered for sm_90 at its launch constants, its lengths and row strides marked as the launcher marks
    a slot buffer's (multiples of 64 slots): vector loads, and no spills."""
    kernel = score_eviction._accumulate_and_evict_kernel
    pointers = {"scores_ptr": "*fp32", "received_ptr": "*fp32", "positions_ptr": f"*{positions}", "seen_ptr": "*i64"}
    aligned = tuple(name for name in kernel.arg_names if name.endswith(("_ptr", "_sb", "_sh", "_len")))
    compiled = compile_for_hopper(
        kernel, pointers, {"BLOCK": score_eviction.BLOCK_SLOTS}, score_eviction.NUM_WARPS, aligned
    )
    assert spill_operations(compiled) == 0
    assert "ld.global.v4.b32" in compiled.asm["ptx"]  # the scores' loads: four slots an instruction


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))

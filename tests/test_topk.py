"""`kvbench.topk.largest_keys`: its Triton kernel against `torch.topk`, under Triton's interpreter (in a
subprocess: this file as a script with `TRITON_INTERPRET=1`), and compiled for sm_90."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvbench import kernels, topk
from methods.scissorhands import NOT_A_CANDIDATE, drop_key
from tests.conftest import compile_for_hopper, run_under_triton_interpreter


def _distinct_keys(rows: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """Keys spread over +-2^47, distinct within a row (a random permutation scaled and offset)."""
    spread = torch.stack([torch.randperm(s, generator=gen) for _ in range(rows)])
    return (spread - s // 2) * (2**47 // s) + torch.randint(0, 1000, (rows, 1), generator=gen)


def _scissorhands_keys(gen: torch.Generator) -> torch.Tensor:
    """Drop keys as Scissorhands builds them: counts over a 400-step window, unique positions, some slots
    recent or empty and so no candidates (NOT_A_CANDIDATE, all equal), more of them in each next row."""
    b, h, s = 1, 8, 2048
    counts = torch.randint(0, 401, (b, h, s), generator=gen)
    positions = torch.stack([torch.randperm(40000, generator=gen)[:s] for _ in range(b * h)]).view(b, h, s)
    excluded = torch.rand(b, h, s, generator=gen) < torch.linspace(0.1, 0.95, h).view(1, h, 1)  # last rows: < 512
    return drop_key(counts, positions).masked_fill(excluded, NOT_A_CANDIDATE)


def _interpreted_checks() -> dict:
    assert kernels._INTERPRETED, "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    checks = {}
    for name, keys, k in [
        ("distinct_300_75", _distinct_keys(6, 300, gen).view(2, 3, 300), 75),
        ("distinct_k_equals_s", _distinct_keys(2, 37, gen), 37),
        ("one_slot", _distinct_keys(3, 1, gen), 1),
        ("k_is_one", _distinct_keys(3, 50, gen), 1),  # Triton's top-k needs k >= 2: padded
        ("arkvale_pages", topk.float_order_keys(torch.randn(4, 1, 1026, generator=gen)), 30),
    ]:
        values, slots = topk.largest_keys(keys, k)
        ref_values, ref_slots = topk.largest_keys_reference(keys, k)
        checks[name] = {"values": torch.equal(values, ref_values), "slots": torch.equal(slots, ref_slots)}
    keys = _scissorhands_keys(gen)
    values, slots = topk.largest_keys(keys, 512)
    ref_values, ref_slots = topk.largest_keys_reference(keys, 512)
    victims = values > NOT_A_CANDIDATE  # the candidates' keys are distinct: the same slots, in order
    checks["scissorhands"] = {
        "values": torch.equal(values, ref_values),
        "slots": torch.equal(slots[victims], ref_slots[victims]),
        "victims": int(victims.sum()),
    }
    ties = torch.randint(-3, 3, (4, 100), generator=gen)
    values, slots = topk.largest_keys(ties, 30)
    ref_values, _ = topk.largest_keys_reference(ties, 30)
    checks["ties"] = {
        "values": torch.equal(values, ref_values),
        "slots": torch.equal(ties.gather(-1, slots), values) and all(len(set(row.tolist())) == 30 for row in slots),
    }
    return checks


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


@pytest.mark.parametrize(
    "case", ["distinct_300_75", "distinct_k_equals_s", "one_slot", "k_is_one", "arkvale_pages", "scissorhands", "ties"]
)
def test_kernel_matches_torch_topk(interpreted: dict, case: str) -> None:
    assert interpreted[case]["values"] and interpreted[case]["slots"], interpreted[case]


def test_scissorhands_case_has_victims_and_non_candidates(interpreted: dict) -> None:
    assert 0 < interpreted["scissorhands"]["victims"] < 8 * 512  # the last rows have fewer than 512 candidates


def test_float_order_keys_keep_the_floats_order() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.cat([torch.randn(500, generator=gen) * 10, torch.tensor([0.0, -0.0, float("inf"), -float("inf")])])
    scores = torch.cat([scores, -torch.rand(50, generator=gen) * 1e-30])  # tiny negatives near -0
    keys = topk.float_order_keys(scores)
    assert (scores[keys.argsort()].diff() >= 0).all()  # sorted by key, sorted by value (-0.0 just below 0.0)
    assert len(keys.unique()) == len(scores) and keys.abs().max() < 2**31
    assert torch.equal(topk.largest_keys(keys, 20)[1], scores.topk(20).indices)  # distinct values here


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="int64 keys"):
        topk.largest_keys(torch.zeros(2, 5), 2)
    with pytest.raises(ValueError, match="k=6"):
        topk.largest_keys(torch.zeros(2, 5, dtype=torch.int64), 6)


def test_kernel_compiles_for_hopper() -> None:
    pointers = {"keys_ptr": "*i64", "values_ptr": "*i64", "slots_ptr": "*i64"}
    compile_for_hopper(topk._largest_keys_kernel, pointers, {"BITS": 11, "S_PAD": 2048, "K_PAD": 512})


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))

"""`kvbench.cuboid_scores`: its Triton kernel against a float64 reference and against the einsum path,
under Triton's interpreter (in a subprocess: this file as a script with `TRITON_INTERPRET=1`), and compiled
for sm_90."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvbench import cuboid_scores as cs
from kvbench import kernels
from tests.conftest import compile_for_hopper, run_under_triton_interpreter


def _case(b: int, h: int, group: int, n: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    """A query of `group` heads per KV head and digests with upper >= lower."""
    query = torch.randn(b, h * group, d, generator=gen)
    upper = torch.randn(b, h, n, d, generator=gen)
    lower = upper - torch.rand(b, h, n, d, generator=gen) * 2
    return query.to(dtype), upper.to(dtype), lower.to(dtype)


def _exact(query, upper, lower) -> torch.Tensor:
    """Per KV head, the mean over its query heads of Σ_i max(q_i upper_i, q_i lower_i), in float64, from
    the query halves averaged in float32 and rounded to the digests' dtype as the products take them (with
    two query heads a KV head the float32 mean has one order of summation)."""
    b, hq, d = query.shape
    h = upper.shape[1]
    q = query.float().view(b, h, hq // h, d)
    positive = q.clamp(min=0).mean(dim=2).to(upper.dtype).double()
    negative = q.clamp(max=0).mean(dim=2).to(upper.dtype).double()
    # max(q u, q l) = q⁺ u + q⁻ l for u >= l, per channel; the halves carry the mean over query heads.
    return (positive.unsqueeze(2) * upper.double() + negative.unsqueeze(2) * lower.double()).sum(-1)


def _literal(query, upper, lower) -> torch.Tensor:
    """The paper's per-channel maximum for each query head, then the mean over a KV head's query heads."""
    b, hq, d = query.shape
    h = upper.shape[1]
    q = query.double().view(b, h, hq // h, 1, d)
    bound = torch.maximum(q * upper.double().unsqueeze(2), q * lower.double().unsqueeze(2)).sum(-1)
    return bound.mean(dim=2)


def _interpreted_checks() -> dict:
    assert kernels._INTERPRETED, "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    checks = {}
    # Pages not a multiple of the tile, a width not a power of two, a group of 3 (padded to 4): the masks matter.
    for name, shape, dtype in [
        ("fp32_75_pages_d20_group3", (2, 3, 3, 75, 20), torch.float32),
        ("bf16_70_pages_d128_group2", (2, 2, 2, 70, 128), torch.bfloat16),
        ("one_page_one_head", (1, 1, 1, 1, 16), torch.float32),
    ]:
        inputs = _case(*shape, dtype, gen)
        got = cs.cuboid_scores(*inputs)
        exact = _exact(*inputs)
        # The einsum path in float32 (in bfloat16 on a CPU it sums and returns bfloat16: no common bound).
        reference = cs.cuboid_scores_reference(*inputs).double() if dtype == torch.float32 else None
        scale = 1 + exact.abs().max().item()
        checks[name] = {
            "dtype": str(got.dtype),
            "shape": list(got.shape),
            "error_vs_exact": (got.double() - exact).abs().max().item() / scale,
            "error_vs_einsum": None if reference is None else (got.double() - reference).abs().max().item() / scale,
        }

    # A query that is a view with strides of its own (the decode step's last query of [B, Hq, T, D]), and
    # digests of unlike layouts (the kernel reads one set of strides for both, so they are made alike first).
    query, upper, lower = _case(2, 4, 2, 40, 32, torch.float32, gen)
    wide_query = torch.zeros(2, 8, 3, 32)
    wide_query[:, :, 1] = query
    wide_lower = torch.zeros(2, 4, 40, 64)
    wide_lower[..., :32] = lower
    got = cs.cuboid_scores(wide_query[:, :, 1], upper, wide_lower[..., :32])
    checks["views"] = {"error_vs_exact": (got.double() - _exact(query, upper, lower)).abs().max().item()}
    return checks


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


@pytest.mark.parametrize("case", ["fp32_75_pages_d20_group3", "bf16_70_pages_d128_group2", "one_page_one_head"])
def test_kernel_matches_the_per_channel_maximum(interpreted: dict, case: str) -> None:
    check = interpreted[case]
    assert check["dtype"] == "torch.float32"
    assert check["error_vs_exact"] < 1e-5, check  # float32 sums of the same inputs
    assert check["error_vs_einsum"] is None or check["error_vs_einsum"] < 1e-5, check


def test_kernel_reads_views(interpreted: dict) -> None:
    assert interpreted["views"]["error_vs_exact"] < 1e-4, interpreted["views"]


def test_compiles_in_one_graph() -> None:
    """As the decode step compiles it (fullgraph); on CPU the operator runs the einsum path."""
    inputs = _case(2, 4, 2, 40, 32, torch.float32, torch.Generator().manual_seed(3))
    step = torch.compile(cs.cuboid_scores, fullgraph=True, dynamic=False)
    assert torch.allclose(step(*inputs), cs.cuboid_scores(*inputs), atol=1e-5)


def test_reference_path_is_the_mean_of_each_query_heads_per_channel_maximum() -> None:
    inputs = _case(2, 3, 4, 9, 12, torch.float64, torch.Generator().manual_seed(1))
    assert torch.allclose(cs.cuboid_scores(*inputs).double(), _literal(*inputs), atol=1e-10)


def test_mismatched_shapes_are_refused() -> None:
    query, upper, lower = _case(1, 2, 2, 5, 8, torch.float32, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="digests"):
        cs.cuboid_scores(query, upper, lower[:, :1])
    with pytest.raises(ValueError, match="multiple"):
        cs.cuboid_scores(query[:, :3], upper, lower)
    with pytest.raises(ValueError, match="widths differ"):
        cs.cuboid_scores(query[..., :4], upper, lower)


def test_kernel_compiles_for_hopper() -> None:
    pointers = {name: "*bf16" for name in ("query", "upper", "lower")} | {"out": "*fp32"}
    constexprs = {"D": 128, "BLOCK_D": 128, "BLOCK_N": cs.BLOCK_PAGES, "BLOCK_G": 4}
    compile_for_hopper(cs._cuboid_scores_kernel, pointers, constexprs, num_warps=cs.WARPS)  # as launched


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))

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


def _case(b: int, h: int, n: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    query = torch.randn(b, h, d, generator=gen)
    upper = torch.randn(b, h, n, d, generator=gen)
    lower = upper - torch.rand(b, h, n, d, generator=gen) * 2
    positive, negative = query.clamp(min=0).to(dtype), query.clamp(max=0).to(dtype)
    return positive, negative, upper.to(dtype), lower.to(dtype)


def _exact(positive, negative, upper, lower) -> torch.Tensor:
    """Σ_i max(q_i upper_i, q_i lower_i) in float64, from the same (rounded) inputs."""
    q = (positive.double() + negative.double()).unsqueeze(2)
    return torch.maximum(q * upper.double(), q * lower.double()).sum(-1)


def _interpreted_checks() -> dict:
    assert kernels._INTERPRETED, "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    checks = {}
    # Pages not a multiple of the tile and a width not a power of two: both masks matter.
    for name, shape, dtype in [
        ("fp32_75_pages_d20", (2, 3, 75, 20), torch.float32),
        ("bf16_70_pages_d128", (2, 2, 70, 128), torch.bfloat16),
        ("one_page", (1, 1, 1, 16), torch.float32),
    ]:
        inputs = _case(*shape, dtype, gen)
        got = cs.cuboid_scores(*inputs)
        exact = _exact(*inputs)
        reference = cs.cuboid_scores_reference(*[t.float() for t in inputs])
        scale = 1 + exact.abs().max().item()
        checks[name] = {
            "dtype": str(got.dtype),
            "shape": list(got.shape),
            "error_vs_exact": (got.double() - exact).abs().max().item() / scale,
            "error_vs_einsum": (got - reference).abs().max().item() / scale,
        }

    # A query that is a view with strides of its own (the kernel reads rows of D contiguous values).
    positive, negative, upper, lower = _case(2, 4, 40, 32, torch.float32, gen)
    wide = torch.cat([positive, negative], dim=-1)
    got = cs.cuboid_scores(wide[..., :32], wide[..., 32:], upper, lower)
    error = (got.double() - _exact(positive, negative, upper, lower)).abs().max().item()
    checks["query_views"] = {"error_vs_exact": error}
    # Each input a layout of its own: the kernel reads one set of strides for the query halves, one for the
    # digests, so unlike layouts must be made alike first.
    positive, negative, upper, lower = _case(2, 3, 40, 16, torch.float32, gen)
    wide_lower = torch.zeros(2, 3, 40, 32)
    wide_lower[..., :16] = lower
    padded_negative = torch.zeros(2, 3, 32)
    padded_negative[..., :16] = negative
    got = cs.cuboid_scores(positive, padded_negative[..., :16], upper, wide_lower[..., :16])
    error = (got.double() - _exact(positive, negative, upper, lower)).abs().max().item()
    checks["mixed_layouts"] = {"error_vs_exact": error}
    return checks


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__), timeout_s=300)


@pytest.mark.parametrize("case", ["fp32_75_pages_d20", "bf16_70_pages_d128", "one_page"])
def test_kernel_matches_the_per_channel_maximum(interpreted: dict, case: str) -> None:
    check = interpreted[case]
    assert check["dtype"] == "torch.float32"
    assert check["error_vs_exact"] < 1e-5, check  # float32 sums of the same inputs
    assert check["error_vs_einsum"] < 1e-5, check


@pytest.mark.parametrize("case", ["query_views", "mixed_layouts"])
def test_kernel_reads_views(interpreted: dict, case: str) -> None:
    assert interpreted[case]["error_vs_exact"] < 1e-4, interpreted[case]


def test_compiles_in_one_graph() -> None:
    """As the decode step compiles it (fullgraph); on CPU the operator runs the einsum path."""
    inputs = _case(2, 4, 40, 32, torch.float32, torch.Generator().manual_seed(3))
    step = torch.compile(cs.cuboid_scores, fullgraph=True, dynamic=False)
    assert torch.allclose(step(*inputs), cs.cuboid_scores(*inputs), atol=1e-5)


def test_reference_path_is_the_per_channel_maximum() -> None:
    inputs = _case(2, 3, 9, 12, torch.float64, torch.Generator().manual_seed(1))
    assert torch.allclose(cs.cuboid_scores(*inputs).double(), _exact(*inputs), atol=1e-5)


def test_mismatched_shapes_are_refused() -> None:
    positive, negative, upper, lower = _case(1, 2, 5, 8, torch.float32, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="digests"):
        cs.cuboid_scores(positive, negative, upper, lower[:, :1])
    with pytest.raises(ValueError, match="widths differ"):
        cs.cuboid_scores(positive[..., :4], negative[..., :4], upper, lower)


def test_kernel_compiles_for_hopper() -> None:
    pointers = {name: "*bf16" for name in ("positive", "negative", "upper", "lower")} | {"out": "*fp32"}
    compile_for_hopper(cs._cuboid_scores_kernel, pointers, {"D": 128, "BLOCK_D": 128, "BLOCK_N": cs.BLOCK_PAGES})


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))

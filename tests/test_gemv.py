"""One-row products (`kvbench/gemv.py`): the Triton GEMV under the interpreter against float64 sums, and a
fused model routing its one-row products through it (references on CPU) with the same outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from kvbench import gemv, kernels
from kvbench.fused_projections import fuse_projections, set_one_row_kernels
from kvbench.models import ModelConfig, load_model
from tests.conftest import run_under_triton_interpreter

CASES = {  # name: (output rows N, K, gated): each plan, K past one BLOCK_K, N not a multiple of BLOCK_N
    "small_output": (40, 1100, False),
    "wide_output": (4100, 600, False),
    "gated": (37, 700, True),
}


def _interpreted_checks() -> dict:
    assert kernels._INTERPRETED
    generator = torch.Generator().manual_seed(0)
    results = {}
    for name, (n_out, k, gated) in CASES.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, 1, k, generator=generator).to(dtype)
            weight = (torch.randn(2 * n_out if gated else n_out, k, generator=generator) / k**0.5).to(dtype)
            got = gemv.one_row_silu_mul(x, weight) if gated else gemv.one_row_linear(x, weight)
            reference = gemv.one_row_silu_mul_reference if gated else gemv.one_row_linear_reference
            error = (got.double() - reference(x.double(), weight.double()).double()).abs().max().item()
            results[f"{name}_{str(dtype)[6:]}"] = {"shape": list(got.shape), "max_error": error}
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64_sums(interpreted: dict, name: str) -> None:
    n_out, _, _ = CASES[name]
    assert interpreted[f"{name}_float32"]["shape"] == [1, 1, n_out]
    assert interpreted[f"{name}_float32"]["max_error"] < 1e-4
    assert interpreted[f"{name}_bfloat16"]["max_error"] < 2e-2  # the output rounded to bfloat16 once


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny-llama", source="shape", shape="tiny-llama", device="cpu")
    model, _ = load_model(cfg)
    routed = copy.deepcopy(model)
    fuse_projections(routed, one_row_kernels=True)
    return model, routed


def test_one_row_products_are_routed_and_outputs_unchanged(pair) -> None:
    """Decode (one row) takes the one-row products, prefill the model's own; both match the unfused model."""
    model, routed = pair
    layer = routed.model.layers[0]
    assert "forward" in layer.mlp.__dict__ and "forward" in layer.self_attn.o_proj.__dict__
    assert layer.self_attn.q_proj.one_row
    with torch.no_grad():
        for ids in (torch.randint(0, 1000, (1, 1)), torch.randint(0, 1000, (2, 9))):
            torch.testing.assert_close(routed(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        hidden = torch.randn(1, 1, model.config.hidden_size)
        torch.testing.assert_close(layer.mlp(hidden), model.model.layers[0].mlp(hidden), rtol=1e-5, atol=1e-5)


def test_routed_layer_traces_in_one_graph(pair) -> None:
    """The patched forwards and the operators trace without a graph break (as the compiled step needs)."""
    model, routed = pair
    torch._dynamo.reset()
    layer = torch.compile(routed.model.layers[0].mlp, fullgraph=True, backend="eager")
    hidden = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden), model.model.layers[0].mlp(hidden), rtol=1e-5, atol=1e-5)


def test_turning_them_off_restores_the_model_forwards(pair) -> None:
    _, routed = pair
    set_one_row_kernels(routed, False)
    layer = routed.model.layers[0]
    assert "forward" not in layer.mlp.__dict__ and "forward" not in layer.mlp.down_proj.__dict__
    assert not layer.self_attn.q_proj.one_row
    set_one_row_kernels(routed, True)
    assert "forward" in layer.mlp.__dict__


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="one row"):
        gemv.one_row_linear(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="gate and up"):
        gemv.one_row_silu_mul(torch.randn(1, 8), torch.randn(5, 8))


@pytest.mark.parametrize("gated", [False, True])
def test_kernel_compiles_for_hopper(gated: bool) -> None:
    pytest.importorskip("triton.backends.nvidia")
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernel is an interpreted function")
    from tests.test_kernels import _compile_for_hopper

    block_n, block_k, _, _ = gemv.GATED if gated else gemv.SMALL_OUTPUT
    pointers = {"x": "*bf16", "w": "*bf16", "y": "*bf16"}
    for dependent in (False, True):
        compiled = _compile_for_hopper(
            gemv._one_row_gemv_kernel,
            pointers,
            {"GATED_SILU": gated, "BLOCK_N": block_n, "BLOCK_K": block_k, "PDL": dependent},
        )
        # Launched with PDL (kvbench.pdl.launch_options), a kernel must wait for its predecessor before any
        # access; without it, it must not (the instructions are no-ops then, but they are not needed).
        ptx = compiled.asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == dependent
        assert ("griddepcontrol.launch_dependents" in ptx) == dependent
        if dependent:  # the wait comes before the kernel's first load
            assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))

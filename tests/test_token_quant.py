"""kvbench.token_quant: the one-launch rotate-and-quantize kernel against its reference (the fast transform,
then `kvbench.quant.quantize`), under Triton's interpreter in a subprocess as in tests/test_kernels.py, and
its lowering for sm_90."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvbench import kernels, token_quant
from kvbench.cache import LayerSpec, ModelSpec
from kvbench.hadamard import hadamard_matrix, hadamard_transform
from kvbench.methods.quarot import QuaRotLayer
from kvbench.quant import Quantized, dequantize, expand_params, quantize
from kvbench.quantized_layer import QuantSpec
from tests.conftest import compile_for_hopper, run_under_triton_interpreter

# name: (batch, kv heads, head_dim, group, clip, dtype, rotate, bits). 24 and 40 rows take two and three
# programs, the last one partly masked.
CASES = {
    "quarot_bf16": (2, 8, 128, 128, 1.0, "bfloat16", True, 4),
    "rtn_bf16": (2, 3, 128, 128, 1.0, "bfloat16", False, 4),
    "groups_clip_fp32": (3, 8, 64, 16, 0.9, "float32", False, 4),
    "rotated_groups_fp16": (5, 8, 64, 32, 0.95, "float16", True, 4),
    "rotated_fp32": (1, 8, 128, 128, 1.0, "float32", True, 4),
    # 2-bit codes (QuaRot-2, RTN-2): four planes a byte
    "quarot2_bf16": (2, 8, 128, 128, 0.95, "bfloat16", True, 2),
    "rtn2_bf16": (2, 3, 128, 128, 1.0, "bfloat16", False, 2),
    "groups2_clip_fp32": (3, 8, 64, 16, 0.9, "float32", False, 2),
    "rotated2_groups_fp16": (5, 8, 64, 32, 0.95, "float16", True, 2),
}


def _inputs(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    b, h, d, _, _, dtype, rotate, _ = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    # [B, 1, H, D] transposed to [B, H, 1, D], as the attention module hands the cache a new token.
    keys = (torch.randn(b, 1, h, d, generator=gen) * 3).transpose(1, 2)
    values = torch.randn(b, 1, h, d, generator=gen).transpose(1, 2)
    keys[0, 0, 0, 5] = 40.0  # an outlier channel, what the rotation spreads
    values[0, 1, 0] = 0.25  # a constant row: the smallest step, every code 0
    values[-1, -1, 0] = -torch.rand(d, generator=gen)  # all negative
    rotation = hadamard_matrix(d, dtype=torch.int8, normalized=False) if rotate else None
    return keys.to(getattr(torch, dtype)), values.to(getattr(torch, dtype)), rotation


def _measure(name: str) -> dict:
    _, _, _, group, clip, dtype, rotate, bits = CASES[name]
    keys, values, rotation = _inputs(name)
    got = token_quant.quantize_tokens(keys, values, rotation, bits, group, clip)
    want = token_quant.quantize_tokens_reference(keys, values, rotation, bits, group, clip)
    result = {"rotate": rotate, "dtype": dtype}
    for which, g, w in zip(("keys", "values"), got, want, strict=True):
        step = expand_params(w.scale.float(), "token", group)
        error = (dequantize(g, bits, "token", group) - dequantize(w, bits, "token", group)).abs() / step
        result[which] = {
            "shapes_ok": [t.shape for t in g] == [t.shape for t in w] and [t.dtype for t in g] == [t.dtype for t in w],
            "codes_equal": bool(torch.equal(g.codes, w.codes)),
            "params_equal": bool(torch.equal(g.scale, w.scale) and torch.equal(g.zero, w.zero)),
            "codes_differing": float((g.codes != w.codes).float().mean()),
            "scale_rel": float(((g.scale.float() - w.scale.float()).abs() / w.scale.float()).max()),
            "error_steps": float(error.max()),  # the dequantized difference, in the reference's steps
        }
    return result


class _Unfused(QuaRotLayer):
    transforms_are_rotation = False  # takes the transform-then-quantize path


def _layer_paths(rotate: bool, bits: int = 4) -> dict:
    """A QuaRot layer (no window: each decode token quantized as written) decoding 6 tokens, by the kernel
    and by the transform-then-quantize path: the stores it writes and the attention outputs."""
    model = ModelSpec("test", num_layers=1, num_heads=8, num_kv_heads=2, head_dim=64, max_positions=4096)
    spec = LayerSpec(0, model, 1, 40, 6)
    gen = torch.Generator().manual_seed(3)
    keys, values = (torch.randn(1, 2, 46, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    queries = torch.randn(1, 8, 6, 64, generator=gen).to(torch.bfloat16)
    quant = QuantSpec(bits, "token", 64, 0.95)
    outputs, stores, one_launch = [], [], []
    for cls in (QuaRotLayer, _Unfused):
        layer = cls(spec, quant, "packed", rotate, True)
        one_launch.append(layer.one_launch_tokens)
        layer.update(keys[:, :, :40], values[:, :, :40])
        layer.finish_prefill()
        outs = []
        for t in range(6):
            layer.update(keys[:, :, 40 + t : 41 + t], values[:, :, 40 + t : 41 + t])
            outs.append(layer.attend(queries[:, :, t : t + 1], None, None, 0.125).float())
        outputs.append(torch.cat(outs))
        stores.append([t.clone() for t in layer.parts[0].tensors("p").values()])
    return {
        "stores_equal": all(torch.equal(a, b) for a, b in zip(*stores, strict=True)),
        "decoded_written": bool((stores[0][0][:, :, 40:46] != 0).any()),
        "outputs_equal": bool(torch.equal(*outputs)),
        "one_launch": one_launch,  # the kernel path, then the transform-then-quantize path
    }


def _into_stores(rotate: bool, bits: int = 4) -> dict:
    """`quantize_tokens_into` of 3 sequences x 6 heads (18 rows: two programs, one sequence across both) at
    slots 7, 0 and 12 (so 9, the last), then at slot 4 for all from a strided (expanded) slot tensor: by the
    kernel, and by the reference's quantize-then-index path (a store layout the kernel refuses); every byte
    of the stores compared, untouched slots included."""
    gen = torch.Generator().manual_seed(11)
    b, h, slots, d, group = 3, 6, 10, 64, 32
    keys, values = (torch.randn(b, h, 1, d, generator=gen).to(torch.bfloat16) for _ in range(2))
    rotation = hadamard_matrix(d, dtype=torch.int8, normalized=False) if rotate else None
    codes = torch.randint(0, 256, (2, b, h, slots, d * bits // 8), dtype=torch.uint8, generator=gen)
    params = torch.rand(4, b, h, slots, d // group, generator=gen).half()
    first, second = torch.tensor([7, 0, 12]), torch.tensor([4]).expand(b)
    written = []
    for unfit in (False, True):
        stores = [codes[0].clone(), params[0].clone(), params[1].clone(), codes[1].clone(), *params[2:].clone()]
        if unfit:  # keys' codes strided unlike the values': the reference path
            stores[0] = stores[0].transpose(0, 1).contiguous().transpose(0, 1)
        key_store, value_store = Quantized(*stores[:3]), Quantized(*stores[3:])
        for slot in (first, second):
            token_quant.quantize_tokens_into(keys, values, rotation, bits, group, 0.95, key_store, value_store, slot)
        written.append([t.contiguous() for t in stores])
    untouched = torch.ones(b, slots, dtype=torch.bool)
    untouched[torch.arange(b), first.clamp_max(slots - 1)] = False
    untouched[:, 4] = False
    kernel, reference = written
    at_first = (torch.arange(b), slice(None), first.clamp_max(slots - 1))
    return {
        "equal": [bool(torch.equal(x, y)) for x, y in zip(kernel, reference, strict=True)],
        "others_kept": bool(torch.equal(kernel[0].transpose(1, 2)[untouched], codes[0].transpose(1, 2)[untouched])),
        "slots_written": bool((kernel[0][at_first] != codes[0][at_first]).any(dim=-1).all()),
    }


def _worker() -> None:
    assert kernels._INTERPRETED, "run with TRITON_INTERPRET=1"
    measured = {name: _measure(name) for name in CASES}
    measured["layer"] = {"rotated": _layer_paths(True), "plain": _layer_paths(False)}
    measured["layer"] |= {"rotated2": _layer_paths(True, 2), "plain2": _layer_paths(False, 2)}
    measured["into"] = {"rotated": _into_stores(True), "plain": _into_stores(False)}
    measured["into"] |= {"rotated2": _into_stores(True, 2), "plain2": _into_stores(False, 2)}
    print(json.dumps(measured))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_the_reference(interpreted: dict, name: str) -> None:
    """Unrotated: equal bit for bit. Rotated: the float32 sums differ in order from the butterfly's, so a
    value may round to the neighbouring model-dtype number and a code move by one step; the parameters
    stay within a float16 step of the reference's (a group's minimum or maximum moved by one last bit)."""
    m = interpreted[name]
    for which in ("keys", "values"):
        got = m[which]
        assert got["shapes_ok"], (which, got)
        if not m["rotate"]:
            assert got["codes_equal"] and got["params_equal"], (which, got)
        else:
            assert got["codes_differing"] < 0.02 and got["scale_rel"] < 2e-3, (which, got)
            assert got["error_steps"] <= 1.01, (which, got)


@pytest.mark.parametrize("rotate", ["rotated", "plain", "rotated2", "plain2"])
def test_quarot_layer_writes_the_same_store_through_the_kernel(interpreted: dict, rotate: str) -> None:
    """QuaRot's layer (and its RTN ablation) decoding through `quantize_new_token`'s kernel path stores what
    the transform-then-quantize path stores, and attends the same."""
    m = interpreted["layer"][rotate]
    assert m["one_launch"] == [True, False] and m["decoded_written"] and m["stores_equal"] and m["outputs_equal"], m


@pytest.mark.parametrize("rotate", ["rotated", "plain", "rotated2", "plain2"])
def test_kernel_writes_each_sequence_at_its_own_slot_and_nothing_else(interpreted: dict, rotate: str) -> None:
    """`quantize_tokens_into` (the decode path: the kernel writes the stores itself) changes exactly the
    slot of each sequence, as the reference's quantize-then-index path does; byte for byte without a
    rotation, and with one too for these tokens."""
    m = interpreted["into"][rotate]
    assert m["equal"] == [True] * 6 and m["others_kept"] and m["slots_written"], m


def test_reference_runs_off_triton_and_matches_quantize() -> None:
    """On CPU the operator is the reference, which is the transform and `quantize` exactly."""
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: CPU tensors go to the interpreted kernel")
    keys, values, rotation = _inputs("quarot_bf16")
    assert rotation is not None  # the rotated case, where the reference does more than `quantize`
    got = token_quant.quantize_tokens(keys, values, rotation, 4, 128, 1.0)
    # Built here from the transform and `quantize`, not through the reference under test.
    want = tuple(quantize(hadamard_transform(x), 4, "token", 128, 1.0) for x in (keys, values))
    assert all(torch.equal(a, b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))


def test_layouts_outside_the_kernel_are_refused_by_fits() -> None:
    assert token_quant.fits(4, "token", 128, 128) and token_quant.fits(4, "token", 32, 64)
    assert token_quant.fits(2, "token", 128, 128) and token_quant.fits(2, "token", 16, 64)
    assert not token_quant.fits(3, "token", 128, 128)  # a bit stream, not planar
    assert not token_quant.fits(4, "channel", 32, 128)  # per-channel groups span tokens
    assert not token_quant.fits(4, "token", 48, 96)  # not a power-of-two block


@pytest.mark.parametrize(("rotate", "bits"), [(True, 4), (False, 4), (True, 2)])
def test_kernel_compiles_for_hopper(rotate: bool, bits: int) -> None:
    """Lowered for sm_90 with Triton's bundled ptxas: the bfloat16 tensor-core product the interpreter runs
    in float32, and the reshapes, permute and splits of the packing."""
    pointers = {name: "*bf16" for name in ("k_ptr", "v_ptr")} | {"rotation_ptr": "*i8"}
    pointers |= {"kc_ptr": "*u8", "vc_ptr": "*u8"} | {n: "*fp16" for n in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")}
    pointers |= {"rotation_scale": "fp64", "clip": "fp64", "slot_ptr": "*i64"}  # floats typed as Inductor once did
    constexprs = {"DIM": 128, "GROUP": 128, "BITS": bits, "ROTATE": rotate, "UPCAST": False}
    constexprs["BLOCK_R"] = token_quant.BLOCK_ROWS
    assert compile_for_hopper(token_quant._quantize_tokens_kernel, pointers, constexprs).asm["cubin"]


if __name__ == "__main__":
    _worker()

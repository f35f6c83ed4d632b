"""kvbench.quant_kernels, kvbench.plane_kernel and kvbench.quantized_layer: the packed decode kernels against
their reference (under Triton's interpreter, in a subprocess as in tests/test_kernels.py), and the layer's
storage, flush schedule, byte count, hooks and batching against plain-PyTorch expectations."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvbench import kernels, plane_kernel, quant_kernels
from kvbench.cache import LayerSpec, ModelSpec
from kvbench.hadamard import hadamard_matrix
from kvbench.methods.kivi import KIVI
from kvbench.methods.quarot import QuaRot
from kvbench.methods.zipcache import ZipCache
from kvbench.quant import dequantize, fake_quantize, quantize
from kvbench.quant_kernels import PackedSlots, packed_decode_attention, packed_decode_attention_reference
from kvbench.quantized_layer import QuantizedLayer, QuantSpec
from tests.conftest import compile_for_hopper, run_under_triton_interpreter

TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}
LSE_TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}

# name: (batch, kv heads, group, slots, head dim, key layout, value layout, dtype). A layout is
# (bits, row_tokens, col_channels, lead): "lead" None means lead = row_tokens (per-token / per-channel
# groups), a number is ZipCache's first row for a prompt set (different per sequence: lead + 7 * b); the
# keys of PROMPT_ROW cases say so (`PackedSlots.prompt_row`, as ZipCache's stores do: key mode "lead").
CASES = {
    "kivi2_fp32": (2, 2, 4, 200, 64, (2, 32, 1, None), (2, 1, 32, None), "float32"),
    "kivi4_bf16": (2, 2, 4, 1000, 128, (4, 32, 1, None), (4, 1, 32, None), "bfloat16"),
    "three_bits_fp16": (3, 1, 3, 333, 64, (3, 1, 64, None), (3, 1, 16, None), "float16"),
    "eight_bits_mha": (2, 4, 1, 130, 32, (8, 1, 32, None), (8, 1, 32, None), "float32"),
    "gqa8_many_splits": (1, 1, 8, 777, 64, (3, 32, 1, None), (4, 1, 32, None), "float32"),
    "zipcache_sets": (2, 2, 2, 520, 64, (4, 24, 1, 101), (2, 1, 64, None), "float32"),
    # key rows of 64 slots (one row per tile, folded into the query), tiles aligned to a lead of 30 + 7b
    "row_fold_misaligned": (2, 2, 4, 700, 64, (4, 64, 1, 30), (4, 1, 64, None), "float16"),
    # head_dim 48 (padded tiles), key rows of 16 from a lead of 21 + 7b, value groups of 24 channels
    "odd_dim_rows": (3, 1, 2, 300, 48, (2, 16, 1, 21), (3, 1, 24, None), "float32"),
    # per-token keys in groups of 16 channels, per-channel values (parameters read per slot)
    "channel_values": (2, 2, 2, 260, 32, (8, 1, 16, None), (2, 32, 1, None), "float16"),
    # `_packed_split_kernel`'s "row" fold, now that planar 4-bit rows of 64 go to `_plane_split_kernel`
    "row_fold_three_bits": (2, 2, 4, 300, 64, (3, 64, 1, 30), (8, 1, 64, None), "float16"),
    # planar cases: QuaRot's one parameter per token; per-token groups of one plane (keys) and of two
    # (values); head_dim 96 (planes of 24 channels in tiles of 32)
    "quarot4_bf16": (2, 2, 4, 500, 128, (4, 1, 128, None), (4, 1, 128, None), "bfloat16"),
    "plane_groups_fp16": (3, 2, 2, 300, 64, (4, 1, 16, None), (4, 1, 32, None), "float16"),
    "plane_odd_dim": (1, 2, 3, 250, 96, (4, 1, 96, None), (4, 1, 48, None), "float32"),
    # per-channel key rows of 32 from a lead of 5 + 7b in 64-slot tiles ("rows"), float16: the keys
    # dequantized in float16 as on the GPU (bfloat16 goes to float32 under the interpreter)
    "rows_fp16": (2, 2, 4, 400, 64, (4, 32, 1, 5), (4, 1, 64, None), "float16"),
    # the same two layouts under the default launch (`fold_half_rows`, "halves": tiles aligned to the rows,
    # each half's row folded into the query)
    "halves_fp16": (2, 2, 4, 400, 64, (4, 32, 1, 5), (4, 1, 64, None), "float16"),
    "kivi4_halves_bf16": (2, 2, 4, 1000, 128, (4, 32, 1, None), (4, 1, 32, None), "bfloat16"),
    # a group of 3 in 4 query rows: one padded row under the default launch; MHA (a group of 1) in one row
    "halves_group3_fp16": (2, 2, 3, 400, 64, (4, 32, 1, 5), (4, 1, 64, None), "float16"),
    "kivi2_mha_bf16": (2, 3, 1, 300, 64, (2, 32, 1, None), (2, 1, 32, None), "bfloat16"),
    # KIVI-2's layout from a lead off the half tile: rows of 32 from 9 + 7b, value groups of a plane
    "kivi2_halves_fp16": (2, 2, 4, 450, 64, (2, 32, 1, 9), (2, 1, 16, None), "float16"),
    # 18 (sequence, KV head) pairs, above FEW_HEADS: with `store_wave_target`, 3 splits a pair on the
    # interpreter's 4 "SMs" where the many-heads target plans 2
    "int2_many_heads_bf16": (3, 6, 3, 1500, 64, (2, 1, 64, None), (2, 1, 64, None), "bfloat16"),
    # `_packed_split_kernel`'s gathered key rows, now that planar ZipCache-like layouts go to the plane kernel
    "gather_three_bits": (2, 2, 2, 300, 64, (3, 24, 1, 50), (8, 1, 64, None), "float32"),
    # one value zero-point per slot, summed per tile (the launch's `zero_row_sums`): QuaRot's layout, and
    # float16 per-token keys in planes of their own with whole-head value groups
    "quarot4_zero_sums_bf16": (2, 2, 4, 500, 128, (4, 1, 128, None), (4, 1, 128, None), "bfloat16"),
    "zero_sums_fp16": (3, 2, 2, 300, 64, (4, 1, 16, None), (4, 1, 64, None), "float16"),
    # codes as 2^m + c, the offset taken out of the sums (the launch's `offset_codes`), bf16 and fp16
    "quarot4_offset_bf16": (2, 2, 4, 500, 128, (4, 1, 128, None), (4, 1, 128, None), "bfloat16"),
    "offset_fp16": (3, 2, 2, 300, 64, (4, 1, 64, None), (4, 1, 64, None), "float16"),
    # 2-bit codes as 2^m + c (the launch's `offset_crumbs`): QuaRot-2's and RTN-2's layout, bf16 and fp16; and
    # with it off, the codes converted with their subtract
    "quarot2_offset_bf16": (2, 2, 4, 500, 128, (2, 1, 128, None), (2, 1, 128, None), "bfloat16"),
    "offset2_fp16": (3, 2, 2, 300, 64, (2, 1, 64, None), (2, 1, 64, None), "float16"),
    "quarot2_subtract_bf16": (2, 2, 4, 500, 128, (2, 1, 128, None), (2, 1, 128, None), "bfloat16"),
    # ZipCache's layouts, key mode "lead": row 0 for a prompt set of 150 + 7b slots (22 + 7b past a tile
    # boundary), then decode blocks of 60 (the 4-bit salient set) or 40 slots (the 2-bit rest), both in the
    # plane kernel; a full sequence reaches ~9 blocks past lead, so both branches run
    "zipcache4_lead_fp16": (2, 2, 4, 700, 64, (4, 60, 1, 150), (4, 1, 64, None), "float16"),
    "zipcache4_lead_bf16": (3, 2, 4, 700, 64, (4, 60, 1, 150), (4, 1, 64, None), "bfloat16"),
    "zipcache4_lead_fp32": (2, 1, 4, 500, 64, (4, 60, 1, 30), (4, 1, 64, None), "float32"),
    "zipcache2_lead_fp16": (2, 2, 4, 700, 64, (2, 40, 1, 150), (2, 1, 64, None), "float16"),
    "zipcache2_lead_bf16": (3, 2, 4, 700, 64, (2, 40, 1, 150), (2, 1, 64, None), "bfloat16"),
    "zipcache2_lead_fp32": (2, 1, 4, 500, 64, (2, 40, 1, 30), (2, 1, 64, None), "float32"),
    # the same layout at 3 bits, which `_packed_split_kernel` takes (2-bit rows are planar, the plane kernel's)
    "zipcache3_lead_fp16": (2, 2, 4, 700, 64, (3, 40, 1, 150), (3, 1, 64, None), "float16"),
    "zipcache3_lead_bf16": (3, 2, 4, 700, 64, (3, 40, 1, 150), (3, 1, 64, None), "bfloat16"),
    "zipcache3_lead_fp32": (2, 1, 4, 500, 64, (3, 40, 1, 30), (3, 1, 64, None), "float32"),
    # the same salient set with the launch's fold_lead off: every tile's keys per slot ("rows")
    "zipcache4_lead_off_fp16": (2, 2, 4, 700, 64, (4, 60, 1, 150), (4, 1, 64, None), "float16"),
}
PROMPT_ROW = tuple(name for name in CASES if name.startswith("zipcache") and "_lead" in name)
# Cases also run with a full-precision window: the plane kernel's window program (KIVI's layout, per-token
# groups, float32), and `_packed_split_kernel` with the window merged apart.
WINDOW_CASES = (
    "kivi4_bf16",
    "kivi4_halves_bf16",
    "plane_groups_fp16",
    "kivi2_fp32",
    "three_bits_fp16",
    "zero_sums_fp16",
    "offset_fp16",
    "offset2_fp16",
    "zipcache4_lead_bf16",
    "zipcache2_lead_fp16",
    "zipcache3_lead_bf16",
)
# Cases also run with QuaRot's rotation (keys and values stored rotated): inside the plane kernel and the
# combine, alone and with a window; around `_packed_split_kernel` (products outside it).
# Output channels scaled (ZipCache's channel scales): in the combine kernel (the plane kernel's store, with its
# window), after the merge (the split kernel's 3-bit layout), after the rotation (QuaRot's).
SCALE_CASES = ("zipcache4_lead_bf16+window", "three_bits_fp16+window", "quarot4_bf16+rotation")
# The plane kernel's inner tiles without slot masks (the launch's `unmasked_tiles`): every key mode, leads and
# rows misaligned to the tile, partial lengths, a window, a rotation.
UNMASKED_CASES = (
    "quarot4_offset_bf16+rotation",
    "plane_groups_fp16+window",
    "row_fold_misaligned",
    "rows_fp16",
    "halves_fp16",
    "kivi4_halves_bf16+window",
    "kivi2_fp32",
    "zipcache4_lead_bf16+window",
    "zipcache2_lead_fp16",
)
# The plane kernel's query rows at one tensor-core product's 16 for every key mode (the launch's `query_rows`,
# `query_rows_token_keys`), as before they followed the group: every key mode, a window, a rotation.
ROWS16_CASES = (
    "quarot4_offset_bf16+rotation",
    "plane_groups_fp16+window",
    "kivi2_fp32",
    "kivi4_halves_bf16+window",
    "kivi2_halves_fp16",
    "rows_fp16",
    "zipcache4_lead_bf16+window",
)
ROWS16 = {"query_rows": 16, "query_rows_token_keys": 16}
# The products with the query rows first where the default launch puts the codes first (per-token keys, KIVI's
# "halves"; the launch's `codes_first` off), as before: a window, a rotation, both bit widths, groups of 2-4.
QUERY_FIRST_CASES = (
    "quarot4_offset_bf16+rotation",
    "plane_groups_fp16+window",
    "kivi4_halves_bf16+window",
    "kivi2_halves_fp16",
)
# A register cap takes the opaque operators, their launches straight to Triton (whose interpreter drops the cap;
# `test_a_register_cap_launches_straight_to_triton` checks that it is passed): KIVI's "halves" has one by default
# (`halves_max_registers`); the other key modes with the launch's `max_registers`; "halves" without, as before.
CAPPED = {"max_registers": 128}
CAPPED_CASES = ("quarot4_offset_bf16+rotation", "plane_groups_fp16+window")
UNCAPPED = {"halves_max_registers": 0, "halves_programs_per_sm": (6, 12)}
UNCAPPED_CASES = ("kivi4_halves_bf16+window", "kivi2_halves_fp16")
WAVES_CASES = ("int2_many_heads_bf16+window",)  # a single store's split target by its waves
# The former conversions, before `weighted_crumbs` and `lead_offset_keys` were turned on: 2-bit per-token codes
# shifted down, no weights (bfloat16 and float16, with the window's program and QuaRot's rotation), and
# ZipCache's prompt-set keys in the subtract forms (4 and 2 bits)
SHIFTED_CASES = (
    "quarot2_offset_bf16",
    "offset2_fp16+window",
    "quarot2_offset_bf16+rotation",
    "zipcache4_lead_bf16+window",
    "zipcache2_lead_fp16",
)
SHIFTED = {"weighted_crumbs": False, "lead_offset_keys": False}
# QuaRot's rotated query kept in the products' layout (ROTATE 1), as before `reload_rotated_query` (ROTATE 2)
REGISTERS_CASES = ("quarot2_offset_bf16+rotation", "quarot4_offset_bf16+rotation")
ROTATION_CASES = (
    "quarot4_bf16",
    "quarot2_offset_bf16",
    "plane_groups_fp16+window",
    "kivi2_fp32",
    "three_bits_fp16",
    "quarot4_zero_sums_bf16",
    "quarot4_offset_bf16",
)
# Cases run with a launch other than the default one: KIVI's rows of 32 with tiles of 32 slots fold; rows of
# half a tile dequantized per slot ("rows", the default before the half-tile fold).
LAUNCHES = {
    "kivi2_fp32": quant_kernels.LaunchConfig(block_n=32, programs_per_sm=1),
    "rows_fp16": quant_kernels.LaunchConfig(fold_half_rows=False),
    "kivi4_bf16": quant_kernels.LaunchConfig(fold_half_rows=False),
    # one value zero-point per slot through the zero-point product, as before row sums became the default
    "quarot4_bf16": quant_kernels.LaunchConfig(zero_row_sums=False),
    # summed zero-points with the codes as they are (offset_codes=False)
    "quarot4_zero_sums_bf16": quant_kernels.LaunchConfig(offset_codes=False),
    "zero_sums_fp16": quant_kernels.LaunchConfig(offset_codes=False),
    "zipcache4_lead_off_fp16": quant_kernels.LaunchConfig(fold_lead=False),
    "quarot2_subtract_bf16": quant_kernels.LaunchConfig(offset_crumbs=False),
}


def _layout(b: int, h: int, s: int, d: int, layout: tuple, gen: torch.Generator) -> PackedSlots:
    """Random bytes and random float16 parameters in the given layout: every byte pattern and row/column
    mapping is exercised without going through `quantize`."""
    bits, row_tokens, col_channels, lead = layout
    lead = torch.full((b,), row_tokens) if lead is None else lead + 7 * torch.arange(b)
    rows = int(quant_kernels.slot_rows(s, lead, row_tokens).max()) + 1
    codes = torch.randint(0, 256, (b, h, s, d * bits // 8), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(b, h, rows, d // col_channels, generator=gen) * 0.3 + 0.02).half()
    zero = torch.randn(b, h, rows, d // col_channels, generator=gen).half()
    return PackedSlots(codes, scale, zero, lead, bits, row_tokens, col_channels)


@contextlib.contextmanager
def _launched() -> Iterator[list[dict]]:
    """The constexprs each plane-kernel launch inside the block was given (query rows BLOCK_G, CODES_FIRST, the
    window's tile BLOCK_NW) and its register cap, as launched (`plane_kernel._launch`)."""
    launches, launch_kernel = [], plane_kernel._launch

    def spy(kernel, grid, arguments, constexprs, launch):
        names = ("BLOCK_G", "CODES_FIRST", "BLOCK_NW", "OFFSET", "WEIGHTED", "K_OFFSET", "ROTATE")
        launches.append({name: constexprs[name] for name in names})
        launches[-1]["max_registers"] = launch.max_registers
        launches[-1]["grid"] = list(grid)
        return launch_kernel(kernel, grid, arguments, constexprs, launch)

    plane_kernel._launch = spy
    try:
        yield launches
    finally:
        plane_kernel._launch = launch_kernel


def _case_inputs(name: str, seed: int) -> dict:
    b, hkv, group, s, d, k_layout, v_layout, dtype = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    keys = _layout(b, hkv, s, d, k_layout, gen)._replace(prompt_row=name in PROMPT_ROW)
    values = _layout(b, hkv, s, d, v_layout, gen)
    lengths = torch.randint(1, s, (b,), generator=gen)
    lengths[0] = s  # every slot live
    if b > 2:
        lengths[-1] = 0  # no slot live
    query = torch.randn(b, hkv * group, d, generator=gen).to(getattr(torch, dtype))
    return {"query": query, "keys": keys, "values": values, "lengths": lengths, "scale": 2 * d**-0.5}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _window(x: dict, slots: int, gen: torch.Generator) -> quant_kernels.Window:
    """A full-precision window of `slots` ring slots, every third one not live; a sequence with no packed
    slot live has no window slot live either."""
    b, _, d = x["query"].shape
    hkv = x["keys"].codes.shape[1]
    keys = torch.randn(b, hkv, slots, d, generator=gen).to(x["query"].dtype)
    values = torch.randn(b, hkv, slots, d, generator=gen).to(x["query"].dtype)
    positions = torch.arange(slots).expand(b, hkv, slots).clone()
    positions[..., ::3] = -1
    positions[x["lengths"] == 0] = -1
    return quant_kernels.Window(keys, values, positions)


def _out_scale(b: int, hkv: int, dv: int) -> torch.Tensor:
    """Channel scales [B, Hkv, Dv] as ZipCache holds them: float16, a view whose sequences and heads are strided."""
    return (torch.rand(b, hkv, 3, dv, generator=torch.Generator().manual_seed(5)) + 0.5).half()[:, :, 1]


def _measure(
    name: str,
    with_window: bool = False,
    with_rotation: bool = False,
    with_scale: bool = False,
    launch: quant_kernels.LaunchConfig | None = None,
) -> dict:
    x = _case_inputs(name, seed=len(name))
    args = (x["query"], x["keys"], x["values"], x["lengths"], x["scale"])
    rotation = hadamard_matrix(x["query"].shape[-1], dtype=torch.int8, normalized=False) if with_rotation else None
    # The reference meets the stored (rotated) keys with the rotated query and rotates its output back.
    query = x["query"] if rotation is None else quant_kernels.rotate(x["query"], rotation)
    ref_out, ref_lse = packed_decode_attention_reference(query, *args[1:])
    launch = launch or LAUNCHES.get(name, quant_kernels.LaunchConfig())
    quant_kernels.LAUNCH = launch
    window = None
    if with_window:  # the window's own reference, merged: what the fused window program must give
        window = _window(x, 70, torch.Generator().manual_seed(7))
        dense = kernels.decode_attention_reference(query, *window[:3], x["scale"])
        ref_out, ref_lse = quant_kernels.merge_attention([(ref_out, ref_lse), dense])
    if rotation is not None:
        ref_out = quant_kernels.rotate(ref_out, rotation)
    out_scale = None
    if with_scale:  # after the rotation, as the combine kernel scales
        out_scale = _out_scale(*x["keys"].codes.shape[:2], ref_out.shape[-1])
        ref_out = quant_kernels.scale_channels(ref_out, out_scale)
    with _launched() as launches:
        out, lse = packed_decode_attention(*args, window, rotation, out_scale)
    group = x["query"].shape[1] // x["keys"].codes.shape[1]
    live = (x["lengths"] > 0).view(-1, 1).expand(-1, x["query"].shape[1])
    finite = torch.isfinite(ref_lse)
    b, hkv, s, d = (*x["keys"].codes.shape[:3], x["query"].shape[-1])
    plan = plane_kernel.plane_plan(x["keys"], x["values"], launch)
    if plan is not None:  # what `packed_decode_attention` launched
        launch = dataclasses.replace(launch, block_n=plan[1])
    sums = plan is not None and launch.zero_row_sums and x["values"].col_channels == x["query"].shape[-1]
    halves = plan is not None and plan[0] == "halves"
    return {
        "window": with_window,
        "rotation": with_rotation,
        "scale": with_scale,
        "unmasked": launch.unmasked_tiles,
        "zero_sums": launch.zero_row_sums and x["values"].col_channels == x["query"].shape[-1],
        "offset": bool(launches and launches[0]["OFFSET"]),  # as launched
        "weighted": bool(launches and launches[0]["WEIGHTED"]),
        "k_weighted": bool(launches and launches[0]["K_OFFSET"]),
        "rotate": launches[0]["ROTATE"] if launches else None,
        "kernel": "packed" if plan is None else "plane",
        "key_mode": quant_kernels._param_mode(x["keys"], d, launch, can_align=True) if plan is None else plan[0],
        "value_mode": quant_kernels._param_mode(x["values"], d, launch, can_align=False)
        if plan is None
        else f"token/{d // x['values'].col_channels}",
        "bits": [x["keys"].bits, x["values"].bits],
        "key_groups": x["query"].shape[-1] // min(x["keys"].col_channels, x["query"].shape[-1]),
        # tiles start where key rows do: a lead off the tile ("halves": off the half tile, the row) puts a
        # split's first tile below its start
        "lead_misaligned": bool((x["keys"].lead % (x["keys"].row_tokens if halves else launch.block_n) != 0).any()),
        # every sequence's lead > 0 (tiles below it) and some sequence live past it (decode-block tiles)
        "both_sides_of_lead": bool((x["lengths"] > x["keys"].lead).any() and (x["keys"].lead > 0).all()),
        "dtype": str(x["query"].dtype).removeprefix("torch."),
        "out_dtype_ok": out.dtype == x["query"].dtype and lse.dtype == torch.float32,
        "nan": bool(out.isnan().any() or lse.isnan().any()),
        "out_rel": _rel(out[live], ref_out[live]),
        "lse_rel": _rel(lse[finite], ref_lse[finite]),
        "lse_inf_where_ref": bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))),
        "dead_rows": int((~live).sum()),
        "dead_out_zero": bool((out[~live] == 0).all()),
        "splits": quant_kernels._split_plan(
            b * hkv,
            s,
            kernels._num_sms(x["query"].device),
            plane_kernel.plane_launch(launch, sums, plan[0] if plan else "", b * hkv, s),
        )[0],
        "group": group,
        "query_block": launches[0]["BLOCK_G"] if launches else None,  # one plane-kernel launch, or none
        "codes_first": bool(launches and launches[0]["CODES_FIRST"]),
        "window_block": launches[0]["BLOCK_NW"] if launches else None,
        "max_registers": launches[0]["max_registers"] if launches else None,
        "launched_grid": launches[0]["grid"] if launches else None,
        "launches": len(launches),
    }


# Two stores attended as one (`packed_sets_attention`), (batch, kv heads, group, head dim, dtype, the stores'
# (slots, key layout, value layout)); a store's keys have a prompt row (ZipCache's sets).
SALIENT = (4, 60, 1, 150), (4, 1, 64, None)  # ZipCache's 4-bit set: key rows of 60 past a prompt set of 150 + 7b
REST = (2, 40, 1, 100), (2, 1, 64, None)  # its 2-bit rest: rows of 40 past 100 + 7b
PAIRS = {
    # ZipCache's sets: one launch of the plane kernel
    "zipcache_pair_bf16": (3, 2, 4, 64, "bfloat16", (700, *SALIENT), (500, *REST)),
    "zipcache_pair_fp16": (2, 2, 4, 64, "float16", (700, *SALIENT), (500, *REST)),
    "zipcache_pair_fp32": (2, 1, 4, 64, "float32", (300, (4, 60, 1, 30), SALIENT[1]), (400, (2, 40, 1, 70), REST[1])),
    # above FEW_HEADS (sequence, KV head) pairs: the launch's split target from its waves (`wave_target`)
    "zipcache_pair_many_heads": (3, 6, 2, 64, "bfloat16", (700, *SALIENT), (500, *REST)),
    # a "lead" set (4 query rows by default) beside per-token keys (8): one launch at the larger
    "lead_token_pair_bf16": (2, 2, 4, 64, "bfloat16", (500, *REST), (300, (4, 1, 64, None), SALIENT[1])),
    # a 3-bit rest, which the split kernel takes: two calls, merged
    "split_pair_fp16": (2, 2, 4, 64, "float16", (700, *SALIENT), (500, (3, 40, 1, 100), (3, 1, 64, None))),
}


def _measure_pair(
    name: str, with_window: bool, launch: quant_kernels.LaunchConfig | None = None, with_scale: bool = False
) -> dict:
    b, hkv, group, d, dtype, *stores = PAIRS[name]
    gen = torch.Generator().manual_seed(len(name))
    sets = []
    for slots, k_layout, v_layout in stores:
        keys = _layout(b, hkv, slots, d, k_layout, gen)._replace(prompt_row=True)
        lengths = torch.randint(1, slots, (b,), generator=gen)
        lengths[0] = slots
        if b > 2:
            lengths[-1] = 0  # no slot live in either store
        sets.append((keys, _layout(b, hkv, slots, d, v_layout, gen), lengths))
    query = torch.randn(b, hkv * group, d, generator=gen).to(getattr(torch, dtype))
    quant_kernels.LAUNCH = launch or quant_kernels.LaunchConfig()
    pieces = [packed_decode_attention_reference(query, *store, 0.2) for store in sets]
    x = {"query": query, "keys": sets[0][0], "lengths": torch.maximum(sets[0][2], sets[1][2])}
    window = _window(x, 70, torch.Generator().manual_seed(7)) if with_window else None
    if window is not None:
        pieces.append(kernels.decode_attention_reference(query, *window[:3], 0.2))
    ref_out, ref_lse = quant_kernels.merge_attention(pieces)
    out_scale = _out_scale(b, hkv, d) if with_scale else None
    if out_scale is not None:
        ref_out = quant_kernels.scale_channels(ref_out, out_scale)
    launched = []  # each plane-kernel launch's stores' (split length, number of splits)
    launch_stores = plane_kernel._plane_attention_triton

    def spy(query: torch.Tensor, stores: list, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        launched.append([list(store.splits) for store in stores])
        return launch_stores(query, stores, *args, **kwargs)

    plane_kernel._plane_attention_triton = spy
    try:
        with _launched() as launches:
            out, lse = quant_kernels.packed_sets_attention(query, sets, 0.2, window, out_scale)
    finally:
        plane_kernel._plane_attention_triton = launch_stores
    live = torch.isfinite(ref_lse)  # rows with a live slot in some store or the window
    return {
        "one_launch": plane_kernel.pair_fits(sets[0][:2], sets[1][:2], quant_kernels.LAUNCH),
        "launched_splits": launched,
        "launched_query_rows": [launch["BLOCK_G"] for launch in launches],
        "launched_codes_first": [launch["CODES_FIRST"] for launch in launches],
        "launched_max_registers": [launch["max_registers"] for launch in launches],
        "window": with_window,
        "dtype": dtype,
        "out_dtype_ok": out.dtype == query.dtype and lse.dtype == torch.float32,
        "nan": bool(out.isnan().any() or lse.isnan().any()),
        "out_rel": _rel(out[live], ref_out[live]),
        "lse_rel": _rel(lse[live], ref_lse[live]),
        "lse_inf_where_ref": bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))),
        "dead_out_zero": bool((out[~live] == 0).all()),
        "dead_rows": int((~live).sum()),
    }


# A ring window's counters per sequence, (tokens seen, tokens quantized), for a ring of RING slots (neither a
# power of two nor a multiple of the tile): wrapped with a partly quantized oldest part; not yet full (slots
# never written); exactly full; empty (all quantized); nothing seen; wrapped many times over.
RING = 70
RING_COUNTERS = [(100, 64), (30, 0), (70, 6), (250, 250), (0, 0), (1001, 950)]
# The plane kernel's window program over the counters (`Window.seen`, `.quantized`) against the same launch
# over the positions they stand for: one store, one store rotated, ZipCache's two sets in one launch.
RING_CASES = ("kivi4_halves_bf16", "quarot4_bf16+rotation", "zipcache4_lead_bf16", "pair:zipcache_pair_fp16")


def _ring_window(query: torch.Tensor, hkv: int, gen: torch.Generator, first: int) -> quant_kernels.Window:
    """Sequence i's counters: RING_COUNTERS[first + i] (cyclically)."""
    b, _, d = query.shape
    counters = torch.tensor([RING_COUNTERS[(first + i) % len(RING_COUNTERS)] for i in range(b)])
    keys = torch.randn(b, hkv, RING, d, generator=gen).to(query.dtype)
    values = torch.randn(b, hkv, RING, d, generator=gen).to(query.dtype)
    return quant_kernels.Window(keys, values, None, counters[:, 0], counters[:, 1])


def _measure_ring(name: str) -> dict:
    """Bit for bit: the ring's counters give the kernel the same live slots as the positions do, for every
    state in RING_COUNTERS (the batch takes them a few at a time)."""
    quant_kernels.LAUNCH = quant_kernels.LaunchConfig()
    case, _, rotated = name.partition("+")
    if case.startswith("pair:"):
        b, hkv, group, d, dtype, *stores = PAIRS[case.removeprefix("pair:")]
        gen = torch.Generator().manual_seed(3)
        sets = []
        for slots, k_layout, v_layout in stores:
            keys = _layout(b, hkv, slots, d, k_layout, gen)._replace(prompt_row=True)
            sets.append((keys, _layout(b, hkv, slots, d, v_layout, gen), torch.randint(1, slots, (b,), generator=gen)))
        query = torch.randn(b, hkv * group, d, generator=gen).to(getattr(torch, dtype))

        def attend(window: quant_kernels.Window) -> tuple[torch.Tensor, torch.Tensor]:
            return quant_kernels.packed_sets_attention(query, sets, 0.2, window)
    else:
        x = _case_inputs(case, seed=5)
        args = (x["query"], x["keys"], x["values"], x["lengths"], x["scale"])
        rotation = hadamard_matrix(x["query"].shape[-1], dtype=torch.int8, normalized=False) if rotated else None
        query, hkv, gen = x["query"], x["keys"].codes.shape[1], torch.Generator().manual_seed(4)

        def attend(window: quant_kernels.Window) -> tuple[torch.Tensor, torch.Tensor]:
            return packed_decode_attention(*args, window, rotation)

    same, live_slots, states = True, 0, set()
    for first in range(0, len(RING_COUNTERS), query.shape[0]):
        ring = _ring_window(query, hkv, gen, first)
        by_positions = quant_kernels.Window(ring.keys, ring.values, ring.live_positions())
        got, want = attend(ring), attend(by_positions)
        same = same and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        live_slots += int((by_positions.positions >= 0).sum())
        states |= set(zip(ring.seen.tolist(), ring.quantized.tolist(), strict=True))
    return {"same": same, "live_slots": live_slots, "states": len(states)}


def _measure_compiled_capped(name: str) -> dict:
    """KIVI's capped launch (the default's `halves_max_registers`) inside torch.compile (fullgraph): the opaque
    operator traced by its fake (the references) and run as it is, against the same launch run eagerly."""
    x = _case_inputs(name, seed=len(name))
    window = _window(x, 70, torch.Generator().manual_seed(7))
    quant_kernels.LAUNCH = quant_kernels.LaunchConfig()

    def attend(query, lengths):
        return packed_decode_attention(query, x["keys"], x["values"], lengths, x["scale"], window)

    eager = attend(x["query"], x["lengths"])
    torch._dynamo.reset()
    with _launched() as launches:
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(x["query"], x["lengths"])
    return {
        "same": bool(torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])),
        "launched_max_registers": [launch["max_registers"] for launch in launches],
    }


def _worker() -> None:
    assert kernels._INTERPRETED, "run with TRITON_INTERPRET=1"
    cases = {name: _measure(name) for name in CASES}
    cases |= {f"pair:{name}": _measure_pair(name, with_window=False) for name in PAIRS}
    cases |= {f"pair:{name}+window": _measure_pair(name, with_window=True) for name in PAIRS}
    whole = quant_kernels.LaunchConfig(pair_shared_target=False)  # each set's plan takes the whole split target
    cases["pair:zipcache_pair_bf16+whole"] = _measure_pair("zipcache_pair_bf16", False, whole)
    cases["pair:zipcache_pair_fp16+window+whole"] = _measure_pair("zipcache_pair_fp16", True, whole)
    cases |= {f"{name}+window": _measure(name, with_window=True) for name in WINDOW_CASES}
    for name in SCALE_CASES:
        case, *given = name.split("+")
        cases[f"{name}+scale"] = _measure(case, "window" in given, "rotation" in given, with_scale=True)
    cases["pair:zipcache_pair_bf16+window+scale"] = _measure_pair("zipcache_pair_bf16", True, with_scale=True)
    cases["pair:split_pair_fp16+scale"] = _measure_pair("split_pair_fp16", False, with_scale=True)
    for suffix, names, changes in (
        ("unmasked", UNMASKED_CASES, {"unmasked_tiles": True}),
        ("rows16", ROWS16_CASES, ROWS16),
        ("query_first", QUERY_FIRST_CASES, {"codes_first": False}),
        ("capped", CAPPED_CASES, CAPPED),
        ("uncapped", UNCAPPED_CASES, UNCAPPED),
        ("waves", WAVES_CASES, {"store_wave_target": True}),
        ("shifted", SHIFTED_CASES, SHIFTED),
        ("registers", REGISTERS_CASES, {"reload_rotated_query": False}),
    ):
        for name in names:  # each case's own launch with `changes`
            case, *given = name.split("+")
            launch = dataclasses.replace(LAUNCHES.get(case, quant_kernels.LaunchConfig()), **changes)
            cases[f"{name}+{suffix}"] = _measure(case, "window" in given, "rotation" in given, launch=launch)
    unmasked = quant_kernels.LaunchConfig(unmasked_tiles=True)
    cases["pair:zipcache_pair_bf16+window+unmasked"] = _measure_pair("zipcache_pair_bf16", True, unmasked)
    shifted = quant_kernels.LaunchConfig(**SHIFTED)
    cases["pair:zipcache_pair_fp16+window+shifted"] = _measure_pair("zipcache_pair_fp16", True, shifted)
    rows16 = quant_kernels.LaunchConfig(**ROWS16)
    cases["pair:zipcache_pair_fp16+window+rows16"] = _measure_pair("zipcache_pair_fp16", True, rows16)
    capped = quant_kernels.LaunchConfig(**CAPPED)
    cases["pair:zipcache_pair_bf16+window+capped"] = _measure_pair("zipcache_pair_bf16", True, capped)
    cases["compiled:capped"] = _measure_compiled_capped("kivi4_halves_bf16")
    for name in ROTATION_CASES:
        case, _, window = name.partition("+")
        cases[f"{name}+rotation"] = _measure(case, with_window=window == "window", with_rotation=True)
    cases |= {f"ring:{name}": _measure_ring(name) for name in RING_CASES}
    print(json.dumps(cases))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


@pytest.mark.parametrize(
    "name",
    [
        *CASES,
        *(f"{name}+window" for name in WINDOW_CASES),
        *(f"{name}+rotation" for name in ROTATION_CASES),
        *(f"{name}+scale" for name in SCALE_CASES),
        *(f"{name}+unmasked" for name in UNMASKED_CASES),
        *(f"{name}+rows16" for name in ROWS16_CASES),
        *(f"{name}+query_first" for name in QUERY_FIRST_CASES),
        *(f"{name}+capped" for name in CAPPED_CASES),
        *(f"{name}+uncapped" for name in UNCAPPED_CASES),
        *(f"{name}+waves" for name in WAVES_CASES),
        *(f"{name}+shifted" for name in SHIFTED_CASES),
        *(f"{name}+registers" for name in REGISTERS_CASES),
    ],
)
def test_packed_kernel_matches_reference(interpreted: dict, name: str) -> None:
    m = interpreted[name]
    assert m["out_dtype_ok"] and not m["nan"], m
    assert m["out_rel"] < TOLERANCE[m["dtype"]], m
    assert m["lse_rel"] < LSE_TOLERANCE[m["dtype"]], m
    assert m["lse_inf_where_ref"] and m["dead_out_zero"], m


@pytest.mark.parametrize(
    "name",
    [
        *(f"pair:{name}{window}" for name in PAIRS for window in ("", "+window")),
        "pair:zipcache_pair_bf16+whole",
        "pair:zipcache_pair_fp16+window+whole",
        "pair:zipcache_pair_bf16+window+scale",
        "pair:split_pair_fp16+scale",
        "pair:zipcache_pair_bf16+window+unmasked",
        "pair:zipcache_pair_fp16+window+rows16",
        "pair:zipcache_pair_bf16+window+capped",
        "pair:zipcache_pair_fp16+window+shifted",
    ],
)
def test_packed_sets_match_the_merged_references(interpreted: dict, name: str) -> None:
    """Two stores and a window as one attention: ZipCache's sets (and per-token keys beside a set) in one
    launch of the plane kernel (both sets' programs, the window's, one combine), a pair the split kernel
    takes as two calls merged."""
    m = interpreted[name]
    assert m["one_launch"] == (not name.startswith("pair:split")), m
    assert m["out_dtype_ok"] and not m["nan"], m
    assert m["out_rel"] < TOLERANCE[m["dtype"]], m
    assert m["lse_rel"] < LSE_TOLERANCE[m["dtype"]], m
    assert m["lse_inf_where_ref"] and m["dead_out_zero"], m


@pytest.mark.parametrize("name", RING_CASES)
def test_a_ring_window_by_its_counters_equals_its_positions(interpreted: dict, name: str) -> None:
    """A quantized layer passes its window's counters (tokens seen and quantized), not positions computed
    each step: the plane kernel derives the live slots itself, and must find the same ones."""
    m = interpreted[f"ring:{name}"]
    assert m["same"] and m["live_slots"] > 0 and m["states"] == len(RING_COUNTERS), m


def test_ring_positions_are_where_the_ring_put_each_token() -> None:
    """Token t is written at slot t mod R; a slot holds the last token written to it, live from `quantized`
    on. Checked against writing the tokens one by one."""
    for seen, quantized in RING_COUNTERS:
        slots = [-1] * RING
        for token in range(seen):
            slots[token % RING] = token
        want = [t if t >= quantized else -1 for t in slots]
        got = quant_kernels.ring_positions(torch.tensor([seen]), torch.tensor([quantized]), RING, 3)
        assert got.shape == (1, 3, RING) and (got == torch.tensor(want)).all(), (seen, quantized)


def test_a_shared_split_target_is_split_by_slots_for_few_heads() -> None:
    """With `pair_shared_target` (the default) the two sets plan for shares of one target that add up to it,
    by slots, up to FEW_HEADS (sequence, KV head) pairs; above (where the target is already two waves), and
    without it, each plans for the whole (the pair launch then holds about twice one store's programs)."""
    shared = quant_kernels.LaunchConfig()
    few, many = quant_kernels.FEW_HEADS, quant_kernels.FEW_HEADS + 1
    assert plane_kernel.pair_shares(600, 400, few, shared) == (0.6, 0.4)
    assert plane_kernel.pair_shares(600, 400, many, shared) == (1.0, 1.0)
    whole = quant_kernels.LaunchConfig(pair_shared_target=False)
    assert plane_kernel.pair_shares(600, 400, 8, whole) == (1.0, 1.0)
    assert plane_kernel.pair_shares(0, 0, 8, shared) == (1.0, 1.0)


def test_list_scheduling_starts_each_program_where_one_ends() -> None:
    """`list_schedule_time`: programs in launch order, each on the first resident slot to free (round robin
    would put 4 + 1 + 1 on one slot of two: 6; the longest first would end [1, 1, 4] at 4, not 5)."""
    assert plane_kernel.list_schedule_time([4.0, 1.0, 1.0, 1.0, 1.0], 2) == 4.0
    assert plane_kernel.list_schedule_time([1.0, 1.0, 4.0], 2) == 5.0
    assert plane_kernel.list_schedule_time([3.0, 3.0, 3.0], 2) == 6.0
    assert plane_kernel.list_schedule_time([1.0] * 9, 4) == 3.0
    assert plane_kernel.list_schedule_time([2.0, 5.0], 8) == 5.0
    assert plane_kernel.list_schedule_time([], 4) == 0.0


def test_a_pair_above_few_heads_takes_the_target_its_waves_favour() -> None:
    """ZipCache's two sets (60% of the slots at 4 bits, 40% at 2, a ring window of 100) on 132 SMs: at 32k batch
    4 the H100 measured 85.9 us at 4 programs an SM against 98.0 at 8 (the default), at 128k batch 4 291.1 at
    8 against 338.2 at 4; `wave_target` picks those. Where every target gives the same plan (one split
    each), the launch's own target stays, whatever it is."""
    launch = quant_kernels.LaunchConfig()

    def target(slots: int, batch: int, own: quant_kernels.LaunchConfig = launch) -> int:
        high = int(0.6 * slots)
        return plane_kernel.wave_target(((high, 4), (slots - high, 2)), 100, 8 * batch, 132, own)

    assert target(32768, 4) == 4
    assert target(131072, 4) == 8
    assert target(64, 4) == 8
    # a set with no slots plans one empty split, as `_split_plan` does
    assert plane_kernel.wave_target(((0, 4), (0, 2)), 0, 32, 132, launch) == 8
    assert target(64, 4, quant_kernels.LaunchConfig(programs_per_sm_many_heads=9)) == 9


def test_a_pair_launch_above_few_heads_plans_the_wave_target(interpreted: dict) -> None:
    """The pair launch above FEW_HEADS pairs (18 here, on the interpreter's 4 "SMs") plans both sets' splits
    with `wave_target`'s choice, one split each where the default target would give two."""
    launch = quant_kernels.LaunchConfig()
    b, hkv, _, _, _, (slots, *_), (slots_2, *_) = PAIRS["zipcache_pair_many_heads"]
    target = plane_kernel.wave_target(((slots, 4), (slots_2, 2)), 70, b * hkv, 4, launch)
    wave = dataclasses.replace(launch, programs_per_sm_many_heads=target)

    def plan(launch: quant_kernels.LaunchConfig) -> list[list[int]]:
        return [list(quant_kernels._split_plan(b * hkv, s, 4, launch))[::-1] for s in (slots, slots_2)]

    assert plan(wave) != plan(launch)
    assert interpreted["pair:zipcache_pair_many_heads+window"]["launched_splits"] == [plan(wave)]


def test_the_offset_form_runs_where_the_launch_allows_it(interpreted: dict) -> None:
    """Codes as 2^m + c (OFFSET) run for per-token keys with summed value zero-points and a 16-bit query: at 4
    bits under the default launch, at 2 bits under its `offset_crumbs` (not where a case's launch turns that
    off), never in float32. Each such case matches the reference (`test_packed_kernel_matches_reference`)."""
    cases = {name: m for name, m in interpreted.items() if not name.startswith(("pair:", "ring:", "compiled:"))}
    for name, m in cases.items():
        launch = LAUNCHES.get(name.split("+")[0], quant_kernels.LaunchConfig())  # suffixes keep these fields
        expected = (
            m["kernel"] == "plane"
            and m["key_mode"] == "token"
            and m["key_groups"] == 1
            and m["zero_sums"]
            and m["dtype"] != "float32"
            and all(bits == 4 or launch.offset_crumbs for bits in m["bits"])
        )
        assert m["offset"] == (expected and launch.offset_codes), name
    assert cases["quarot2_offset_bf16"]["offset"] and cases["offset2_fp16+window"]["offset"]
    assert cases["quarot2_offset_bf16+rotation"]["offset"] and cases["quarot4_offset_bf16"]["offset"]
    assert not cases["quarot2_subtract_bf16"]["offset"]


def test_the_weighted_forms_run_by_default(interpreted: dict) -> None:
    """By default (`weighted_crumbs`), where the offset form runs and both stores' codes are 2-bit, they are
    converted with their planes' weights (WEIGHTED), and ZipCache's prompt sets' keys as offset codes
    (`lead_offset_keys`: K_OFFSET) for a 16-bit query; with both flags off (the "+shifted" cases) neither. Each
    case matches the reference (`test_packed_kernel_matches_reference`)."""
    for name, m in interpreted.items():
        if name.startswith(("pair:", "ring:", "compiled:")):
            continue
        asked = not name.endswith("+shifted")
        assert m["weighted"] == (asked and m["offset"] and m["bits"] == [2, 2]), name
        prompt_keys = m["kernel"] == "plane" and m["key_mode"] == "lead" and m["bits"][0] in (2, 4)
        assert m["k_weighted"] == (asked and prompt_keys and m["dtype"] != "float32"), name
    assert all(interpreted[name]["weighted"] for name in SHIFTED_CASES[:3])
    assert all(interpreted[name]["k_weighted"] for name in SHIFTED_CASES[3:])
    assert not any(interpreted[f"{name}+shifted"]["weighted"] for name in SHIFTED_CASES[:3])
    assert not any(interpreted[f"{name}+shifted"]["k_weighted"] for name in SHIFTED_CASES[3:])


def test_the_rotated_query_is_reloaded_unless_asked_not_to(interpreted: dict) -> None:
    """QuaRot's rotated query planes go through the program's partial-output rows (ROTATE 2) by default, stay
    in registers (ROTATE 1) where `reload_rotated_query` is off, and neither runs without a rotation; the
    outputs match the reference each way (`test_packed_kernel_matches_reference`)."""
    for name, m in interpreted.items():
        if name.startswith(("pair:", "ring:", "compiled:")) or m["kernel"] != "plane":
            continue
        expected = 0 if not m["rotation"] else 1 if name.endswith("+registers") else 2
        assert m["rotate"] == expected, name
    assert all(interpreted[name]["rotate"] == 2 for name in REGISTERS_CASES)


def test_a_single_store_above_few_heads_takes_its_wave_target_when_asked(interpreted: dict) -> None:
    """With `store_wave_target`, a single store's launch above FEW_HEADS pairs plans its splits with
    `wave_target`'s choice (here 3 a pair where the many-heads target plans 2); without it, the many-heads
    target's. The outputs match the reference either way (`test_packed_kernel_matches_reference`)."""
    b, hkv, _, slots, _, (bits, *_), _, _ = CASES["int2_many_heads_bf16"]
    launch = plane_kernel.plane_launch(quant_kernels.LaunchConfig(), True, "token", b * hkv, slots)
    target = plane_kernel.wave_target(((slots, bits),), 70, b * hkv, 4, launch)
    default_splits = quant_kernels._split_plan(b * hkv, slots, 4, launch)[0]
    wave_splits = quant_kernels._split_plan(
        b * hkv, slots, 4, dataclasses.replace(launch, programs_per_sm_many_heads=target)
    )[0]
    assert wave_splits != default_splits
    assert interpreted["int2_many_heads_bf16+window+waves"]["launched_grid"] == [b * hkv, wave_splits + 1]  # + window
    assert interpreted["int2_many_heads_bf16"]["launched_grid"] == [b * hkv, default_splits]


def test_kivis_halves_take_their_wave_target_by_default() -> None:
    """KIVI's layout ("halves") above FEW_HEADS pairs plans a single store's splits by `wave_target` unless
    `halves_wave_target` is off (then the many-heads target's); per-token keys keep the many-heads target
    unless `store_wave_target` asks for every key mode. Planned only (`_store_launch`), on the interpreter's 4
    "SMs"."""
    b, hkv, slots, d = 3, 6, 1500, 64
    gen = torch.Generator().manual_seed(0)
    query, lengths = torch.randn(b, hkv * 4, d).half(), torch.full((b,), slots)
    kivi = (_layout(b, hkv, slots, d, (2, 32, 1, None), gen), _layout(b, hkv, slots, d, (2, 1, 16, None), gen))
    token = (_layout(b, hkv, slots, d, (2, 1, 64, None), gen), _layout(b, hkv, slots, d, (2, 1, 64, None), gen))

    def splits(stores: tuple[PackedSlots, PackedSlots], launch: quant_kernels.LaunchConfig) -> int:
        return plane_kernel._store_launch(query, *stores, lengths, launch, window_slots=128).splits[1]

    def planned(stores: tuple[PackedSlots, PackedSlots], by_waves: bool) -> int:
        launch = plane_kernel.store_launch(*stores, quant_kernels.LaunchConfig())[2]
        if by_waves:
            target = plane_kernel.wave_target(((slots, 2),), 128, b * hkv, 4, launch)
            launch = dataclasses.replace(launch, programs_per_sm_many_heads=target)
        return quant_kernels._split_plan(b * hkv, slots, 4, launch)[0]

    default, fixed = quant_kernels.LaunchConfig(), quant_kernels.LaunchConfig(halves_wave_target=False)
    assert plane_kernel.store_launch(*kivi, default)[0] == "halves"
    assert planned(kivi, True) != planned(kivi, False)
    assert splits(kivi, default) == planned(kivi, True)
    assert splits(kivi, fixed) == planned(kivi, False)
    assert planned(token, True) != planned(token, False)
    assert splits(token, default) == planned(token, False)
    assert splits(token, quant_kernels.LaunchConfig(store_wave_target=True)) == planned(token, True)


def test_per_token_two_bit_codes_at_batch_64_take_one_wave_by_the_estimate() -> None:
    """Llama-3.1-8B's shape at 8k batch 64 (512 pairs, 132 SMs): per-token 2-bit codes (QuaRot-2, RTN-2) run one
    warp a program, 8 resident an SM; the many-heads target (8) plans 3 splits a pair, 1.45 waves of programs,
    and the estimate prefers 2 splits (4 programs an SM: one wave). KIVI's capped launch holds 16 warps an SM."""
    launch = plane_kernel.plane_launch(quant_kernels.LaunchConfig(), True, "token", 512, 8192)
    assert launch.num_warps == 1 and plane_kernel.resident_warps(launch) == 8
    assert quant_kernels._split_plan(512, 8192, 132, launch)[0] == 3
    target = plane_kernel.wave_target(((8192, 2),), 128, 512, 132, launch)
    assert target == 4
    waves = dataclasses.replace(launch, programs_per_sm_many_heads=target)
    assert quant_kernels._split_plan(512, 8192, 132, waves)[0] == 2
    assert plane_kernel.resident_warps(quant_kernels.LaunchConfig(max_registers=128)) == 16


def test_merging_one_piece_returns_it() -> None:
    """A merge of one piece is the piece itself, no kernels: one piece merged cost ~32 us a call on the H100,
    counted into every single-store row of `quant_attention.py` at d653965."""
    gen = torch.Generator().manual_seed(0)
    piece = (torch.randn(2, 4, 8, generator=gen).bfloat16(), torch.randn(2, 4, generator=gen))
    out, lse = quant_kernels.merge_attention([piece])
    assert out is piece[0] and lse is piece[1]
    two = quant_kernels.merge_attention([piece, (piece[0], torch.full_like(piece[1], float("-inf")))])
    assert torch.equal(two[0], piece[0]) and torch.allclose(two[1], piece[1])  # an empty piece changes nothing


def test_cases_cover_the_hard_paths(interpreted: dict) -> None:
    """Every way each kernel applies parameters, for K and V, every bit width, tiles aligned to key rows
    from a lead that is not a multiple of the tile, one split and many, sequences with no live slot."""
    cases = [m for name, m in interpreted.items() if not name.startswith(("pair:", "ring:", "compiled:"))]
    packed = [m for m in cases if m["kernel"] == "packed"]
    assert {m["key_mode"] for m in packed} == {"slot", "row", "lead", "rows", "columns", "gather"}
    assert {m["value_mode"] for m in packed} == {"slot", "columns", "gather"}
    assert {bits for m in packed for bits in m["bits"]} == {2, 3, 4, 8}  # planar rows read code by code too
    assert {m["key_mode"] for m in packed if m["lead_misaligned"]} >= {"row", "lead", "rows"}
    plane = [m for m in cases if m["kernel"] == "plane"]
    assert {m["key_mode"] for m in plane} == {"token", "row", "lead", "halves", "rows"}
    assert {m["value_mode"] for m in plane} >= {"token/1", "token/2", "token/4"}  # parameter columns
    assert {bits for m in plane for bits in m["bits"]} == {2, 4}
    assert {m["dtype"] for m in plane if 2 in m["bits"]} == {"float32", "float16", "bfloat16"}
    assert {m["dtype"] for m in plane} == {"float32", "float16", "bfloat16"}
    assert {m["dtype"] for m in plane if m["key_mode"] == "rows"} >= {"float16", "bfloat16"}  # bf16 runs as fp32
    assert {m["key_mode"] for m in plane if m["lead_misaligned"]} >= {"row", "lead", "halves", "rows"}
    # ZipCache's keys ("lead"): both branches (the folded prompt set, the decode blocks read per slot) in
    # both kernels, in every query dtype, with a window; off (the launch's fold_lead), per slot throughout
    for kernel in ("packed", "plane"):
        lead = [m for m in cases if m["kernel"] == kernel and m["key_mode"] == "lead"]
        assert any(m["lead_misaligned"] and m["both_sides_of_lead"] for m in lead), kernel
        assert {m["dtype"] for m in lead} == {"float32", "float16", "bfloat16"}, kernel
        assert any(m["window"] for m in lead), kernel
    assert interpreted["zipcache4_lead_off_fp16"]["key_mode"] == "rows"
    assert {m["kernel"] for m in cases if m["window"]} == {"plane", "packed"}
    # channel scales: in the plane kernel's combine (with its window, and after its rotation), after the merge
    scaled = {(m["kernel"], m["window"], m["rotation"]) for m in cases if m["scale"]}
    assert scaled == {("plane", True, False), ("packed", True, False), ("plane", False, True)}, scaled
    # the unmasked inner tiles: every key mode of the plane kernel, tiles misaligned to the split's start
    unmasked = [m for m in cases if m["unmasked"]]
    assert {m["key_mode"] for m in unmasked} == {"token", "row", "lead", "halves", "rows"}, unmasked
    assert all(m["kernel"] == "plane" for m in unmasked)
    assert {m["key_mode"] for m in unmasked if m["lead_misaligned"]} >= {"row", "lead", "halves", "rows"}
    # query rows as launched: the group's (1, 2, 4: the default), a group of 3 in 4, past the group (8 for
    # per-token keys, 16 for every key mode); one launch a case
    assert all(m["launches"] == 1 for m in plane) and not any(m["launches"] for m in packed)
    assert {m["query_block"] for m in plane if m["query_block"] == m["group"]} >= {1, 2, 4}
    assert {m["key_mode"] for m in plane if m["query_block"] == m["group"]} >= {"row", "lead", "halves", "rows"}
    assert {m["key_mode"] for m in plane if m["query_block"] > m["group"]} == {"token", "row", "lead", "halves", "rows"}
    assert {m["query_block"] for m in plane} == {1, 2, 4, 8, 16}
    assert interpreted["halves_group3_fp16"]["query_block"] == 4
    assert interpreted["kivi2_mha_bf16"]["query_block"] == 1
    assert interpreted["pair:zipcache_pair_bf16+window"]["launched_query_rows"] == [4]
    assert interpreted["pair:zipcache_pair_fp16+window+rows16"]["launched_query_rows"] == [16]
    assert interpreted["pair:lead_token_pair_bf16"]["launched_query_rows"] == [8]  # the second store's
    # products with the codes first (per-token keys, KIVI's "halves"; with and without a window, a rotation)
    # and with the query rows first (every other key mode, and those two with the launch's codes_first off)
    codes_first = {(m["key_mode"], m["window"], m["rotation"]) for m in plane if m["codes_first"]}
    assert {mode for mode, _, _ in codes_first} == set(plane_kernel.CODES_FIRST_KEY_MODES)
    assert {(window, rotation) for _, window, rotation in codes_first} >= {(False, False), (True, False), (False, True)}
    assert {m["key_mode"] for m in plane if not m["codes_first"]} == {"token", "row", "lead", "halves", "rows"}
    assert {bits for m in plane if m["codes_first"] for bits in m["bits"]} == {2, 4}
    assert any(m["key_mode"] == "halves" and m["window"] for m in plane if m["codes_first"])
    assert any(not m["zero_sums"] for m in plane if m["codes_first"])  # the zero-point product, codes first
    # the window's tile: 16 slots with the codes first, the launch's tile with the query rows first
    windowed = [m for m in plane if m["window"]]
    assert {m["window_block"] for m in windowed if m["codes_first"]} == {plane_kernel.WINDOW_BLOCK_CODES_FIRST}
    assert {m["window_block"] for m in windowed if not m["codes_first"]} >= {64}
    assert interpreted["pair:zipcache_pair_bf16+window"]["launched_codes_first"] == [False]
    # a register cap reaches the launch (the opaque operators): KIVI's "halves" (codes first) at
    # `halves_max_registers` unless the case's launch sets it to 0, the other key modes only with the launch's
    # `max_registers` (one store or a pair)
    halves_cap = quant_kernels.LaunchConfig().halves_max_registers
    for name, m in interpreted.items():
        if m.get("max_registers") is None:  # no single-store plane launch
            continue
        if m["key_mode"] == "halves" and m["codes_first"]:
            expected = 0 if name.endswith("+uncapped") else halves_cap
        else:
            expected = CAPPED["max_registers"] if name.endswith("+capped") else 0
        assert m["max_registers"] == expected, name
    assert {name for name, m in interpreted.items() if name.endswith("+capped") and m.get("max_registers")} == {
        f"{name}+capped" for name in CAPPED_CASES
    }
    assert sum(bool(m.get("max_registers")) and m["key_mode"] == "halves" for m in interpreted.values()) >= 4
    assert interpreted["pair:zipcache_pair_bf16+window+capped"]["launched_max_registers"] == [128]
    assert interpreted["pair:zipcache_pair_bf16+window"]["launched_max_registers"] == [0]
    assert interpreted["pair:lead_token_pair_bf16"]["launched_codes_first"] == [False]  # not both stores
    assert {(m["window"], m["rotation"]) for m in cases if m["offset"]} == {
        (False, False),
        (True, False),
        (False, True),
    }
    assert {m["dtype"] for m in cases if m["offset"]} == {"bfloat16", "float16"}
    assert {(m["window"], m["rotation"]) for m in cases if m["zero_sums"]} == {
        (False, False),
        (True, False),
        (False, True),
    }
    # and one value zero-point per slot through the product, the launch's zero_row_sums=False
    assert any(m["value_mode"] == "token/1" and not m["zero_sums"] for m in plane)
    assert {(m["kernel"], m["window"]) for m in cases if m["rotation"]} == {
        ("plane", False),
        ("plane", True),
        ("packed", False),
    }
    assert min(m["splits"] for m in cases) == 1
    assert max(m["splits"] for m in cases) > 4
    assert sum(m["dead_rows"] for m in cases) > 0


def test_a_capped_launch_compiles_whole_and_matches_eager(interpreted: dict) -> None:
    """torch.compile(fullgraph) over KIVI's default (capped) launch: its graph calls the opaque operator (the
    launch recorded with the cap), which gives the eager outputs exactly. (Under the interpreter the traced
    operator does not compile either, so this pins the operator chosen and its outputs, not why a cap needs it.)"""
    m = interpreted["compiled:capped"]
    assert m["same"] and m["launched_max_registers"] == [quant_kernels.LaunchConfig().halves_max_registers], m


def test_a_register_cap_launches_straight_to_triton(monkeypatch) -> None:
    """With `max_registers` the launch goes to the kernel itself with ptxas's `maxnreg` (Inductor's copy of a
    kernel would drop it); without, through `wrap_triton` and with no cap."""
    if kernels.triton is None:
        pytest.skip("no Triton")
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("direct", grid, args, kwargs))

    def wrap(kernel):
        return {(1, 2): lambda *args, **kwargs: calls.append(("wrapped", (1, 2), args, kwargs))}

    monkeypatch.setattr(plane_kernel, "wrap_triton", wrap)
    for cap in (0, 96):
        launch = quant_kernels.LaunchConfig(num_warps=2, num_stages=3, max_registers=cap)
        plane_kernel._launch(Kernel(), (1, 2), [7, 8], {"BLOCK_N": 64}, launch)
    (how, _, args, plain), (capped_how, _, capped_args, capped) = calls
    assert (how, capped_how) == ("wrapped", "direct") and args == capped_args == (7, 8)
    assert plain == {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3}
    assert capped == {**plain, "maxnreg": 96}


def test_the_operators_follow_the_first_stores_cap() -> None:
    """The opaque operators exactly where the launch the kernel gets has a cap: the first store's launch, for a
    pair under their shared launch (`pair_launch`: a "halves" store beside a "lead" one is not codes-first, so
    not under KIVI's cap, but under `max_registers`); two stores whose caps differ are not paired."""
    opaque = (torch.ops.kvbench.plane_attention_opaque, torch.ops.kvbench.plane_pair_attention_opaque)
    traced = (torch.ops.kvbench.plane_attention, torch.ops.kvbench.plane_pair_attention)
    kivi, token, lead = (
        (x["keys"], x["values"])
        for x in (_case_inputs(name, seed=0) for name in ("kivi4_halves_bf16", "quarot4_bf16", "zipcache4_lead_bf16"))
    )
    default, others_capped = quant_kernels.LaunchConfig(), quant_kernels.LaunchConfig(max_registers=96)
    halves_uncapped = quant_kernels.LaunchConfig(halves_max_registers=0)
    for first, second, launch, operators in (
        (kivi, None, default, opaque),  # KIVI's "halves": capped by default
        (kivi, None, halves_uncapped, traced),
        (token, None, default, traced),
        (token, None, others_capped, opaque),
        (kivi, lead, default, traced),  # the pair's launch: not codes-first, so no KIVI cap
        (kivi, lead, dataclasses.replace(halves_uncapped, max_registers=96), opaque),
    ):
        assert plane_kernel.plane_operators(first, launch, second) == operators, (launch, second is None)
        shared = launch if second is None else plane_kernel.pair_launch(first, second, launch)
        assert bool(plane_kernel.store_launch(*first, shared)[2].max_registers) == (operators == opaque)
    assert plane_kernel.pair_fits(kivi, lead, default)
    assert not plane_kernel.pair_fits(kivi, token, default)  # both codes-first: KIVI's cap, the token store's none
    assert plane_kernel.pair_fits(kivi, token, halves_uncapped)


def test_summed_zero_points_take_one_warp_from_enough_slots() -> None:
    """QuaRot's and RTN's layout (per-token keys, summed value zero-points) runs one warp a program at the
    many-heads target from `one_warp_summed_slots` pairs x slots on (32k batch 4, 128k batch 1); smaller
    launches, KIVI's layout and ZipCache's "lead" keys (which spill at one warp) keep the default."""
    launch = quant_kernels.LaunchConfig()
    big = plane_kernel.plane_launch(launch, True, "token", 8, 131072)
    assert (big.num_warps, big.programs_per_sm) == (1, launch.programs_per_sm_many_heads)
    assert big.query_rows == launch.query_rows_token_keys  # one warp or two, per-token keys take their rows
    assert plane_kernel.plane_launch(launch, True, "token", 32, 32768).num_warps == 1
    token_rows = dataclasses.replace(launch, query_rows=launch.query_rows_token_keys)
    assert plane_kernel.plane_launch(launch, True, "token", 8, 32768) == token_rows
    assert plane_kernel.plane_launch(launch, False, "halves", 32, 131072).num_warps == launch.num_warps
    assert plane_kernel.plane_launch(launch, True, "lead", 32, 131072) == dataclasses.replace(launch, codes_first=False)


def test_codes_go_first_for_per_token_keys_and_kivis_halves() -> None:
    """The products take the codes first for the key modes where it was faster (`CODES_FIRST_KEY_MODES`),
    KIVI's "halves" then at its own split targets; the launch's codes_first off, no key mode does."""
    launch = quant_kernels.LaunchConfig()
    modes = ("token", "halves", "lead", "row", "rows")
    launches = {mode: plane_kernel.plane_launch(launch, False, mode, 8, 4096) for mode in modes}
    assert [launches[mode].codes_first for mode in modes] == [True, True, False, False, False]
    halves = launches["halves"]
    assert (halves.programs_per_sm, halves.programs_per_sm_many_heads) == launch.halves_programs_per_sm
    assert halves.max_registers == launch.halves_max_registers > 0
    assert {launches[mode].max_registers for mode in modes if mode != "halves"} == {launch.max_registers}
    assert launches["token"].programs_per_sm == launch.programs_per_sm
    off = dataclasses.replace(launch, codes_first=False)
    assert not any(plane_kernel.plane_launch(off, False, mode, 8, 4096).codes_first for mode in modes)
    off_halves = plane_kernel.plane_launch(off, False, "halves", 8, 4096)
    assert (off_halves.programs_per_sm, off_halves.programs_per_sm_many_heads) == (
        launch.programs_per_sm,
        launch.programs_per_sm_many_heads,
    )


def test_query_rows_follow_the_group_and_per_token_keys_take_eight() -> None:
    """The plane kernel's query rows a tile: the group's, rounded up to a power of two (Triton pads the
    tensor-core product itself), per-token keys at least `query_rows_token_keys` (8: faster on the H100 than
    4 or 16), never fewer than the group's, whatever the launch asks."""
    launch = quant_kernels.LaunchConfig()
    rows = {mode: plane_kernel.plane_launch(launch, False, mode, 8, 4096) for mode in ("token", "halves", "lead")}
    assert [plane_kernel.query_block(rows[mode], 4) for mode in rows] == [8, 4, 4]
    assert [plane_kernel.query_block(launch, group) for group in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16]
    assert plane_kernel.query_block(dataclasses.replace(launch, query_rows=16), 4) == 16
    assert plane_kernel.query_block(dataclasses.replace(launch, query_rows=6), 4) == 8  # rounded up
    assert plane_kernel.query_block(rows["token"], 32) == 32


def test_split_target_grows_with_the_pairs() -> None:
    """Up to FEW_HEADS (sequence, KV head) pairs a launch aims at `programs_per_sm` programs an SM, above at
    `programs_per_sm_many_heads` (the H200 sweep's choice: 4 and 8 at 2 warps)."""
    launch = quant_kernels.LaunchConfig(programs_per_sm=4, programs_per_sm_many_heads=8)
    few, many = quant_kernels.FEW_HEADS, 2 * quant_kernels.FEW_HEADS
    assert quant_kernels._split_plan(few, 1 << 20, 132, launch)[0] == -(-4 * 132 // few)
    assert quant_kernels._split_plan(many, 1 << 20, 132, launch)[0] == -(-8 * 132 // many)


def test_reference_reads_the_packed_layout() -> None:
    """The reference (which the kernel is held to) against `kvbench.quant`: packed slots made by `quantize`
    dequantize to `dequantize`'s values, and attention over them is plain attention over those values."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 64, 32, generator=gen)
    k, v = quantize(x, 4, "channel", 16), quantize(x.flip(2), 3, "token", 8)
    lead = torch.tensor([16, 16])
    keys = PackedSlots(*k, lead, 4, 16, 1)
    values = PackedSlots(*v, torch.tensor([1, 1]), 3, 1, 8)
    assert torch.equal(quant_kernels.dequantize_slots(keys), dequantize(k, 4, "channel", 16))
    assert torch.equal(quant_kernels.dequantize_slots(values), dequantize(v, 3, "token", 8))
    query = torch.randn(2, 4, 32, generator=gen)
    lengths = torch.tensor([64, 20])
    out, lse = packed_decode_attention_reference(query, keys, values, lengths, 0.2)
    positions = kernels.positions_from_lengths(lengths, 64, 2)
    dense = kernels.decode_attention_reference(
        query, dequantize(k, 4, "channel", 16), dequantize(v, 3, "token", 8), positions, 0.2
    )
    assert torch.equal(out, dense[0]) and torch.equal(lse, dense[1])


def test_cpu_op_runs_the_reference_and_compiles_whole() -> None:
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: CPU tensors go to the interpreted kernel")
    x = _case_inputs("zipcache_sets", seed=1)
    args = (x["query"], x["keys"], x["values"], x["lengths"], x["scale"])
    out, lse = packed_decode_attention(*args)
    ref_out, ref_lse = packed_decode_attention_reference(*args)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)

    def step(query, keys, values, lengths):
        return packed_decode_attention(query, keys, values, lengths, x["scale"])

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args[:4])
    assert torch.equal(compiled[0], out) and torch.equal(compiled[1], lse)


@pytest.mark.parametrize(
    ("dtype", "bits", "key_mode", "value_mode"),
    [
        ("bf16", 4, "slot", "slot"),
        ("bf16", 2, "rows", "columns"),
        ("fp16", 3, "row", "gather"),
        ("fp32", 8, "gather", "slot"),
        ("bf16", 3, "lead", "slot"),  # ZipCache's keys at 3 bits (its 2-bit rest is the plane kernel's)
        ("fp16", 3, "lead", "columns"),
    ],
)
def test_packed_kernel_compiles_for_hopper(dtype: str, bits: int, key_mode: str, value_mode: str) -> None:
    """Lowered for sm_90 with Triton's bundled ptxas (no GPU needed): catches what the interpreter cannot,
    including bfloat16's offset codes, which the interpreter never runs (its bfloat16 dots go to float32)."""
    pointers = {"q_ptr": f"*{dtype}", "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "scale_log2": "fp32"}
    pointers |= {name: "*u8" for name in ("kc_ptr", "vc_ptr")} | {
        name: "*fp16" for name in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")
    }
    pointers |= {name: "*i64" for name in ("k_lead_ptr", "v_lead_ptr", "len_ptr")}
    layouts = {"slot": (1, 128), "row": (64, 1), "rows": (32, 1), "columns": (1, 32), "gather": (24, 1)}
    layouts |= {"lead": (40, 1)}
    constexprs = {
        "K_BITS": bits, "K_ROW_TOKENS": layouts[key_mode][0], "K_COL_CHANNELS": layouts[key_mode][1],
        "K_MODE": key_mode, "V_BITS": bits, "V_ROW_TOKENS": layouts[value_mode][0],
        "V_COL_CHANNELS": layouts[value_mode][1], "V_MODE": value_mode, "BLOCK_G": 16, "BLOCK_N": 64,
        "K_PAIRS": dtype != "fp32" and bits == 3,  # 2-bit rows are planar, read code by code
        "V_PAIRS": dtype != "fp32" and bits == 3,
        "BLOCK_D": 128, "BLOCK_DV": 128, "UPCAST": False, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "HEAD_DIM": 128, "VALUE_DIM": 128, "K_ROW_BYTES": 128 * bits // 8, "V_ROW_BYTES": 128 * bits // 8,
    }  # fmt: skip
    assert compile_for_hopper(quant_kernels._packed_split_kernel, pointers, constexprs).asm["cubin"]


@pytest.mark.parametrize(
    ("dtype", "key_mode", "groups", "zero_sums", "offset", "bits", "unmasked", "rows", "flip"),
    [
        *(
            (*case, True)  # the other operand first: query rows first where codes go first, and the reverse
            for case in (
                ("bf16", "token", 1, True, True, 4, False, 0),
                ("fp16", "token", 4, False, False, 4, False, 0),
                ("bf16", "halves", 4, False, False, 4, False, 0),
                ("fp16", "halves", 4, False, False, 2, False, 0),
                ("bf16", "lead", 1, True, False, 2, False, 0),
                ("fp16", "row", 4, False, False, 4, False, 0),
            )
        ),
        *(
            (*case, False)
            for case in (
                ("bf16", "token", 1, False, False, 4, False, 0),
                ("bf16", "token", 1, True, False, 4, False, 0),  # the launch's `zero_row_sums`
                ("bf16", "token", 1, True, True, 4, False, 0),  # and its `offset_codes`: the offset nibble PTX
                ("fp16", "token", 1, True, True, 4, False, 0),
                ("fp16", "row", 4, False, False, 4, False, 0),
                ("fp16", "token", 4, False, False, 4, False, 0),
                ("bf16", "rows", 4, False, False, 4, False, 0),
                ("bf16", "halves", 4, False, False, 4, False, 0),
                # ZipCache's salient set: values with one zero-point per slot
                ("bf16", "lead", 1, True, False, 4, False, 0),
                ("fp16", "lead", 1, True, False, 4, False, 0),
                # ZipCache's 2-bit rest: the 2-bit PTX (`_bf16_crumbs`)
                ("bf16", "lead", 1, True, False, 2, False, 0),
                ("fp16", "halves", 4, False, False, 2, False, 0),  # KIVI-2 (`_f16_crumbs`)
                # QuaRot-2's and RTN-2's layout in the offset form (`offset_crumbs`: `_bf16_offset_crumbs`)
                ("bf16", "token", 1, True, True, 2, False, 0),
                ("fp16", "token", 1, True, True, 2, False, 0),
                # and masked in place with their planes' weights (`weighted_crumbs`: `_bf16_weighted_crumbs`)
                ("bf16", "token", 1, True, "weighted", 2, False, 0),
                ("fp16", "token", 1, True, "weighted", 2, False, 0),
                ("bf16", "lead", 1, True, "weighted", 4, False, 0),  # ZipCache's prompt sets (K_OFFSET)
                ("fp16", "lead", 1, True, "weighted", 2, False, 0),
                # the launch's `unmasked_tiles`: inner tiles in a loop of their own, without slot masks
                ("bf16", "token", 1, True, True, 4, True, 0),
                ("fp16", "token", 4, False, False, 4, True, 0),
                ("fp16", "row", 4, False, False, 4, True, 0),
                ("bf16", "rows", 4, False, False, 4, True, 0),
                ("bf16", "lead", 1, True, False, 2, True, 0),
                ("fp16", "halves", 4, False, False, 2, True, 0),
                # query rows past the group's: one tensor-core product's 16, as before they followed the group
                ("bf16", "token", 1, True, True, 4, False, 16),
                ("bf16", "halves", 4, False, False, 4, False, 16),
                ("fp16", "halves", 4, False, False, 2, False, 16),
                ("bf16", "lead", 1, True, False, 2, False, 16),
                ("bf16", "halves", 4, False, False, 2, False, 1),  # MHA: one query row a KV head
            )
        ),
    ],
)
def test_plane_kernel_compiles_for_hopper(
    dtype: str,
    key_mode: str,
    groups: int,
    zero_sums: bool,
    offset: bool | str,
    bits: int,
    unmasked: bool,
    rows: int,
    flip: bool,
) -> None:
    """`_plane_split_kernel` lowered for sm_90: its inline PTX (`_bf16_nibbles`, `_f16_nibbles`, and for 2-bit
    bytes `_bf16_crumbs`, `_f16_crumbs`) goes through ptxas here; the interpreter runs the integer path
    instead. Query rows (`rows`; 0: the default launch's for a GQA group of 4) below one product's 16 go
    through Triton's padding of the product. The products take the codes first where the default launch does
    (`plane_kernel.CODES_FIRST_KEY_MODES`), the query rows first elsewhere; `flip` compiles the other."""
    import triton.language as tl

    default = quant_kernels.LaunchConfig()
    codes_first = plane_kernel.plane_launch(default, zero_sums, key_mode, 1, 1).codes_first != flip
    offset_value = 1024.0 if dtype == "fp16" else 128.0  # the offset codes' 2^m

    pointers = {"q_ptr": f"*{dtype}", "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "scale_log2": "fp32"}
    elements = "*i16" if bits == 4 else "*u8"  # four codes: a 16-bit word or a byte
    pointers |= {"kc_ptr": elements, "vc_ptr": elements}
    pointers |= {name: "*fp16" for name in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")}
    pointers |= {"wk_ptr": f"*{dtype}", "wv_ptr": f"*{dtype}", "wpos_ptr": "*i64", "wq_ptr": "*i64"}
    pointers |= {name: "*i64" for name in ("k_lead_ptr", "v_lead_ptr", "len_ptr")}
    pointers |= {"rotation_ptr": "*i8", "rotation_scale": "fp32"}
    constexprs = {
        "HEAD_DIM": 128, "VALUE_DIM": 128, "K_BITS": bits,
        "K_ROW_TOKENS": {"token": 1, "lead": 60}.get(key_mode, 32),
        "K_GROUP": 128 // groups if key_mode == "token" else 1, "K_MODE": key_mode, "V_BITS": bits,
        "V_GROUP": 128 // groups, "BLOCK_N": 32 if key_mode == "row" else 64, "BLOCK_W": 32,
        "BLOCK_G": rows or plane_kernel.query_block(plane_kernel.plane_launch(default, False, key_mode, 1, 1), 4),
        "BLOCK_WV": 32, "DTYPE": getattr(tl, {"bf16": "bfloat16", "fp16": "float16"}[dtype]),
        "K_DTYPE": tl.float16 if key_mode in plane_kernel.DEQUANTIZED_KEY_MODES or dtype == "fp16" else tl.bfloat16,
        "PRECISION": "tf32",
        "K_ASM": True, "V_ASM": True, "HAS_WINDOW": key_mode != "row",
        "ROTATE": 2 if key_mode == "token" else 0,  # QuaRot's query rotated and reloaded (`reload_rotated_query`)
        "ZERO_SUMS": zero_sums, "OFFSET": offset_value if offset and key_mode == "token" else 0.0,
        "WEIGHTED": offset == "weighted" and key_mode == "token",
        "K_OFFSET": offset_value if offset == "weighted" and key_mode == "lead" else 0.0,
        # the window's live slots from a ring's counters (quantized layers) or read as positions
        "WINDOW_RING": key_mode in ("halves", "lead"), "UNMASKED": unmasked, "CODES_FIRST": codes_first,
        "BLOCK_NW": plane_kernel.WINDOW_BLOCK_CODES_FIRST if codes_first else 64,
    }  # fmt: skip
    compiled = compile_for_hopper(plane_kernel._plane_split_kernel, pointers, constexprs)
    assert compiled.asm["cubin"] and "lop3.b32" in compiled.asm["ptx"]  # the inline PTX is in the kernel
    assert ("prmt.b32 a," in compiled.asm["ptx"]) == (bits == 2)  # the 2-bit conversion's byte permutes
    # the offset forms convert without the packed subtract (the only packed subtracts are the conversions')
    subtracts = "sub.rn.bf16x2" in compiled.asm["ptx"] or "sub.rn.f16x2" in compiled.asm["ptx"]
    assert subtracts == (not offset or key_mode in ("halves", "lead"))  # values (and decode blocks) subtract
    assert ("0x000C000C" in compiled.asm["ptx"]) == (offset == "weighted" and bits == 2)  # plane 1 in place
    # the 4-bit offset form (`_bf16_offset_nibbles`: one scratch register, no subtract) where codes carry 2^m
    assert (".reg .b32 t;" in compiled.asm["ptx"]) == (bits == 4 and bool(offset))


def test_plane_pair_kernel_compiles_for_hopper() -> None:
    """`_plane_pair_kernel` lowered for sm_90, ZipCache's two sets in bfloat16: the 4-bit salient set's nibble
    PTX and the 2-bit rest's byte PTX in one kernel, each in its own branch, their prompt-set keys as offset
    codes as the default launch gives them."""
    import triton.language as tl

    pointers = {"q_ptr": "*bf16", "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "scale_log2": "fp32"}
    pointers |= {
        "wk_ptr": "*bf16",
        "wv_ptr": "*bf16",
        "wpos_ptr": "*i64",
        "wq_ptr": "*i64",
        "rotation_ptr": "*i8",
        "rotation_scale": "fp32",
    }
    for suffix, elements in (("", "*i16"), ("_2", "*u8")):
        pointers |= {f"kc_ptr{suffix}": elements, f"vc_ptr{suffix}": elements}
        pointers |= {f"{name}{suffix}": "*fp16" for name in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")}
        pointers |= {f"{name}{suffix}": "*i64" for name in ("k_lead_ptr", "v_lead_ptr", "len_ptr")}
    constexprs = {
        "HEAD_DIM": 128, "VALUE_DIM": 128, "BLOCK_G": 4, "BLOCK_N": 64, "BLOCK_W": 32, "BLOCK_WV": 32,
        "DTYPE": tl.bfloat16, "HAS_WINDOW": True, "ROTATE": 0, "PRECISION": "tf32", "WINDOW_RING": True,
        "UNMASKED": True, "UNMASKED_2": True, "CODES_FIRST": False, "BLOCK_NW": 64,
    }  # fmt: skip
    for suffix, bits, row_tokens in (("", 4, 60), ("_2", 2, 40)):
        constexprs |= {
            f"K_BITS{suffix}": bits, f"K_ROW_TOKENS{suffix}": row_tokens, f"K_GROUP{suffix}": 1,
            f"K_MODE{suffix}": "lead", f"V_BITS{suffix}": bits, f"V_GROUP{suffix}": 128,
            f"K_DTYPE{suffix}": tl.float16, f"K_ASM{suffix}": True, f"V_ASM{suffix}": True,
            f"ZERO_SUMS{suffix}": True, f"OFFSET{suffix}": 0.0, f"WEIGHTED{suffix}": False,
            f"K_OFFSET{suffix}": 128.0,  # the prompt sets' keys as offset codes (`lead_offset_keys`, the default)
        }  # fmt: skip
    compiled = compile_for_hopper(plane_kernel._plane_pair_kernel, pointers, constexprs, num_warps=2)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and "lop3.b32" in ptx and "prmt.b32 a," in ptx
    # the 4-bit set's offset nibbles (one scratch register) and the 2-bit set's plane 1 masked in place
    assert ".reg .b32 t;" in ptx and "0x000C000C" in ptx


@pytest.mark.parametrize(
    ("method", "key_mode"),
    [
        (KIVI(bits=4), "halves"),
        (KIVI(bits=4, group=64, window=128), "row"),
        (QuaRot(bits=4), "token"),
        (QuaRot(bits=4, rotate=False), "token"),  # RTN
        (KIVI(bits=2), "halves"),  # 2-bit rows are planar too
        (ZipCache(), "lead"),  # both sets: 4-bit salient tokens, the 2-bit rest
    ],
)
def test_methods_stores_take_the_plane_kernel(method, key_mode: str) -> None:
    """The stores the methods build (Llama-3.1-8B's head_dim) are the plane kernel's layouts: a layout change
    would send them back to the split kernel, slower on the GPU, and no other test would notice."""
    model = ModelSpec("llama-shape", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=128, max_positions=4096)
    layer = method.make_layer(LayerSpec(0, model, 1, 300, 4))
    gen = torch.Generator().manual_seed(0)
    layer.update(torch.randn(1, 2, 300, 128, generator=gen), torch.randn(1, 2, 300, 128, generator=gen))
    layer.observe(torch.randn(1, 4, 300, 128, generator=gen), None)  # ZipCache's probe queries
    layer.finish_prefill()
    assert layer.parts
    for part in layer.parts:
        plan = plane_kernel.plane_plan(part.keys.slots_view(), part.values.slots_view(), quant_kernels.LAUNCH)
        assert (plan and plan[0]) == key_mode, part.keys.spec


# ----- the layer -----
MODEL = ModelSpec("test", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32, max_positions=4096)
SCALE = 0.3


def _layer(prompt: int, decode: int, key: QuantSpec, value: QuantSpec, window: int, storage: str = "packed",
           layer_cls: type = QuantizedLayer) -> QuantizedLayer:  # fmt: skip
    return layer_cls(LayerSpec(0, MODEL, 1, prompt, decode), key, value, window, storage)


def _sequence(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, tokens, 32, generator=gen) * (1 + 4 * torch.rand(1, 1, 1, 32, generator=gen))
    values = torch.randn(1, 2, tokens, 32, generator=gen)
    queries = torch.randn(1, 4, tokens, 32, generator=gen)
    return keys, values, queries


def _run(layer: QuantizedLayer, keys, values, queries, prompt: int, chunk: int = 40) -> list[torch.Tensor]:
    """Prefill `prompt` tokens in chunks, then decode the rest; decode outputs [B, Hq, D] per step."""
    for start in range(0, prompt, chunk):
        stop = min(start + chunk, prompt)
        layer.update(keys[:, :, start:stop], values[:, :, start:stop])
    layer.finish_prefill()
    outs = []
    for t in range(prompt, keys.shape[2]):
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        outs.append(layer.attend(queries[:, :, t : t + 1], None, None, SCALE)[:, 0])
    return outs


def _expected(keys, values, queries, t: int, quantized: int, key: QuantSpec, value: QuantSpec) -> torch.Tensor:
    """Attention of query t over tokens [0, t]: the first `quantized` fake-quantized (groups counted from
    position 0), the rest as written."""
    k, v = keys[:, :, : t + 1].clone(), values[:, :, : t + 1].clone()
    k[:, :, :quantized] = fake_quantize(k[:, :, :quantized], key.bits, key.axis, key.group)
    v[:, :, :quantized] = fake_quantize(v[:, :, :quantized], value.bits, value.axis, value.group)
    positions = torch.arange(t + 1).expand(1, 2, t + 1)
    return kernels.decode_attention_reference(queries[:, :, t], k, v, positions, SCALE)[0]


KIVI_LIKE = (QuantSpec(2, "channel", 16), QuantSpec(2, "token", 16))
PER_TOKEN = (QuantSpec(4, "token", 32), QuantSpec(3, "token", 8))


@pytest.mark.parametrize(("specs", "window"), [(KIVI_LIKE, 48), (KIVI_LIKE, 16), (PER_TOKEN, 5), (PER_TOKEN, 0)])
@pytest.mark.parametrize("prompt", [30, 100])
def test_decode_sees_quantized_old_tokens_and_a_full_precision_window(specs, window: int, prompt: int) -> None:
    """Each decode step attends over: every token older than the window, quantized in whole blocks (a
    per-channel group needs all its tokens), and at most `window` newest tokens in full precision, never
    fewer than window - block + 1 once that many exist."""
    key, value = specs
    block = key.group if key.axis == "channel" else 1
    keys, values, queries = _sequence(prompt + 70, seed=prompt + window)
    layer = _layer(prompt, 70, key, value, window)
    outs = _run(layer, keys, values, queries, prompt)
    quantized_counts = set()
    for i, out in enumerate(outs):
        t = prompt + i
        # The schedule: the oldest whole blocks go once more than `window` tokens are in full precision.
        quantized = max(0, -(-(t + 1 - window) // block)) * block
        assert torch.allclose(out, _expected(keys, values, queries, t, quantized, key, value), atol=1e-5), (
            t,
            quantized,
        )
        quantized_counts.add(quantized)
    assert int(layer.quantized) == quantized
    assert len(quantized_counts) > 3  # blocks were flushed during decode


@pytest.mark.parametrize(("specs", "window"), [(KIVI_LIKE, 48), (PER_TOKEN, 0)])
def test_measured_bytes_are_codes_plus_parameters_plus_window(specs, window: int) -> None:
    key, value = specs
    prompt, decode = 100, 30
    keys, values, queries = _sequence(prompt + decode, seed=3)
    layer = _layer(prompt, decode, key, value, window)
    _run(layer, keys, values, queries, prompt)
    slots = 192  # 130 tokens, buffers aligned to 64 slots
    b, h, d = 1, 2, 32

    def store_bytes(q: QuantSpec) -> int:
        codes = slots * d * q.bits // 8
        groups = slots * d // q.group  # one float16 scale and zero-point each
        return b * h * (codes + groups * 2 * 2)

    window_bytes = b * h * (window + 1) * d * 4 * 2 if window else 0  # keys + values, float32
    held = layer.tensors()
    assert sum(t.numel() * t.element_size() for t in held.values()) == (
        store_bytes(key) + store_bytes(value) + window_bytes
    )
    assert {t.dtype for name, t in held.items() if "codes" in name} == {torch.uint8}
    assert {t.dtype for name, t in held.items() if "scale" in name or "zero" in name} == {torch.float16}


def test_simulated_storage_gives_the_packed_outputs_in_float_buffers() -> None:
    key, value = KIVI_LIKE
    keys, values, queries = _sequence(160, seed=5)
    packed = _run(_layer(100, 60, key, value, 32), keys, values, queries, 100)
    simulated_layer = _layer(100, 60, key, value, 32, storage="simulated")
    simulated = _run(simulated_layer, keys, values, queries, 100)
    for a, b in zip(packed, simulated, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert {t.dtype for t in simulated_layer.tensors().values()} == {torch.float32}


class ScaledValues(QuantizedLayer):
    """Stores values times 4 and keys times 2 (exact in float), undoing both around attention."""

    def transform_keys(self, keys):
        return keys * 2

    def transform_values(self, values):
        return values * 4

    def transform_query(self, query):
        return query / 2

    def transform_output(self, out):
        return out / 4


def test_hooks_transform_what_is_stored_and_undo_it_around_attention() -> None:
    key, value = KIVI_LIKE
    keys, values, queries = _sequence(120, seed=7)
    plain = _run(_layer(80, 40, key, value, 32), keys, values, queries, 80)
    scaled_layer = _layer(80, 40, key, value, 32, layer_cls=ScaledValues)
    scaled = _run(scaled_layer, keys, values, queries, 80)
    for a, b in zip(plain, scaled, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    stored = dequantize(
        quantize(values[:, :, :16] * 4, value.bits, value.axis, value.group), value.bits, value.axis, value.group
    )
    assert torch.equal(quant_kernels.dequantize_slots(scaled_layer.parts[0].values.slots_view())[:, :, :16], stored)


def test_stacked_layers_decode_each_sequence_as_alone() -> None:
    """Sequences of different prompt lengths in one batch: each one's flush schedule and window are its own."""
    key, value = KIVI_LIKE
    prompts, decode = (100, 61), 25
    sequences = [_sequence(p + decode, seed=p) for p in prompts]
    alone = [_run(_layer(100, decode, key, value, 32), *s, p) for s, p in zip(sequences, prompts, strict=True)]
    layers = []
    for (keys, values, _), p in zip(sequences, prompts, strict=True):
        layer = _layer(100, decode, key, value, 32)
        layer.update(keys[:, :, :p], values[:, :, :p])
        layer.finish_prefill()
        layers.append(layer)
    stacked = QuantizedLayer.stack(layers)
    for i in range(decode):
        k = torch.cat([s[0][:, :, p + i : p + i + 1] for s, p in zip(sequences, prompts, strict=True)])
        v = torch.cat([s[1][:, :, p + i : p + i + 1] for s, p in zip(sequences, prompts, strict=True)])
        q = torch.cat([s[2][:, :, p + i : p + i + 1] for s, p in zip(sequences, prompts, strict=True)])
        stacked.update(k, v)
        out = stacked.attend(q, None, None, SCALE)[:, 0]
        for row in range(2):
            assert torch.allclose(out[row], alone[row][i][0], atol=1e-5), (row, i)


def test_compiled_step_writes_packed_stores_in_place(tiny):
    """Under inductor, the flush's masked writes into codes and parameters stay in place (index_put), as the
    dense cache's writes do (tests/test_engine.py): no loop over a whole store in the generated CPU code."""
    from torch._inductor.utils import run_and_get_code

    from kvbench.engine import Engine
    from kvbench.methods.kivi import KIVI

    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, KIVI(bits=4, window=32), spec, prefill_chunk=256, engine="compiled")
    prompt = list(range(100, 700))
    torch._dynamo.reset()
    _, sources = run_and_get_code(engine.generate, prompt, 4)
    layer = engine.new_cache(len(prompt), 4).layers[-1]
    codes_numel = spec.num_kv_heads * layer.slots * spec.head_dim * 4 // 8  # one store's codes, batch 1
    key_params_numel = spec.num_kv_heads * (layer.slots // 32) * spec.head_dim
    code = "\n".join(sources)
    assert code, "inductor produced no code"
    assert f"<static_cast<int64_t>({codes_numel}L)" not in code
    assert f"<static_cast<int64_t>({key_params_numel}L)" not in code


if __name__ == "__main__":
    _worker()

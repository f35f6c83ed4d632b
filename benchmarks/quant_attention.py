"""Decode attention over packed quantized K/V against the bf16 kernel, Llama-3.1-8B shape, one GPU.

    PYTHONPATH=. python benchmarks/quant_attention.py --quick --out quant_attention.jsonl   # < 1 minute
    PYTHONPATH=. python benchmarks/quant_attention.py --out benchmarks/results/quant_attention_h100.jsonl
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/quant_attention.py --device cpu   # a smoke run, small shapes

One query per sequence, Hq = 32, Hkv = 8, D = 128, every slot live; batch 1 and 4 at 32k and 128k tokens
(8k too without --quick). Rows: `bf16` (kvbench.kernels.decode_attention over bf16 K/V), and
kvbench.quant_kernels' packed kernel for `int4_token` (K and V per token, one group per head: QuaRot's
layout) and `int2_token` (the same at 2 bits: QuaRot-2's and RTN-2's), `kivi4` and `kivi2` (keys per channel
in groups of 32 tokens, values per token in groups of 32 channels), `zipcache_4_2` (60% of the tokens at 4
bits, 40% at 2, keys per channel under one parameter row per set, values per token; one
`packed_sets_attention` call: one launch and one combine for both sets, or with the launch's `pair_sets` off
a launch and a combine per set, merged), under each launch configuration of --configs (the default `LAUNCH`
first; the others are the alternatives one GPU run can choose from). Each row
gives the bytes the kernel must read (codes + float16 scales/zero-points, or bf16 K/V), the floor (those bytes
at the read bandwidth measured first, a bf16 sum over 1 GiB), the time per call, x_floor = time / floor and
the speed-up over bf16.

Timing: each call is replayed from a CUDA graph (as the compiled decode step runs it, so no host launch
cost), over enough copies of the inputs, used in turn, that together they exceed twice the L2 cache;
the median of 5 replays of 20 calls. Before timing, under every configuration: the kernel against the
float32 reference (bf16 queries, 4k slots, a full and a partial sequence) for the timed layouts, alone and
with a full-precision window of 129 slots (the plane kernel's window program), and QuaRot's rotations on
the per-token layout, and under
the default one also float16 queries and the layouts no timed row uses (ZipCache's odd key blocks from a
lead, key rows spanning whole tiles from a misaligned lead, 3- and 8-bit codes), and the operator under
CUDA-graph capture (and torch.compile(fullgraph=True) without --quick); also `kvbench.token_quant`'s
one-launch quantization of a decode token against its reference. A failed check is a row with
"ok": false and the exit status 1; timing goes on. Imports only torch, triton and kvbench; appends one
JSON line per row to --out, each configuration's rows as soon as they are done, and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from kvbench import kernels, quant_kernels, token_quant
from kvbench.hadamard import hadamard_matrix
from kvbench.quant import PARAM_DTYPE, dequantize, packed_width
from kvbench.quant_kernels import (
    LaunchConfig,
    PackedSlots,
    packed_decode_attention,
    packed_decode_attention_reference,
    packed_sets_attention,
)

HQ, HKV, D = 32, 8, 128
SCALE = D**-0.5
# A store's format: (bits, row_tokens, col_channels, lead); lead None = row_tokens (kvbench.quant_kernels).
TIMED = {
    "int4_token": ((4, 1, 128, None), (4, 1, 128, None)),
    "kivi4": ((4, 32, 1, None), (4, 1, 32, None)),
    "kivi2": ((2, 32, 1, None), (2, 1, 32, None)),
    "int2_token": ((2, 1, 128, None), (2, 1, 128, None)),  # QuaRot-2's and RTN-2's layout
}
# ZipCache 4/2 (its paper's setting): the salient 60% of a prompt at 4 bits and the rest at 2, keys per channel
# with one parameter row over each set's prompt tokens (`prompt_row`: the kernels' "lead" mode) and rows of 60
# and 40 decode tokens after it (none in a prompt-only timing), values per token: two calls, one per set.
ZIPCACHE_SETS = ((0.6, (4, 60, 1), (4, 1, 128, None)), (0.4, (2, 40, 1), (2, 1, 128, None)))


def lead_checked(slots: int) -> dict[str, tuple]:
    """ZipCache's sets as the kernels' "lead" mode takes them: a prompt row over most of `slots`, then decode
    rows of 60 and 40 tokens past the lead (the checks' longer sequence reaches them), checked under every
    configuration (`no_lead` reads them per slot)."""
    return {
        "zipcache4_prompt_row": ((4, 60, 1, slots * 3 // 4 + 1, True), (4, 1, 128, None)),
        "zipcache2_prompt_row": ((2, 40, 1, slots // 2 + 3, True), (2, 1, 128, None)),
    }


CHECKED_ONLY = {
    "zipcache8_lead3001": ((8, 60, 1, 3001), (8, 1, 128, None)),  # gathered key rows; 8-bit codes
    "rows128_lead1000_3bit": ((4, 128, 1, 1000), (3, 1, 32, None)),  # key rows span tiles, misaligned
}


def fixed(programs_per_sm: int, **launch) -> LaunchConfig:
    """A launch with one split target whatever the number of (sequence, KV head) pairs (KIVI's "halves" too)."""
    return LaunchConfig(
        programs_per_sm=programs_per_sm,
        programs_per_sm_many_heads=programs_per_sm,
        halves_programs_per_sm=(programs_per_sm, programs_per_sm),
        **launch,
    )


# KIVI's "halves" layout takes its split targets from `halves_programs_per_sm` while its products take the
# codes first (the default; `plane_kernel.plane_launch`): `fixed` and `many{n}` set it too, and keep its
# register cap (`halves_max_registers`).
CONFIGS = {
    "default": quant_kernels.LAUNCH,
    "w4_pps2": fixed(2, num_warps=4),  # the launch before two warps became the default
    # Split targets at 2 warps (no recompilation: split sizes are not specialised): fewer programs, one
    # wave; more, several waves and a tail.
    "w2_pps3": fixed(3, num_warps=2),
    "w2_pps4": fixed(4, num_warps=2),
    "w2_pps6": fixed(6, num_warps=2),
    "w2_pps8": fixed(8, num_warps=2),
    "w1_pps8": fixed(8, num_warps=1),  # one warp: the smallest program
    "w2_stages3": fixed(4, num_warps=2, num_stages=3),  # one more tile in flight
    "n128_w4": fixed(4, block_n=128, num_warps=4),  # tiles of twice the bytes
    "n32_w2": fixed(4, block_n=32, num_warps=2),  # KIVI's key rows of 32 span whole tiles: their scales fold
    # the same at the group's query rows: 160 registers (KIVI-4, 164 KIVI-2) fit 6 two-warp programs an SM,
    # or one warp (240 / 254 registers) at 8 (offline, `plane_sass.py --modes row --block-n 32`)
    "n32_w2_pps6": fixed(6, block_n=32, num_warps=2),
    "n32_w1_pps8": fixed(8, block_n=32, num_warps=1),
    # KIVI's key rows dequantized per slot, as before the half-tile fold became the default
    "rows": replace(quant_kernels.LAUNCH, fold_half_rows=False),
    # QuaRot's and RTN's layout (one value zero-point per slot): the zero-points through the product, as
    # before row sums became the default; row sums without the offset codes; one warp a program (at 8
    # programs an SM) at every size, and at none (`one_warp_summed_slots` decides by default)
    "no_sums": replace(quant_kernels.LAUNCH, zero_row_sums=False, offset_codes=False),
    "no_offset": replace(quant_kernels.LAUNCH, offset_codes=False),
    "one_warp": replace(quant_kernels.LAUNCH, one_warp_summed_slots=0),
    "two_warps": replace(quant_kernels.LAUNCH, one_warp_summed_slots=2**62),
    # ZipCache's keys read per slot in every tile, as before the "lead" fold (row 0 folded below lead)
    "no_lead": replace(quant_kernels.LAUNCH, fold_lead=False),
    # ZipCache's two sets in two launches and two combines, merged, as before they shared one launch
    "no_pair": replace(quant_kernels.LAUNCH, pair_sets=False),
    # the pair's two sets each taking the whole split target at few heads, as before they shared one (by slots)
    "pair_whole": replace(quant_kernels.LAUNCH, pair_shared_target=False),
    # the plane kernel's inner tiles (every slot live) in a loop without slot masks
    "unmasked": replace(quant_kernels.LAUNCH, unmasked_tiles=True),
    # above FEW_HEADS pairs, ZipCache's pair launch at `programs_per_sm_many_heads`, as before its waves chose
    "pair_fixed": replace(quant_kernels.LAUNCH, pair_wave_target=False),
    # the plane kernel's query rows: one product's 16 for every key mode, as before they followed the group
    "qrows16": replace(quant_kernels.LAUNCH, query_rows=16, query_rows_token_keys=16),
    "qrows8": replace(quant_kernels.LAUNCH, query_rows=8),  # 8 for every key mode
    # the plane kernel's products with the query rows first in every key mode, as before the codes went first
    # for per-token keys and KIVI's "halves"; and "halves" with the codes first at the default split targets
    "no_codes_first": replace(quant_kernels.LAUNCH, codes_first=False),
    "halves_pps4": replace(quant_kernels.LAUNCH, halves_programs_per_sm=(4, 8)),
    "halves_pps8x8": replace(quant_kernels.LAUNCH, halves_programs_per_sm=(8, 8)),
    # "halves" without its register cap at 6 / 12 programs an SM (ptxas's 168 registers: 6 fit), the default
    # before session 54; and every plane kernel capped at 128 registers a thread (`max_registers`)
    "uncapped": replace(quant_kernels.LAUNCH, halves_max_registers=0, halves_programs_per_sm=(6, 12)),
    "regs128": replace(quant_kernels.LAUNCH, max_registers=128),
    # a single store's split target above FEW_HEADS pairs by its waves (`plane_kernel.wave_target`)
    "store_waves": replace(quant_kernels.LAUNCH, store_wave_target=True),
    # KIVI's "halves" at the many-heads target alone, the default before `halves_wave_target` was turned on
    "halves_fixed": replace(quant_kernels.LAUNCH, halves_wave_target=False),
    # 2-bit per-token codes converted with their subtract (`plane_kernel._bf16_crumbs`), the default before
    # `offset_crumbs` (2^m + c, the offset out of the sums) was turned on
    "subtract_crumbs": replace(quant_kernels.LAUNCH, offset_crumbs=False),
    # 2-bit per-token codes shifted down, no weights, the default before `weighted_crumbs` was turned on
    "shifted_crumbs": replace(quant_kernels.LAUNCH, weighted_crumbs=False),
    # ZipCache's prompt-set keys in the subtract forms, the default before `lead_offset_keys` was turned on
    "lead_subtract_keys": replace(quant_kernels.LAUNCH, lead_offset_keys=False),
    # QuaRot's rotated query kept in the products' layout, the default before `reload_rotated_query`
    "rotated_in_registers": replace(quant_kernels.LAUNCH, reload_rotated_query=False),
}
# The split target above FEW_HEADS (sequence, KV head) pairs alone, the one below kept: `many6` is six
# programs an SM at batch 4 of Llama-3.1-8B's shape, four at batch 1 as by default (KIVI's "halves": eight as by
# default); ZipCache's pair too (its wave estimate off, which would otherwise choose among n and its own targets).
CONFIGS |= {
    f"many{n}": replace(
        quant_kernels.LAUNCH,
        programs_per_sm_many_heads=n,
        halves_programs_per_sm=(quant_kernels.LAUNCH.halves_programs_per_sm[0], n),
        pair_wave_target=False,
    )
    for n in (3, 4, 5, 6, 7, 10, 12, 16)
}
DEFAULT_CONFIGS = "default,no_offset,one_warp,two_warps"  # each block/warp/stage change compiles per layout
TOLERANCE = {torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 1e-3)}  # relative (output, lse): the tests
TIMED_CALLS, REPLAYS = 20, 5


def store(batch: int, slots: int, fmt: tuple, device: torch.device, gen: torch.Generator) -> PackedSlots:
    """Random codes and parameters in a format (the kernel's cost does not depend on their values)."""
    bits, row_tokens, col_channels, lead, *prompt_row = fmt  # a fifth field: `PackedSlots.prompt_row`
    lead = torch.full((batch,), row_tokens if lead is None else lead, device=device)
    rows = int(quant_kernels.slot_rows(max(slots, 1), lead[:1].cpu(), row_tokens).max()) + 1
    shape = (batch, HKV, slots, packed_width(D, bits))
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)
    params = (batch, HKV, rows, D // col_channels)
    scale = (torch.rand(params, device=device, generator=gen) * 0.1 + 0.01).to(PARAM_DTYPE)
    zero = (torch.randn(params, device=device, generator=gen) * 0.5).to(PARAM_DTYPE)
    return PackedSlots(codes, scale, zero, lead, bits, row_tokens, col_channels, *prompt_row)


def packed_inputs(batch: int, slots: int, layout: tuple, device: torch.device, seed: int) -> tuple[PackedSlots, ...]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return store(batch, slots, layout[0], device, gen), store(batch, slots, layout[1], device, gen)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def packed_bytes(keys: PackedSlots, values: PackedSlots) -> int:
    return nbytes(keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero)


def time_us(calls: list[Callable[[], object]], device: torch.device) -> float:
    """Time per call: CUDA-graph replays of TIMED_CALLS calls taking the inputs in turn (GPU); host clock
    otherwise."""
    if device.type != "cuda":
        calls[0]()
        began = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - began) / len(calls) * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(TIMED_CALLS):
            calls[i % len(calls)]()
    graph.replay()
    per_call_us = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_call_us.append(start.elapsed_time(end) * 1e3 / TIMED_CALLS)
    return statistics.median(per_call_us)


def copies_past_l2(bytes_per_copy: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(8, math.ceil(2 * l2_bytes / bytes_per_copy)))


def read_bandwidth(device: torch.device) -> float:
    """Bytes per second of a bf16 sum over 1 GiB (the floor's bandwidth), or a nominal 3e12 off the GPU."""
    if device.type != "cuda":
        return 3.0e12
    x = torch.ones(2**29, dtype=torch.bfloat16, device=device)
    us = time_us([x.sum], device)
    return 2**30 / (us * 1e-6)


def window_inputs(query: torch.Tensor, slots: int) -> quant_kernels.Window:
    """A full-precision window of `slots` ring slots (KIVI's 128 + 1), every third one not live."""
    b = query.shape[0]
    keys = torch.randn(b, HKV, slots, D, device=query.device).to(query.dtype)
    values = torch.randn(b, HKV, slots, D, device=query.device).to(query.dtype)
    positions = torch.arange(slots, device=query.device).expand(b, HKV, slots).clone()
    positions[..., ::3] = -1
    return quant_kernels.Window(keys, values, positions)


def check(
    query: torch.Tensor,
    keys: PackedSlots,
    values: PackedSlots,
    lengths: torch.Tensor,
    window: quant_kernels.Window | None = None,
    rotation: torch.Tensor | None = None,
) -> dict:
    out, lse = packed_decode_attention(query, keys, values, lengths, SCALE, window, rotation)
    rotated = query if rotation is None else quant_kernels.rotate(query, rotation)
    ref_out, ref_lse = packed_decode_attention_reference(rotated, keys, values, lengths, SCALE)
    if window is not None:
        dense = kernels.decode_attention_reference(rotated, *window.attention_inputs(), SCALE)
        ref_out, ref_lse = quant_kernels.merge_attention([(ref_out, ref_lse), dense])
    if rotation is not None:
        ref_out = quant_kernels.rotate(ref_out, rotation)
    return compare(out, lse, ref_out, ref_lse, query.dtype)


def compare(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor, dtype) -> dict:
    """Relative errors of (out, lse) against the reference, and whether both are within the dtype's tolerance."""
    err = ((out.double() - ref_out.double()).norm() / ref_out.double().norm()).item()
    lse_err = ((lse.double() - ref_lse.double()).norm() / ref_lse.double().norm()).item()
    out_tol, lse_tol = TOLERANCE[dtype]
    return {"out_rel": err, "lse_rel": lse_err, "ok": err < out_tol and lse_err < lse_tol}


def reference_checks(device: torch.device, slots: int, config: str) -> list[dict]:
    """bf16 queries over the timed layouts and ZipCache's "lead" layouts; under the default configuration
    also the check-only layouts, and float16 queries (the float16 offset codes) on int4_token and those; float16
    queries on int2_token too wherever the configuration converts 2-bit codes in the offset form."""
    lead_layouts = lead_checked(slots)
    layouts = TIMED | lead_layouts | (CHECKED_ONLY if config == "default" else {})
    lengths = torch.tensor([slots, slots // 3 + 5], device=device)
    rows = []
    for name, layout in layouts.items():
        keys, values = packed_inputs(2, slots, layout, device, seed=1)
        # float16 queries: under the default launch (4-bit offset codes), and for the 2-bit ones' offset form
        with_fp16 = config == "default" and (name in CHECKED_ONLY or name == "int4_token")
        with_fp16 = with_fp16 or (name == "int2_token" and CONFIGS[config].offset_crumbs)
        for dtype in (torch.bfloat16, torch.float16) if with_fp16 else (torch.bfloat16,):
            query = torch.randn(2, HQ, D, device=device).to(dtype)
            result = check(query, keys, values, lengths)
            rows.append({"check": f"reference_{name}_{str(dtype).removeprefix('torch.')}", "config": config} | result)
        if name in TIMED or name in lead_layouts:  # with a window: the plane kernel's window program, or merged
            result = check(query, keys, values, lengths, window_inputs(query, 129))
            rows.append({"check": f"reference_{name}_window", "config": config} | result)
            # a quantized layer's form: the ring's counters, wrapped and partly quantized / not yet full, which
            # the kernel must read as the positions they stand for, bit for bit
            counters = torch.tensor([[1000, 900], [60, 0]], device=device)
            ring = window_inputs(query, 129)._replace(positions=None, seen=counters[:, 0], quantized=counters[:, 1])
            by_positions = ring._replace(positions=ring.live_positions())
            got = packed_decode_attention(query, keys, values, lengths, SCALE, ring)
            want = packed_decode_attention(query, keys, values, lengths, SCALE, by_positions)
            same = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
            rows.append({"check": f"ring_counters_{name}", "config": config, "ok": same})
        if name == "int4_token":  # QuaRot's rotations, in the plane kernel's prologue and the combine
            signs = hadamard_matrix(D, dtype=torch.int8, device=device, normalized=False)
            result = check(query, keys, values, lengths, rotation=signs)
            rows.append({"check": f"reference_{name}_rotation", "config": config} | result)
    rows += pair_checks(device, slots, config)
    return rows


def pair_checks(device: torch.device, slots: int, config: str) -> list[dict]:
    """ZipCache's two sets (`timed_parts`, a partial second sequence) as one attention, alone, with a window,
    and with the window and its channel scales (applied by the combine kernel), against the sets' references
    merged: one launch of the plane kernel where the launch pairs them."""
    parts = timed_parts("zipcache_4_2", 2, slots, device, seed=1)
    parts = [(keys, values, torch.stack([n[0], n[0] // 3 + 5])) for keys, values, n in parts]
    query = torch.randn(2, HQ, D, device=device).bfloat16()
    channel_scale = (torch.rand(2, HKV, D, device=device) + 0.5).half()
    rows = []
    ring = window_inputs(query, 129)
    for suffix, window, out_scale in (("", None, None), ("_window", ring, None), ("_scaled", ring, channel_scale)):
        out, lse = packed_sets_attention(query, parts, SCALE, window, out_scale)
        pieces = [packed_decode_attention_reference(query, *part, SCALE) for part in parts]
        if window is not None:
            pieces.append(kernels.decode_attention_reference(query, *window.attention_inputs(), SCALE))
        want_out, want_lse = quant_kernels.merge_attention(pieces)
        if out_scale is not None:
            want_out = quant_kernels.scale_channels(want_out, out_scale)
        result = compare(out, lse, want_out, want_lse, query.dtype)
        rows.append({"check": "reference_zipcache_sets" + suffix, "config": config} | result)
    return rows


def token_quant_checks(device: torch.device) -> list[dict]:
    """`kvbench.token_quant`'s one-launch quantization of a decode token (4 sequences x 8 KV heads, bf16, an
    outlier channel) against its reference, at 4 and 2 bits, with and without QuaRot's rotation: unrotated
    equal bit for bit; rotated within one step (the float32 sums' order differs from the butterfly's)."""
    gen = torch.Generator(device=device).manual_seed(5)
    keys = torch.randn(4, HKV, 1, D, device=device, generator=gen) * 2
    keys[..., 7] += 30.0
    keys, values = keys.bfloat16(), torch.randn(4, HKV, 1, D, device=device, generator=gen).bfloat16()
    rows = []
    rotations = (None, hadamard_matrix(D, dtype=torch.int8, device=device, normalized=False))
    for bits, rotation in itertools.product((4, 2), rotations):
        got = token_quant.quantize_tokens(keys, values, rotation, bits, D, 0.95)
        want = token_quant.quantize_tokens_reference(keys, values, rotation, bits, D, 0.95)
        equal = all(torch.equal(a, b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
        error = max(
            float(((dequantize(g, bits, "token", D) - dequantize(w, bits, "token", D)).abs() / w.scale.float()).max())
            for g, w in zip(got, want, strict=True)
        )
        differing = max(float((g.codes != w.codes).float().mean()) for g, w in zip(got, want, strict=True))
        ok = equal if rotation is None else error <= 1.01 and differing < 0.02
        name = ("token_quant_rotated" if rotation is not None else "token_quant") + ("" if bits == 4 else "_2bit")
        rows.append({"check": name, "ok": ok, "equal": equal, "error_steps": error, "codes_differing": differing})
    return rows


def capture_checks(device: torch.device, slots: int, with_compile: bool) -> list[dict]:
    rows = []
    keys, values = packed_inputs(2, slots, TIMED["kivi2"], device, seed=2)
    lengths = torch.tensor([slots, slots // 3], device=device)
    query = torch.randn(2, HQ, D, device=device, dtype=torch.bfloat16)

    def step(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_decode_attention(q, keys, values, lengths, SCALE)

    want = step(query)
    if with_compile:
        try:
            got = torch.compile(step, fullgraph=True)(query)
            rows.append({"check": "torch_compile_fullgraph", "ok": all(map(torch.equal, got, want))})
        except Exception as err:  # reported as a failed check; the benchmark goes on
            rows.append({"check": "torch_compile_fullgraph", "ok": False, "error": repr(err)[:500]})
    if device.type == "cuda":
        try:
            static = query.clone()
            step(static)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = step(static)
            graph.replay()
            torch.cuda.synchronize()
            rows.append({"check": "cuda_graph", "ok": all(map(torch.equal, got, want))})
        except Exception as err:
            rows.append({"check": "cuda_graph", "ok": False, "error": repr(err)[:500]})
    return rows


def dense_rows(device: torch.device, contexts: list[int], batches: list[int]) -> dict[tuple[int, int], dict]:
    rows = {}
    for slots in contexts:
        for batch in batches:
            bytes_per_copy = 2 * batch * HKV * slots * D * 2
            calls = []
            for _ in range(copies_past_l2(bytes_per_copy, device)):
                query = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
                keys = torch.randn(batch, HKV, slots, D, device=device, dtype=torch.bfloat16)
                values = torch.randn_like(keys)
                positions = torch.arange(slots, device=device).expand(batch, HKV, slots)
                calls.append(lambda q=query, k=keys, v=values, p=positions: kernels.decode_attention(q, k, v, p, SCALE))
            us = time_us(calls, device)
            rows[slots, batch] = {"kernel": "bf16", "batch": batch, "context": slots, "us": us, "bytes": bytes_per_copy}
            del calls
    return rows


def timed_parts(
    layout: str, batch: int, slots: int, device: torch.device, seed: int
) -> list[tuple[PackedSlots, PackedSlots, torch.Tensor]]:
    """A timed layout's stores over `slots` prompt tokens as (keys, values, lengths), one per kernel call: one
    for `TIMED`'s layouts, ZipCache's two sets (`ZIPCACHE_SETS`) for "zipcache_4_2"."""
    if layout != "zipcache_4_2":
        keys, values = packed_inputs(batch, slots, TIMED[layout], device, seed)
        return [(keys, values, torch.full((batch,), slots, device=device))]
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for share, (bits, row_tokens, col_channels), value_fmt in ZIPCACHE_SETS:
        n = int(share * slots)
        keys = store(batch, n, (bits, row_tokens, col_channels, n, True), device, gen)
        parts.append((keys, store(batch, n, value_fmt, device, gen), torch.full((batch,), n, device=device)))
    return parts


TIMED_LAYOUTS = [*TIMED, "zipcache_4_2"]


def packed_rows(
    device: torch.device, contexts: list[int], batches: list[int], config: str, dense: dict, layouts: list[str]
) -> list[dict]:
    """Each of `layouts`' attention (ZipCache's two sets as one, `packed_sets_attention`) timed as one call."""
    rows = []
    for slots in contexts:
        for batch in batches:
            for layout in layouts:
                copies = [timed_parts(layout, batch, slots, device, seed=3)]
                bytes_per_copy = sum(packed_bytes(keys, values) for keys, values, _ in copies[0])
                copies += [
                    timed_parts(layout, batch, slots, device, seed)
                    for seed in range(4, 3 + copies_past_l2(bytes_per_copy, device))
                ]
                query = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
                calls = [lambda parts=parts, q=query: packed_sets_attention(q, parts, SCALE) for parts in copies]
                us = time_us(calls, device)
                row = {"kernel": layout, "config": config, "batch": batch, "context": slots, "us": us}
                rows.append(row | {"bytes": bytes_per_copy, "speedup_vs_bf16": dense[slots, batch]["us"] / us})
                del copies, calls
    return rows


def environment(device: torch.device, bandwidth: float, commit: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
    try:
        if not commit:  # a copy without .git (a device machine) records none unless --commit names it
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
            status = [*git, "status", "--porcelain", "kvbench", "benchmarks"]
            dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
            commit += "+dirty" if commit and dirty else ""
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit or None,
        "timing": "cuda_graph" if device.type == "cuda" else "host",
        "read_bandwidth_Bps": bandwidth,
    }


def print_table(rows: list[dict]) -> None:
    for row in rows:
        if "check" in row:
            status = "ok" if row["ok"] else "FAILED"
            print(f"check {row['check']} [{row.get('config', '')}]: {status} {row.get('error', '')}")
    header = ("kernel", "config", "batch", "context", "MB read", "us", "x floor", "vs bf16")
    print("{:<11} {:<12} {:>5} {:>7} {:>8} {:>9} {:>8} {:>8}".format(*header))
    for row in rows:
        if "kernel" in row:
            speedup = row.get("speedup_vs_bf16")
            print(
                f"{row['kernel']:<11} {row.get('config', ''):<12} {row['batch']:>5} {row['context']:>7} "
                f"{row['bytes'] / 1e6:>8.1f} {row['us']:>9.1f} {row['x_floor']:>8.2f} "
                f"{f'{speedup:.2f}x' if speedup else '':>8}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="", help="append the JSON rows to this file")
    parser.add_argument("--quick", action="store_true", help="32k and 128k only; no torch.compile check")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="timed contexts (on a GPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="timed batch sizes (on a GPU)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"launch configurations, of {list(CONFIGS)}")
    parser.add_argument("--commit", default="", help="the commit to record (default: git's, where there is one)")
    parser.add_argument(
        "--layouts", default=",".join(TIMED_LAYOUTS), help=f"the timed layouts, of {TIMED_LAYOUTS} (checks: all)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs={args.configs} is not valid: {unknown} not among {list(CONFIGS)}")
    layouts = args.layouts.split(",")
    unknown = [name for name in layouts if name not in TIMED_LAYOUTS]
    if unknown:
        parser.error(f"--layouts={args.layouts} is not valid: {unknown} not among {TIMED_LAYOUTS}")
    began = time.perf_counter()
    small = device.type != "cuda"  # Triton's interpreter or the reference on a CPU: small shapes
    contexts = [256, 700] if small else (args.contexts or ([32768, 131072] if args.quick else [8192, 32768, 131072]))
    batches = [1, 2] if small else (args.batches or [1, 4])
    check_slots = 300 if small else 4096
    bandwidth = read_bandwidth(device)
    # Under Triton's interpreter no triton_op compiles (fake tensors reach the interpreted launch).
    env = environment(device, bandwidth, args.commit)

    def finished(new: list[dict]) -> list[dict]:
        """Rows with their floors and environment, appended to --out as soon as they exist: a run cut short
        (a GPU session's time limit) keeps every configuration it finished."""
        for row in new:
            if "kernel" in row:
                row["floor_us"] = row["bytes"] / bandwidth * 1e6
                row["x_floor"] = row["us"] / row["floor_us"]
        new = [env | row for row in new]
        if args.out:
            with Path(args.out).open("a") as out:
                out.writelines(json.dumps(row) + "\n" for row in new)
        return new

    rows = capture_checks(device, check_slots, with_compile=not (args.quick or kernels._INTERPRETED))
    rows += token_quant_checks(device)
    dense = dense_rows(device, contexts, batches)
    rows = finished([*rows, *dense.values()])
    for config in configs:
        quant_kernels.LAUNCH = CONFIGS[config]
        new = reference_checks(device, check_slots, config)
        new += packed_rows(device, contexts, batches, config, dense, layouts)
        rows += finished(new)
        print(f"[{time.perf_counter() - began:.0f} s] config {config} done", file=sys.stderr)
    print_table(rows)
    print(f"{time.perf_counter() - began:.0f} s, read bandwidth {bandwidth / 1e12:.2f} TB/s", file=sys.stderr)
    return 0 if all(row["ok"] for row in rows if "check" in row) else 1


if __name__ == "__main__":
    sys.exit(main())

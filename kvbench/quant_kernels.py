"""Decode attention over packed (quantized) K/V slots: a Triton kernel for CUDA and its PyTorch reference.

Two kernels. `_plane_split_kernel` (in `kvbench.plane_kernel`) takes planar codes (2 and 4 bits,
`kvbench.quant`) whose parameters it can fold per plane: values in per-token groups, keys per token or per
channel (`plane_plan`; KIVI, QuaRot, RTN and ZipCache's layouts: QuaRot and RTN "token", KIVI "halves",
ZipCache's two sets "lead"); its own docstring says how. `_packed_split_kernel`, described below, takes
everything else (3- and 8-bit codes; per-channel values, token groups narrower than a plane); it reads a
planar row a code at a time. Both are `kvbench.kernels`' flash-decoding
split kernel with K/V tiles read packed: each program reads the codes of its tiles (a 4-bit cache reads a
quarter of bf16's bytes) plus their float16 scales and zero-points, and the online softmax, the partial
outputs and the combine kernel that merges the splits are `kvbench.kernels`' own. The operator returns the
same contract as `kvbench.kernels.decode_attention`: (out [B, Hq, Dv] in the query's dtype, lse [B, Hq]
float32), so a layer merges it with attention over other slots (a full-precision window) through the
log-sum-exp.

Slot layout (`PackedSlots`): slots [0, length[b]) of sequence b are live (quantized tokens fill a store from
its front; the order of tokens does not matter to attention, keys being stored post-RoPE). Codes are [B,
Hkv, S, D * bits / 8] uint8 (`kvbench.quant.pack`: planar for 2 and 4 bits, a bit stream otherwise). Scale
and zero-point are float16 [B, Hkv, R, C]: slot s uses parameter row 0 if s < lead[b], else row 1 + (s -
lead[b]) // row_tokens, and channel d uses column d // col_channels. This one rule covers per-token groups
(row_tokens = lead = 1, col_channels = group), per-channel groups of G tokens (row_tokens = lead = G,
col_channels = 1) and ZipCache's keys (one row for the whole prompt set, lead = its size, then one row per
decode block of row_tokens tokens).

Why `_packed_split_kernel` is shaped as it is (decode attention is bound by memory, and a packed tile holds
2-8 times more values per byte than a bf16 one, so dequantization must cost a few instructions per value):
- A tile's codes are contiguous loads per slot row, split into codes by shifts and masks on whole fields
  (3-bit rows as 24-bit words of 8 codes; 8-bit codes are whole bytes), never a gather per value (planar
  2- and 4-bit rows, which only odd layouts bring here, excepted).
- Codes become floats by the exponent trick, never by an integer-to-float conversion (a low-throughput
  instruction on NVIDIA GPUs): with a 16-bit query, two codes spread into one 32-bit register and one OR
  make it two bfloat16 128 + code (or float16 1024 + code) values, whose offset's share of a dot product
  is subtracted once per row (`_split_fields`, `_code_values`); a float32 query's codes are
  (code | 0x4B000000) - 2^23, exact in float32.
- Scales and zero-points are applied where they are cheapest, per parameter layout (`_param_mode`):
  one parameter per slot (per-token groups spanning the head: QuaRot, ZipCache's values) is folded into
  the attention algebra, q.(c s + z) = s (q.c) + z sum(q) for keys and p (c s + z) = (p s) c + (p.z) for
  values, so the tile's codes go to the tensor cores as they are; per-channel keys whose rows span whole
  tiles (tiles are aligned to the rows) fold one scale row into the query, (q * s).c + q.z ("row");
  ZipCache's keys, whose row 0 spans the prompt set (slots [0, lead), `PackedSlots.prompt_row`), fold
  that row into the query once and use it for every tile below lead (tiles aligned to lead), reading each
  slot's row only in the tiles of its decode blocks ("lead", in both kernels: the plane kernel takes
  ZipCache's sets, this kernel the same layout at 3 or 8 bits); rows shorter than a tile and per-token
  groups of a power-of-two width are loaded once per row or group and broadcast over the tile; any other
  layout (ZipCache's odd block sizes without `LaunchConfig.fold_lead`) reads each slot's parameter row.
- Numerics against the float32 reference: where a layout is folded, q * s or p * s is rounded to the
  query's dtype for the tensor cores instead of the dequantized key or value; where values are
  dequantized for a 16-bit query, c * s + z is one float16 multiply-add (the parameters are float16;
  11 significant bits) before the rounding to the query's dtype; float32 queries stay in float32.
- Each K/V tile is read once for all query heads of its KV head (GQA), as in `kvbench.kernels`.

Like `kvbench.kernels`, the attention is `torch.library` operators (`kvbench::packed_decode_attention`, and
`kvbench::plane_attention` for the stores the plane kernel takes, with a full-precision window and QuaRot's
rotation where given, both inside the launch): Triton on CUDA tensors and under Triton's interpreter
(`TRITON_INTERPRET=1`, the tests), the reference elsewhere; static grids and no host syncs, so they run in
the compiled, graph-captured decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvbench import kernels
from kvbench.quant import unpack


class PackedSlots(NamedTuple):
    """One of K or V of a packed store, as the kernel reads it (see the module doc)."""

    codes: torch.Tensor  # uint8 [B, Hkv, S, D * bits / 8]
    scale: torch.Tensor  # float16 [B, Hkv, R, C]
    zero: torch.Tensor  # float16 [B, Hkv, R, C]
    lead: torch.Tensor  # [B] integer: slots below it use parameter row 0
    bits: int
    row_tokens: int
    col_channels: int
    # Row 0 holds one group over a whole prompt set, slots [0, lead) (ZipCache's keys, `PackedStore.fill`
    # with a group of its own), so tiles below lead can fold it (key mode "lead"); False leaves the layout to
    # the per-slot modes. A static hint for the mode only: the slot rule above holds either way.
    prompt_row: bool = False


class Window(NamedTuple):
    """A full-precision window next to a packed store: keys [B, Hkv, R, D] and values [B, Hkv, R, Dv] in the
    query's dtype, and which of its R slots are live, in one of two forms: `positions` [B, Hkv, R] (>= 0
    where live: `kvbench.kernels`' convention), or, for a ring of R slots, its counters `seen` and
    `quantized` [B] (tokens seen, tokens already moved to the store; `ring_positions` says which slot holds
    what). The counters cost the step no kernel: the plane kernel derives the positions itself."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    quantized: torch.Tensor | None = None

    def live_positions(self) -> torch.Tensor:
        """[B, Hkv, R] positions, -1 where not live, whichever form the window holds."""
        if self.positions is not None:
            return self.positions
        return ring_positions(self.seen, self.quantized, self.keys.shape[2], self.keys.shape[1])

    def attention_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions): the window as `kvbench.kernels`' dense attention takes it."""
        return self.keys, self.values, self.live_positions()


def ring_positions(seen: torch.Tensor, quantized: torch.Tensor, ring: int, heads: int) -> torch.Tensor:
    """[B, heads, ring]: the position each slot of a ring of `ring` slots holds after `seen[b]` tokens (token
    t at slot t mod ring), -1 where not live: below `quantized[b]` (moved to the store) or never written."""
    last = (seen - 1).view(-1, 1)
    position = last - (last - torch.arange(ring, device=seen.device)) % ring
    return position.masked_fill(position < quantized.view(-1, 1), -1).unsqueeze(1).expand(-1, heads, -1)


def slot_rows(slots: int, lead: torch.Tensor, row_tokens: int) -> torch.Tensor:
    """[B, S]: the parameter row each slot uses."""
    s = torch.arange(slots, device=lead.device)
    lead = lead.view(-1, 1)
    return torch.where(s < lead, 0, 1 + torch.div(s - lead, row_tokens, rounding_mode="floor"))


def dequantize_slots(packed: PackedSlots, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every slot's values [B, Hkv, S, D] (float32 math); those of slots that are not live are meaningless."""
    codes = unpack(packed.codes, packed.bits).float()
    b, h, s = codes.shape[:3]
    # Slots past the last parameter row are never live; clamped so that they read some row.
    rows = slot_rows(s, packed.lead, packed.row_tokens).clamp_max(packed.scale.shape[2] - 1).view(b, 1, s, 1)

    def per_slot(param: torch.Tensor) -> torch.Tensor:
        per_row = param.float().gather(2, rows.expand(b, h, s, param.shape[-1]))
        return per_row.repeat_interleave(packed.col_channels, dim=-1)

    return (codes * per_slot(packed.scale) + per_slot(packed.zero)).to(dtype)


def packed_decode_attention_reference(
    query: torch.Tensor, keys: PackedSlots, values: PackedSlots, lengths: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: dequantize every slot, then `kvbench.kernels.decode_attention_reference` over the live ones."""
    k, v = dequantize_slots(keys), dequantize_slots(values)
    return kernels.decode_attention_reference(query, k, v, lengths, scale)


@dataclass(frozen=True)
class LaunchConfig:
    """How the split kernels are launched: slots per tile, warps and pipeline stages per program, and the
    flash-decoding split target (programs per SM when batch x KV heads alone would not fill the GPU), for
    few (sequence, KV head) pairs and for many."""

    block_n: int = 64
    # Two warps a program; four programs an SM up to FEW_HEADS (sequence, KV head) pairs, eight above.
    # Measured on the H200, kernel alone (benchmarks/README.md, "Launch of the 4-bit kernels"): the kernels
    # are bound by instruction latency, not bytes, so more, smaller programs keep more tiles in flight. At
    # 32k, per-token 4-bit codes took 30.0 us at batch 1 (8 pairs; 35.4 at eight programs an SM, 35.8 with
    # the former four warps x two programs) and 92.9 at batch 4 (32 pairs; 111.7 at four programs, 121.4
    # before); KIVI-4 44.1 / 134.5 (50.6 at eight programs at batch 1; 158.4 at four at batch 4).
    num_warps: int = 2
    num_stages: int = 2
    programs_per_sm: int = 4
    programs_per_sm_many_heads: int = 8
    # Per-channel key rows of half a tile (KIVI's 32 tokens in 64-slot tiles) folded per half ("halves")
    # instead of dequantized per slot ("rows"). H200, kernel alone, KIVI-4 at 32k: 40.4 vs 43.8 us at batch
    # 1, 129.1 vs 134.3 at batch 4 (benchmarks/README.md, "One launch for the new token").
    fold_half_rows: bool = True
    # Values with one zero-point per slot (QuaRot's and RTN's layout): p . z as a float32 row sum per tile
    # instead of the [N, 16] zero-point product that any parameter layout takes. Offline (sm_90, Triton
    # 3.6, the runtime's argument specialisation, 2 warps) the token-mode tile loop drops from 1,035 to
    # 846 instructions per warp (benchmarks/plane_sass.py). H200, int4 per token, kernel alone: 29.1 ->
    # 26.8 us at 32k batch 1, 87.8 -> 78.9 at batch 4, 304.6 -> 271.3 at 128k batch 4; RTN-4's compiled
    # step at 32k batch 4: 7.89 -> 7.65 ms (benchmarks/README.md, "Row sums, offset codes, one warp").
    # KIVI's values (a zero-point per plane) keep the product: four row sums took its "halves" loop to 255
    # registers and 52 spill operations (offline, 2,012 -> 1,912 instructions).
    zero_row_sums: bool = True
    # Where the value zero-points are summed (above) and (sequence, KV head) pairs x slots reach this, one
    # warp a program at `programs_per_sm_many_heads`. H200, kernel alone, int4 per token: 64.4 vs 78.7 us
    # at 32k batch 4 (2^20), 218.7 vs 269.1 at 128k batch 4 (2^22), 68.5 vs 77.2 at 128k batch 1 (2^20);
    # below, at 32k batch 1 (2^18), one warp lost (29.4 at 4 programs an SM, 27.8 at 8, vs 26.7). KIVI's
    # layout at one warp was 1.6x slower, so it keeps `num_warps`; so do ZipCache's "lead" keys, which spill
    # at one warp (`plane_kernel.plane_launch`): only per-token keys take it.
    one_warp_summed_slots: int = 2**20
    # With zero_row_sums, on QuaRot's and RTN's layout: codes converted as 2^m + c (no subtract; the offset
    # taken out of the sums once per slot). Offline: 846 -> 780 instructions per warp and tile. H200, kernel
    # alone, int4 per token at one warp: 64.4 -> 60.5 us at 32k batch 4, 218.7 -> 205.4 at 128k batch 4; at
    # two warps and batch 1 within 2% either way (26.7 / 27.2 us).
    offset_codes: bool = True
    # With offset_codes, 2-bit codes too (QuaRot-2's and RTN-2's layout): the byte conversion without its
    # subtract (`plane_kernel._bf16_offset_crumbs`), 16 instructions for 16 values instead of 24; the float32
    # sums then carry m against a mean code of 1.5 (bfloat16: 128, ~6.5 bits of 24; float16: 1024, ~9.5).
    # H100, kernel alone (`quant_attention.py --configs default,offset_crumbs` at f908c31, where it was off;
    # `--configs subtract_crumbs` times the former conversion now): per-token 2-bit 19.1 -> 18.4 us at 8k
    # batch 4, 181.6 -> 172.5 at 8k batch 64, 55.5 -> 51.7 at 32k batch 4, 680.2 -> 637.3 at 32k batch 64
    # (benchmarks/README.md, "The grid complete; 2-bit launch flags timed").
    offset_crumbs: bool = True
    # With offset_crumbs, where both stores' codes are 2-bit (QuaRot-2's and RTN-2's layout): each plane masked
    # where it lies in the byte instead of shifted down (`plane_kernel._bf16_weighted_crumbs`), so plane g comes
    # out as 2^m + w_g c (w_g = 4^g; 16 for bfloat16's plane 3) and the kernel divides the weights out (the
    # query's planes before the products, the value sums after the tiles): 12 instructions make 16 values in
    # bfloat16 (plane 3 still shifted: its top bit would reach the exponent), 10 in float16, against 16.
    # Offline (`plane_sass.py --modes token --variants offset weighted --bits 2`, sm_90, Triton 3.7.1): the tile
    # loop 1,324 -> 1,214 instructions a warp at one warp (logic 579 -> 454), 756 -> 720 at two (2 local-memory
    # operations -> 0). H100, kernel alone (`quant_attention.py --configs default,weighted_crumbs` at 488d0ec,
    # where it was off; `--configs shifted_crumbs` times the former conversion now): per-token 2-bit 18.7 ->
    # 18.2 us at 8k batch 4, 172.5 -> 157.6 at 8k batch 64, 52.0 -> 50.2 at 32k batch 4, 638.3 -> 587.1 at 32k
    # batch 64; steps (8B shape) RTN-2 8k batch 64 12.61 -> 12.31 ms, QuaRot-2 14.90 -> 14.30 (benchmarks/README.md,
    # "The prepared conversions timed; ZipCache's compile", session 59). The same masks for KIVI's 2-bit keys
    # (weights out of each half's fold) were timed there too and deleted: no faster (300.7 vs 301.7 us at 8k
    # batch 64; steps within 0.5%).
    weighted_crumbs: bool = True
    # ZipCache's prompt-set keys (key mode "lead", row 0 folded into the query once) as offset codes, 2^m + c
    # (`plane_kernel._bf16_offset_nibbles`; 2-bit codes weighted, 2^m + w_g c) instead of the subtract forms: m
    # sum_g (q_g s_g / w_g) comes out of the lead bias once per program, so the prompt tiles convert with 7
    # instructions for 8 values instead of 11 at 4 bits, 12 for 16 instead of 24 at 2. The decode blocks'
    # tiles (dequantized per slot) keep the subtract forms. Offline (`plane_sass.py --modes lead --variants
    # zero_sums offset_keys --bits 4 2 --warps 2`, sm_90, Triton 3.7.1): the prompt loop 877 -> 803 SASS a warp
    # and tile at 4 bits, 964 -> 864 at 2. H100, kernel alone at 488d0ec (off there; `--configs
    # lead_subtract_keys` times the former now), ZipCache's two sets: 31.0 -> 30.3 us at 8k batch 4, 271.9 ->
    # 263.1 at 8k batch 64, 77.2 -> 75.2 at 32k batch 4, 997.3 -> 971.7 at 32k batch 64; steps 8.78 -> 8.71 ms at
    # 32k batch 4, 15.25 -> 15.05 at 8k batch 61 (the same section).
    lead_offset_keys: bool = True
    # QuaRot's query, rotated in the plane kernel's prologue by tensor-core products a plane at a time, stored in
    # the program's own partial-output rows and loaded back (exact) before the tiles, so the planes take the
    # unrotated loads' layout: kept in the products' layout, the tile loop's logits took shuffles and float32
    # moves to meet it. Offline (`plane_sass.py --modes token --variants offset offset_rotated offset_reloaded
    # --window`, sm_90, Triton 3.7.1), SASS a warp and tile, rotated kept -> reloaded (unrotated): 4 bits 776 ->
    # 652 (628) at two warps, 1,311 -> 1,113 (1,113) at one; 2-bit weighted 782 -> 702 (775), 1,443 -> 1,277
    # (1,287). Untimed; off (`quant_attention.py --configs rotated_in_registers`), the planes stay as before.
    reload_rotated_query: bool = True
    # ZipCache's keys (`PackedSlots.prompt_row`: row 0 spans the prompt set, slots [0, lead)) in key mode
    # "lead": tiles aligned to lead, those below it folding row 0 into the query as "row" does, those past it
    # (the decode blocks) read per slot ("rows" in the plane kernel, "gather" in the split kernel); off, every
    # tile is read per slot, as before. H200, kernel alone, ZipCache's two sets (ff5c769, then two launches):
    # 55.7 vs 126.8 us at 32k batch 1, 134.5 vs 389.1 at 128k batch 1 (benchmarks/README.md).
    fold_lead: bool = True
    # Two stores the plane kernel takes with one tile, warps and stages (ZipCache's 4-bit salient set and
    # its 2-bit rest) in one launch, both sets' programs side by side and one combine (`packed_sets_attention`);
    # off, one launch and one combine per set, merged in PyTorch, as before. H100, kernel alone, both sets (and
    # 2-bit rows planar) at d653965 against two launches at f56685a, one call: 40.3 vs 62.9 us at 32k batch 1,
    # 100.8 vs 148.4 at batch 4, 92.8 vs 144.0 at 128k batch 1, 301.6 vs 424.9 at batch 4.
    pair_sets: bool = True
    # With pair_sets, up to FEW_HEADS (sequence, KV head) pairs: each set's split plan takes its share (by
    # slots) of one launch's programs-per-SM target instead of the whole target each, so the pair launch
    # holds about as many programs as one store's would (at two warps and ~255 registers a thread, 4 programs
    # fill an SM's registers; two whole targets made about two waves). H100, kernel alone, ZipCache's two
    # sets (dd96286, sharing then off by default; `--configs pair_whole` now): 40.0 -> 31.9 us at 32k batch 1,
    # 92.1 -> 84.7 at 128k batch 1; above FEW_HEADS (the many-heads target, already two waves by choice) it
    # was 101.3 -> 99.3 at 32k batch 4 and 297.5 -> 353.2 at 128k batch 4, so there each set keeps the whole.
    # ZipCache's step at 32k batch 4 with sharing at every size: 9.65 ms against 9.68 (1.57x either way).
    pair_shared_target: bool = True
    # The plane kernel's tiles wholly inside a split's live slots (all but its first and last, and below
    # lead for ZipCache's sets) in a loop of their own, without slot masks (`_plane_split`'s UNMASKED).
    # Offline (sm_90, Triton 3.7.1, `plane_sass.py`): ZipCache's prompt loop 833 -> 757 instructions a warp
    # and tile at 4 bits, 1,074 -> 975 at 2; KIVI's "halves" 1,640 -> 1,572 and 1,991 -> 1,899. Off: timed
    # without a consistent gain (`quant_attention.py --configs unmasked`; benchmarks/README.md).
    unmasked_tiles: bool = False
    # With pair_sets, above FEW_HEADS pairs: the pair launch's split target chosen from a few by an estimate
    # of its waves (`plane_kernel.wave_target`) instead of `programs_per_sm_many_heads` alone. H100,
    # kernel alone, ZipCache's two sets at 32k batch 4: 85.9 us (4 programs an SM) against 98.0 (8).
    pair_wave_target: bool = True
    # Above FEW_HEADS pairs, a single store's split target by the same estimate of its waves
    # (`plane_kernel.wave_target`). Offline, at 8k batch 64 of Llama-3.1-8B's shape (512 pairs),
    # the estimate gives per-token 2-bit codes at one warp 2 splits a pair (1 wave) where the many-heads target
    # gives 3 (1.45 waves of 1,056 programs): ~25% shorter by the estimate. Off: on an H100, kernel alone
    # (f908c31), it lost on per-token 2-bit codes (181.6 -> 201.5 us at 8k batch 64, 680.2 -> 759.0 at 32k) and
    # gained 3-10% on KIVI-2's "halves" (356.1 -> 345.8, 1,375.8 -> 1,339.0; 32.1 -> 29.0 at 8k batch 4).
    # This field turns it on for every key mode; `halves_wave_target` for KIVI's alone.
    store_wave_target: bool = False
    # The same for KIVI's layout ("halves") alone, the key mode where it won. H100, kernel alone at 15ce4b2
    # (`quant_attention.py --configs default,store_waves`), KIVI-2 / KIVI-4 us: 8k batch 4 29.4 -> 26.6 /
    # 31.7 -> 29.0, 8k batch 64 313.4 -> 301.6 / 304.8 -> 293.1, 32k batch 4 84.4 -> 81.2 / 84.3 -> 81.8, 32k
    # batch 64 1,190.8 -> 1,173.6 / 1,145.3 -> 1,124.9; KIVI-2's step at 32k batch 4 9.01 -> 8.84 ms, at 32k
    # batch 64 44.51 -> 43.24 (benchmarks/README.md, "KIVI's zero-points read as [N, 4]").
    halves_wave_target: bool = True
    # The plane kernel's products with the codes as the tensor cores' first operand (`plane_kernel._scores`,
    # `_weighted_values`) for the key modes in `plane_kernel.CODES_FIRST_KEY_MODES`: a product's first operand
    # has 16 rows and its second 8 columns, so a GQA group of 4 query rows pads to 8 instead of 16. KIVI's
    # layout ("halves") then takes `halves_programs_per_sm` and `halves_max_registers`. H100
    # (benchmarks/README.md, "The codes first"): KIVI-2's step at 32k batch 4 9.96 -> 9.26 ms, KIVI-4's
    # unchanged; kernel alone per-token 4-bit 2.5-5% faster at 32k and 128k, batch 1 and 4, KIVI-2 13% slower
    # at 128k batch 4 (then at 6 / 12 programs an SM, uncapped).
    codes_first: bool = True
    halves_programs_per_sm: tuple[int, int] = (8, 16)  # (programs_per_sm, programs_per_sm_many_heads)
    # KIVI's layout ("halves", codes first): its plane kernels' registers a thread capped (ptxas `maxnreg`; 0:
    # ptxas's choice, then `halves_programs_per_sm` = 6, 12), so that 8 two-warp programs fit an SM (ptxas
    # gives KIVI-2's windowed kernel 168 registers, 6 programs; KIVI-4's 255, 4). Offline (sm_90, Triton 3.6,
    # 2 warps, windowed): KIVI-2's loop 1,420 -> 1,462 instructions a warp and tile with 2 local-memory
    # operations in it, KIVI-4's 1,298 -> 1,336 with none (16 outside). H100 (benchmarks/README.md, "The
    # register cap"), against no cap at 6 / 12 programs: KIVI-2's step at 32k batch 4 9.53 -> 9.38 ms; kernel
    # alone KIVI-2 / KIVI-4 faster at 32k batch 1 and 4 and 128k batch 4 (416 -> 341 us, 387 -> 314); at 128k
    # batch 1 KIVI-2 1.2% slower, KIVI-4 0.3% faster. With a cap the plane operators run opaque to torch.compile
    # (`plane_kernel.plane_operators`): Inductor's copy of a user kernel keeps warps and stages but no `maxnreg`.
    halves_max_registers: int = 128
    # The same cap for the other key modes' plane kernels (0: none). Offline at 128, per-token 4-bit's loop
    # 882 -> 908 instructions a warp and tile; not timed in a step for these layouts, so off.
    max_registers: int = 0
    # The plane kernel's query rows a tile (BLOCK_G, `plane_kernel.query_block`): the group or this, whichever
    # is more, rounded up to a power of two; per-token keys ("token": QuaRot's and RTN's) at least
    # `query_rows_token_keys`; one launch's two stores take the larger of theirs. 16 is one
    # tensor-core product's rows, so a GQA group of 4 padded to it computes 12 empty rows in every
    # elementwise step (the folded queries, the softmax, p * s); below 16 Triton pads inside the product
    # (its `min_dot_size` on NVIDIA is 1) and the layouts hold only the rows asked for. Offline (sm_90,
    # Triton 3.6, 2 warps, `plane_sass.py --block-g`): KIVI-4's "halves" loop 1,641 -> 1,454 instructions a
    # warp and tile at 4 rows, KIVI-2's 1,989 -> 1,553. H100, kernel alone at 32k batch 4 (us, 16 / 8 / 4
    # rows): KIVI-4 121.9 / 104.9 / 101.9, KIVI-2 133.2 / 113.6 / 102.5, ZipCache's sets 84.4 / 76.5 /
    # 76.7, per-token 4-bit 64.4 / 59.3 / 63.4 (at 128k batch 1: 64.3 / 59.6 / 66.2), so per-token keys
    # take 8; KIVI-4's step at 32k batch 4: 10.04 -> 9.45 ms (benchmarks/README.md, "The plane kernel's
    # query rows").
    query_rows: int = 1
    query_rows_token_keys: int = 8


FEW_HEADS = 16  # (sequence, KV head) pairs up to which a launch targets `programs_per_sm`


# The launch every call uses; `benchmarks/quant_attention.py --configs` times alternatives to this one.
LAUNCH = LaunchConfig()


def _split_plan(batch_heads: int, slots: int, num_sms: int, launch: LaunchConfig) -> tuple[int, int]:
    """(number of splits, slots per split): `kvbench.kernels._split_plan` with this kernel's tile and target."""
    tiles = max(1, -(-slots // launch.block_n))  # S = 0: one split, empty, so out = 0 and lse = -inf
    per_sm = launch.programs_per_sm if batch_heads <= FEW_HEADS else launch.programs_per_sm_many_heads
    wanted = -(-per_sm * num_sms // batch_heads)
    tiles_per_split = -(-tiles // max(1, min(wanted, tiles, kernels.MAX_SPLITS)))
    return -(-tiles // tiles_per_split), tiles_per_split * launch.block_n


def _param_mode(packed: PackedSlots, dim: int, launch: LaunchConfig, can_align: bool) -> str:
    """How the kernel applies a store's scales and zero-points (the module doc says why):
    "slot": one parameter per slot, folded into the dot products;
    "row": per-channel rows of a multiple of block_n slots, tiles aligned to them, one row folded per tile;
    "lead": per-channel rows whose row 0 spans a prompt set (`PackedSlots.prompt_row`, ZipCache's keys;
    the launch's `fold_lead`), tiles aligned to lead: a tile below lead folds row 0, as "row", one past
    it (a decode block's) reads every slot's row, as "gather";
    "rows": per-channel rows of a power-of-two divisor of block_n slots, tiles aligned, each row broadcast;
    "columns": per-token groups of a power-of-two width, each group's parameter broadcast;
    "gather": anything else, every slot's row read for every value.
    Only keys align tiles to their rows (`can_align`), so per-channel values take "gather"."""
    rows, cols, block_n = packed.row_tokens, packed.col_channels, launch.block_n
    if rows == 1 and cols >= dim:
        return "slot"
    if rows == 1 and cols & (cols - 1) == 0:
        return "columns"
    if can_align and cols == 1 and rows % block_n == 0:
        return "row"
    if can_align and cols == 1 and packed.prompt_row and launch.fold_lead:
        return "lead"
    if can_align and cols == 1 and block_n % rows == 0:
        return "rows"
    return "gather"


if kernels.triton is not None:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    # A plain global of this module under its own name, as the kernels' other helpers: jit code calls it by
    # name, and Inductor's copy of a `wrap_triton` kernel defines a helper under its `def` name only.
    _online_softmax = kernels._online_softmax

    @triton.jit
    def _halve(fields, HALF: tl.constexpr):
        """int32 fields [N, W] of 2 * HALF bits -> their low and high halves in stream order, [N, 2W]."""
        low = fields & ((1 << HALF) - 1)
        return tl.reshape(tl.join(low, fields >> HALF), [fields.shape[0], 2 * fields.shape[1]])

    @triton.jit
    def _split_fields(fields, FIELD_BITS: tl.constexpr, BITS: tl.constexpr, PAIRS: tl.constexpr):
        """int32 fields [N, W], each FIELD_BITS bits holding FIELD_BITS // BITS codes (code i at bits
        [i * BITS, (i + 1) * BITS)) -> the codes in stream order, [N, W * FIELD_BITS // BITS]; with PAIRS
        (BITS < 8), the codes two by two instead, [N, W * FIELD_BITS // BITS // 2]: the even channel's code
        in the low 16 bits and the odd one's in the high 16, as a pair of 16-bit floats sits in a register
        (`_dot_codes`). Fields are halved down to two codes each (at most twice: a 24-bit word of eight
        3-bit codes), then split once more or spread into a pair by one shift: the two codes' bits are
        disjoint from the shifted ones, so f | f << (16 - BITS) holds the first at bit 0 and the second at
        bit 16."""
        codes = fields
        if FIELD_BITS // 2 >= 2 * BITS:
            codes = _halve(codes, FIELD_BITS // 2)
        if FIELD_BITS // 4 >= 2 * BITS:
            codes = _halve(codes, FIELD_BITS // 4)
        if 2 * BITS <= FIELD_BITS:  # fields of two codes (8-bit codes are whole bytes already)
            if PAIRS:  # noqa: SIM108 (a constexpr branch: Triton compiles only the side taken)
                codes = (codes | (codes << (16 - BITS))) & (((1 << BITS) - 1) * 0x10001)
            else:
                codes = _halve(codes, BITS)
        return codes

    @triton.jit
    def _load_codes(
        base,
        slots,
        live,
        stride_s,
        stride_c,
        ROW_BYTES: tl.constexpr,
        BITS: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PAIRS: tl.constexpr,
    ):
        """The codes of the slots' rows, int32 [N, BLOCK_D] in channel order (0 where masked), or with PAIRS
        (3 bits) [N, BLOCK_D // 2] pairs of them (`_split_fields`). Planar rows (2 and 4 bits) are read a
        code at a time: this kernel takes them only for layouts `_plane_split_kernel` does not."""
        if BITS == 2 or BITS == 4:  # planar (`kvbench.quant`): channel d is plane d // W of element d % W
            offs = tl.arange(0, BLOCK_D)
            element_bytes: tl.constexpr = BITS // 2  # four codes: a byte (2 bits) or a 16-bit word (4 bits)
            width = ROW_BYTES // element_bytes
            plane = offs // width
            byte = (offs % width) * element_bytes + plane * BITS // 8
            mask = live[:, None] & (offs < 4 * width)[None, :]
            fields = tl.load(base + slots[:, None] * stride_s + byte[None, :] * stride_c, mask=mask, other=0)
            codes = (fields.to(tl.int32) >> (plane * BITS % 8)[None, :]) & ((1 << BITS) - 1)
        elif BITS == 8:  # whole bytes: one contiguous load of the rows
            offs = tl.arange(0, BLOCK_D)
            # ROW_BYTES is a constant: for whole rows (the usual case) the column mask folds away.
            mask = live[:, None] & (offs < ROW_BYTES)[None, :]
            codes = tl.load(base + slots[:, None] * stride_s + offs[None, :] * stride_c, mask=mask, other=0)
            codes = codes.to(tl.int32)
        else:  # 3 bits: 8 codes per 3 bytes, read as 24-bit words
            chunk = tl.arange(0, BLOCK_D // 8)
            ptr = base + slots[:, None] * stride_s + (chunk * 3)[None, :] * stride_c
            mask = live[:, None] & (chunk * 3 < ROW_BYTES)[None, :]
            fields = tl.load(ptr, mask=mask, other=0).to(tl.int32)
            fields |= tl.load(ptr + stride_c, mask=mask, other=0).to(tl.int32) << 8
            fields |= tl.load(ptr + 2 * stride_c, mask=mask, other=0).to(tl.int32) << 16
            codes = _split_fields(fields, 24, BITS, PAIRS)
        return codes

    @triton.jit
    def _as_float(codes):
        """int32 codes as float32, exactly: 0x4B000000 is 2^23, whose last mantissa bit weighs 1, so OR-ing a
        code < 2^23 into it gives 2^23 + code, and subtracting 2^23 is exact too."""
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _code_values(codes, dtype: tl.constexpr, PAIRS: tl.constexpr):
        """int32 codes [R, W] as dtype values, or with PAIRS (dtype in 16 bits) their pairs [R, W]
        (`_split_fields`) as offset codes [R, 2W]: in 16 bits the exponent trick needs no subtraction per
        value, 0x4300 | code being the bfloat16 128 + code (exact below 128: 8 significant bits) and
        0x6400 | code the float16 1024 + code, so one OR makes a register of two."""
        if PAIRS:
            halves = codes | (0x43004300 if dtype == tl.bfloat16 else 0x64006400)
            both = tl.join(halves.to(tl.int16), (halves >> 16).to(tl.int16))
            values = tl.reshape(both, [codes.shape[0], 2 * codes.shape[1]]).to(dtype, bitcast=True)
        else:
            values = _as_float(codes).to(dtype)
        return values

    @triton.jit
    def _dot_codes(a, codes, TRANS: tl.constexpr, PAIRS: tl.constexpr, PRECISION: tl.constexpr):
        """a [M, K] @ the codes' values in float32, given to the tensor cores in a's dtype as `_code_values`
        of codes [K, .] (or [., K] with TRANS); with PAIRS the offset's share of the dot, offset * sum(a),
        is subtracted once per row."""
        values = _code_values(codes, a.dtype, PAIRS)
        if TRANS:
            values = tl.trans(values)
        dot = tl.dot(a, values, input_precision=PRECISION)
        if PAIRS:
            offset = 128.0 if a.dtype == tl.bfloat16 else 1024.0  # what `_code_values` added
            dot -= offset * tl.sum(a.to(tl.float32), axis=1)[:, None]
        return dot

    @triton.jit
    def _dequantize(codes, scale, zero, DTYPE: tl.constexpr, PAIRS: tl.constexpr):
        """code * scale + zero in DTYPE, from int32 codes, or with PAIRS their pairs (`_split_fields`). Pairs
        are dequantized in float16, the parameters' own type: 0x6400 | code is 1024 + code, minus 1024 is the
        code exactly, and code * scale + zero is then one rounded multiply-add, with no conversion per value
        of the codes or the parameters."""
        if PAIRS:
            values = ((_code_values(codes, tl.float16, True) - 1024.0) * scale + zero).to(DTYPE)
        else:
            values = (_as_float(codes) * scale.to(tl.float32) + zero.to(tl.float32)).to(DTYPE)
        return values

    @triton.jit
    def _slot_rows(slots, lead, ROW_TOKENS: tl.constexpr):
        """The parameter row of each slot (the module doc's rule); meaningless where slots < 0."""
        if ROW_TOKENS == 1:  # one row per slot after the lead's: one max, not a compare and a select
            return tl.maximum(slots + 1 - lead, 0)
        return tl.where(slots < lead, 0, 1 + (slots - lead) // ROW_TOKENS)

    @triton.jit
    def _slot_params(base, slots, live, lead, stride_r, ROW_TOKENS: tl.constexpr):
        """Mode "slot": the one parameter of each slot, float32 [N]."""
        rows = _slot_rows(slots, lead, ROW_TOKENS)
        return tl.load(base + rows * stride_r, mask=live, other=0.0).to(tl.float32)

    @triton.jit
    def _tile_params(
        base,
        slots,
        live,
        tile,
        start,
        end,
        lead,
        stride_r,
        stride_c,
        dim,
        MODE: tl.constexpr,
        ROW_TOKENS: tl.constexpr,
        COL_CHANNELS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Modes "rows", "columns" and "gather": the parameter of every value of the tile as stored (float16),
        [BLOCK_N, BLOCK_D]; `tile` is the first slot of a tile aligned to the rows (mode "rows")."""
        offs_d = tl.arange(0, BLOCK_D)
        if MODE == "rows":  # BLOCK_N // ROW_TOKENS whole rows, each read once
            firsts = tile + tl.arange(0, BLOCK_N // ROW_TOKENS) * ROW_TOKENS
            any_live = (firsts < end) & (firsts + ROW_TOKENS > start)
            rows = _slot_rows(firsts, lead, ROW_TOKENS)
            params = tl.load(
                base + rows[:, None] * stride_r + offs_d[None, :] * stride_c,
                mask=any_live[:, None] & (offs_d < dim)[None, :],
                other=0.0,
            )
            params = tl.broadcast_to(params[:, None, :], [BLOCK_N // ROW_TOKENS, ROW_TOKENS, BLOCK_D])
            return tl.reshape(params, [BLOCK_N, BLOCK_D])
        elif MODE == "columns":  # one row per slot, one parameter per group of COL_CHANNELS channels
            cols = tl.arange(0, BLOCK_D // COL_CHANNELS)
            rows = _slot_rows(slots, lead, ROW_TOKENS)
            params = tl.load(
                base + rows[:, None] * stride_r + cols[None, :] * stride_c,
                mask=live[:, None] & (cols < dim // COL_CHANNELS)[None, :],
                other=0.0,
            )
            params = tl.broadcast_to(params[:, :, None], [BLOCK_N, BLOCK_D // COL_CHANNELS, COL_CHANNELS])
            return tl.reshape(params, [BLOCK_N, BLOCK_D])
        else:
            rows = _slot_rows(slots, lead, ROW_TOKENS)
            return tl.load(
                base + rows[:, None] * stride_r + (offs_d // COL_CHANNELS)[None, :] * stride_c,
                mask=live[:, None] & (offs_d < dim)[None, :],
                other=0.0,
            )

    # Split sizes change with batch and context; specialising on them (== 1, divisible by 16) would only
    # recompile the kernel.
    @triton.jit(do_not_specialize=["split_len", "num_splits"])
    def _packed_split_kernel(
        q_ptr,
        kc_ptr,
        ks_ptr,
        kz_ptr,
        k_lead_ptr,
        vc_ptr,
        vs_ptr,
        vz_ptr,
        v_lead_ptr,
        len_ptr,
        o_part_ptr,
        lse_part_ptr,
        scale_log2,
        num_kv_heads,
        group,
        split_len,
        num_splits,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kcb,
        stride_kch,
        stride_kcs,
        stride_kcc,
        stride_ksb,
        stride_ksh,
        stride_ksr,
        stride_ksc,
        stride_vcb,
        stride_vch,
        stride_vcs,
        stride_vcc,
        stride_vsb,
        stride_vsh,
        stride_vsr,
        stride_vsc,
        HEAD_DIM: tl.constexpr,
        VALUE_DIM: tl.constexpr,
        K_ROW_BYTES: tl.constexpr,
        V_ROW_BYTES: tl.constexpr,
        K_BITS: tl.constexpr,
        K_ROW_TOKENS: tl.constexpr,
        K_COL_CHANNELS: tl.constexpr,
        K_MODE: tl.constexpr,
        K_PAIRS: tl.constexpr,
        V_BITS: tl.constexpr,
        V_ROW_TOKENS: tl.constexpr,
        V_COL_CHANNELS: tl.constexpr,
        V_MODE: tl.constexpr,
        V_PAIRS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One (sequence, KV head, split): `kvbench.kernels._decode_split_kernel` over packed tiles. The loop
        stops at the sequence's live length, so splits past it read nothing."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // num_kv_heads).to(tl.int64)
        h = (bh % num_kv_heads).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        g_ok = offs_g < group
        d_ok = offs_d < HEAD_DIM
        dv_ok = offs_dv < VALUE_DIM
        heads = h * group + offs_g

        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        q_f32 = q.to(tl.float32)
        q_sum = tl.sum(q_f32, axis=1)  # the zero-points' weight when they are folded
        kc_base = kc_ptr + b * stride_kcb + h * stride_kch
        ks_base = ks_ptr + b * stride_ksb + h * stride_ksh
        kz_base = kz_ptr + b * stride_ksb + h * stride_ksh
        vc_base = vc_ptr + b * stride_vcb + h * stride_vch
        vs_base = vs_ptr + b * stride_vsb + h * stride_vsh
        vz_base = vz_ptr + b * stride_vsb + h * stride_vsh
        # int32 slot arithmetic: 64-bit compares and divisions per slot cost twice the instructions
        k_lead = tl.load(k_lead_ptr + b).to(tl.int32)
        v_lead = tl.load(v_lead_ptr + b).to(tl.int32)
        length = tl.load(len_ptr + b).to(tl.int32)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        first = start
        if K_MODE == "row" or K_MODE == "rows" or K_MODE == "lead":
            # Tiles start where key parameter rows do (lead + a multiple of BLOCK_N), so none straddles
            # two rows ("row") or the prompt set's row and a decode block's ("lead"), or a row boundary cuts
            # it into whole rows ("rows"); the first may begin before the split and the last reach past it,
            # their outside slots masked.
            first = start - (start + BLOCK_N - k_lead % BLOCK_N) % BLOCK_N
        if K_MODE == "lead":  # row 0, the prompt set's, folded into the query once: (q * s_0).c + q.z_0
            lead_scale = tl.load(ks_base + offs_d * stride_ksc, mask=d_ok, other=0.0).to(tl.float32)
            lead_zero = tl.load(kz_base + offs_d * stride_ksc, mask=d_ok, other=0.0).to(tl.float32)
            q_lead = (q_f32 * lead_scale[None, :]).to(q.dtype)
            lead_bias = tl.sum(q_f32 * lead_zero[None, :], axis=1)
        # One parameter per slot ("slot") is read a tile ahead: 2-byte loads are too narrow for the
        # pipeliner's asynchronous copies, so read in the tile that uses them they would stall it.
        ahead = first + offs_n
        ahead_live = (ahead >= start) & (ahead < end)
        if K_MODE == "slot":
            k_scale = _slot_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, K_ROW_TOKENS)
            k_zero = _slot_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, K_ROW_TOKENS)
        if V_MODE == "slot":
            v_scale = _slot_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, V_ROW_TOKENS)
            v_zero = _slot_params(vz_base, ahead, ahead_live, v_lead, stride_vsr, V_ROW_TOKENS)
        # "lead" runs two loops, the prompt set's tiles (row 0 folded) and then the decode blocks' (gathered
        # rows), so that neither carries the other's registers (one loop with a branch per tile spilled:
        # benchmarks/README.md, "Both timed on the H200"). Other modes run one loop.
        PHASES: tl.constexpr = 2 if K_MODE == "lead" else 1
        lead_tile = tl.minimum(tl.maximum(k_lead, first), end)  # tiles are aligned to lead
        for phase in tl.static_range(PHASES):
            lo = first
            hi = end
            if PHASES == 2:
                lo = first if phase == 0 else lead_tile
                hi = lead_tile if phase == 0 else end
            for tile in range(lo, hi, BLOCK_N):
                slots = tile + offs_n
                live = (slots >= start) & (slots < end)
                ahead = slots + BLOCK_N
                ahead_live = (ahead >= start) & (ahead < end)
                k = _load_codes(kc_base, slots, live, stride_kcs, stride_kcc, K_ROW_BYTES, K_BITS, BLOCK_D, K_PAIRS)
                if K_MODE == "slot":  # q.(c s + z) = s (q.c) + z sum(q)
                    scale, zero = k_scale, k_zero
                    k_scale = _slot_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, K_ROW_TOKENS)
                    k_zero = _slot_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, K_ROW_TOKENS)
                    qk = _dot_codes(q, k, True, K_PAIRS, PRECISION)
                    logits = qk * scale[None, :] + q_sum[:, None] * zero[None, :]
                elif K_MODE == "row":  # one row for the tile: (q * s).c + q.z
                    row = tl.where(tile < k_lead, 0, 1 + (tile - k_lead) // K_ROW_TOKENS)
                    scale = tl.load(ks_base + row * stride_ksr + offs_d * stride_ksc, mask=d_ok, other=0.0)
                    zero = tl.load(kz_base + row * stride_ksr + offs_d * stride_ksc, mask=d_ok, other=0.0)
                    q_scaled = (q_f32 * scale.to(tl.float32)[None, :]).to(q.dtype)
                    bias = tl.sum(q_f32 * zero.to(tl.float32)[None, :], axis=1)
                    logits = _dot_codes(q_scaled, k, True, K_PAIRS, PRECISION) + bias[:, None]
                elif K_MODE == "lead":  # phase 0: the prompt set's tiles (below lead); 1: the decode blocks'
                    if phase == 0:
                        logits = _dot_codes(q_lead, k, True, K_PAIRS, PRECISION) + lead_bias[:, None]
                    else:  # as "gather" below (written out: a helper shared with it changed their SASS)
                        block_scale = _tile_params(
                            ks_base, slots, live, tile, start, end, k_lead, stride_ksr, stride_ksc, HEAD_DIM,
                            "gather", K_ROW_TOKENS, K_COL_CHANNELS, BLOCK_N, BLOCK_D,
                        )  # fmt: skip
                        block_zero = _tile_params(
                            kz_base, slots, live, tile, start, end, k_lead, stride_ksr, stride_ksc, HEAD_DIM,
                            "gather", K_ROW_TOKENS, K_COL_CHANNELS, BLOCK_N, BLOCK_D,
                        )  # fmt: skip
                        block_keys = _dequantize(k, block_scale, block_zero, q.dtype, K_PAIRS)
                        logits = tl.dot(q, tl.trans(block_keys), input_precision=PRECISION)
                else:
                    scale = _tile_params(
                        ks_base, slots, live, tile, start, end, k_lead, stride_ksr, stride_ksc, HEAD_DIM,
                        K_MODE, K_ROW_TOKENS, K_COL_CHANNELS, BLOCK_N, BLOCK_D,
                    )  # fmt: skip
                    zero = _tile_params(
                        kz_base, slots, live, tile, start, end, k_lead, stride_ksr, stride_ksc, HEAD_DIM,
                        K_MODE, K_ROW_TOKENS, K_COL_CHANNELS, BLOCK_N, BLOCK_D,
                    )  # fmt: skip
                    k = _dequantize(k, scale, zero, q.dtype, K_PAIRS)
                    logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                p, alpha, m_new, l_i = _online_softmax(logits, live, m_i, l_i, scale_log2)

                v = _load_codes(vc_base, slots, live, stride_vcs, stride_vcc, V_ROW_BYTES, V_BITS, BLOCK_DV, V_PAIRS)
                if V_MODE == "slot":  # p (c s + z) = (p s) c + (p.z)
                    scale, zero = v_scale, v_zero
                    v_scale = _slot_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, V_ROW_TOKENS)
                    v_zero = _slot_params(vz_base, ahead, ahead_live, v_lead, stride_vsr, V_ROW_TOKENS)
                    p_scaled = (p * scale[None, :]).to(q.dtype)
                    pv = _dot_codes(p_scaled, v, False, V_PAIRS, PRECISION) + tl.sum(p * zero[None, :], axis=1)[:, None]
                else:
                    scale = _tile_params(
                        vs_base, slots, live, tile, start, end, v_lead, stride_vsr, stride_vsc, VALUE_DIM,
                        V_MODE, V_ROW_TOKENS, V_COL_CHANNELS, BLOCK_N, BLOCK_DV,
                    )  # fmt: skip
                    zero = _tile_params(
                        vz_base, slots, live, tile, start, end, v_lead, stride_vsr, stride_vsc, VALUE_DIM,
                        V_MODE, V_ROW_TOKENS, V_COL_CHANNELS, BLOCK_N, BLOCK_DV,
                    )  # fmt: skip
                    pv = tl.dot(p.to(q.dtype), _dequantize(v, scale, zero, q.dtype, V_PAIRS), input_precision=PRECISION)
                acc = acc * alpha[:, None] + pv
                m_i = m_new

        any_live = l_i > 0.0
        out = acc / tl.where(any_live, l_i, 1.0)[:, None]
        lse2 = tl.where(any_live, m_i + tl.log2(tl.where(any_live, l_i, 1.0)), float("-inf"))
        rows = (b * num_kv_heads * group + heads) * num_splits + split  # kvbench.kernels' partial layout
        tl.store(o_part_ptr + rows[:, None] * VALUE_DIM + offs_dv[None, :], out, mask=g_ok[:, None] & dv_ok[None, :])
        tl.store(lse_part_ptr + rows, lse2, mask=g_ok)

    def _packed_attention_triton(
        query: torch.Tensor,
        keys: PackedSlots,
        values: PackedSlots,
        lengths: torch.Tensor,
        scale: float,
        launch: LaunchConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, hq, d = query.shape
        hkv, s = keys.codes.shape[1], keys.codes.shape[2]
        dv = values.codes.shape[-1] * 8 // values.bits
        group = hq // hkv
        num_splits, split_len = _split_plan(b * hkv, s, kernels._num_sms(query.device), launch)
        o_part = torch.empty(b * hq, num_splits, dv, dtype=torch.float32, device=query.device)
        lse_part = torch.empty(b * hq, num_splits, dtype=torch.float32, device=query.device)
        upcast, precision = kernels._upcast_and_precision(query.dtype)
        key_mode = _param_mode(keys, d, launch, can_align=True)
        value_mode = _param_mode(values, dv, launch, can_align=False)
        # Codes in pairs (`_split_fields`) where the dot is in 16 bits and codes are below 128.
        half_dot = query.dtype in (torch.bfloat16, torch.float16) and not upcast
        wrap_triton(_packed_split_kernel)[(b * hkv, num_splits)](
            query,
            keys.codes,
            keys.scale,
            keys.zero,
            keys.lead,
            values.codes,
            values.scale,
            values.zero,
            values.lead,
            lengths,
            o_part,
            lse_part,
            scale * kernels.LOG2E,
            hkv,
            group,
            split_len,
            num_splits,
            *query.stride(),
            *keys.codes.stride(),
            *keys.scale.stride(),
            *values.codes.stride(),
            *values.scale.stride(),
            HEAD_DIM=d,
            VALUE_DIM=dv,
            K_ROW_BYTES=keys.codes.shape[-1],
            V_ROW_BYTES=values.codes.shape[-1],
            K_BITS=keys.bits,
            K_ROW_TOKENS=keys.row_tokens,
            K_COL_CHANNELS=keys.col_channels,
            K_MODE=key_mode,
            K_PAIRS=half_dot and keys.bits == 3,  # the stream rows (2 and 4 bits are planar, 8 whole bytes)
            V_BITS=values.bits,
            V_ROW_TOKENS=values.row_tokens,
            V_COL_CHANNELS=values.col_channels,
            V_MODE=value_mode,
            V_PAIRS=half_dot and values.bits == 3,
            BLOCK_G=kernels._dot_block(group),
            BLOCK_N=launch.block_n,
            BLOCK_D=kernels._dot_block(d),
            BLOCK_DV=kernels._dot_block(dv),
            UPCAST=upcast,
            PRECISION=precision,
            num_warps=launch.num_warps,
            num_stages=launch.num_stages,
        )
        return kernels._combine_splits(o_part, lse_part, b, hq, query.dtype)


@kernels._make_op("kvbench::packed_decode_attention")  # the layouts `plane_kernel.plane_plan` leaves to this one
def _packed_attention_op(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_lead: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    v_lead: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    k_format: list[int],
    v_format: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    keys = PackedSlots(k_codes, k_scale, k_zero, k_lead, *k_format)
    values = PackedSlots(v_codes, v_scale, v_zero, v_lead, *v_format)
    if kernels._use_triton(query):
        return _packed_attention_triton(query, keys, values, lengths, scale, LAUNCH)
    return packed_decode_attention_reference(query, keys, values, lengths, scale)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x @ rotation / sqrt(n) over x's last dimension n, in float32, returned in x's dtype (rotation: a
    [n, n] matrix of +-1 entries, `kvbench.hadamard.hadamard_matrix(n, normalized=False)`)."""
    return (x.float() @ rotation.float() * x.shape[-1] ** -0.5).to(x.dtype)


def scale_channels(out: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """out [B, Hq, Dv] times each channel's scale out_scale [B, Hkv, Dv] (query head h takes KV head
    h // (Hq / Hkv)'s), in float32, returned in out's dtype: what the combine kernel does with `out_scale`."""
    group = out.shape[1] // out_scale.shape[1]
    return (out.float() * out_scale.float().repeat_interleave(group, dim=1)).to(out.dtype)


def merge_attention(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over disjoint sets of slots, each (out [B, Hq, Dv], lse [B, Hq]), as one: the outputs
    weighted by exp(lse_i - lse), lse = logsumexp of the lse_i (-inf and a zero output where none is live).
    One piece is returned as it is: no kernels (a merge of one piece cost ~32 us a call in a CUDA graph on
    the H100, `quant_attention.py` at d653965, where every layout went through `packed_sets_attention`)."""
    if len(pieces) == 1:
        return pieces[0]
    lse = torch.logsumexp(torch.stack([piece_lse for _, piece_lse in pieces]), dim=0)
    finite = lse.nan_to_num(neginf=0.0)
    out = sum(torch.exp(piece_lse - finite).unsqueeze(-1) * out.float() for out, piece_lse in pieces)
    return out.to(pieces[0][0].dtype), lse


def _check_store(query: torch.Tensor, keys: PackedSlots, values: PackedSlots) -> None:
    b, hq, d = query.shape
    if keys.codes.shape[0] != b or hq % keys.codes.shape[1] or keys.codes.shape[-1] * 8 != d * keys.bits:
        raise ValueError(f"query {tuple(query.shape)} does not fit packed keys {tuple(keys.codes.shape)}")
    if keys.scale.stride() != keys.zero.stride() or values.scale.stride() != values.zero.stride():
        raise ValueError("scale and zero-point must share one layout")


def _formats(keys: PackedSlots, values: PackedSlots) -> tuple[list[int], list[int]]:
    """A store's static fields as the operators take them: int lists."""
    return [int(f) for f in keys[4:]], [int(f) for f in values[4:]]


def packed_sets_attention(
    query: torch.Tensor,
    sets: list[tuple[PackedSlots, PackedSlots, torch.Tensor]],
    scale: float,
    window: Window | None = None,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`packed_decode_attention` over several stores at once, each (keys, values, lengths) (ZipCache's two
    sets), and the window where given, as one attention, its output times `out_scale` where given (as
    `packed_decode_attention`'s). Two stores that `plane_kernel.pair_fits` are one launch of the plane kernel
    (both sets' programs side by side, the window's after them) and one combine (the launch's `pair_sets`),
    which scales the channels; otherwise each store is its own call (the window in the first) and the
    results are merged through the log-sum-exp, then scaled."""
    for keys, values, _ in sets:
        _check_store(query, keys, values)
    if len(sets) == 2 and LAUNCH.pair_sets and plane_kernel.pair_fits(sets[0][:2], sets[1][:2], LAUNCH):
        (k1, v1, len1), (k2, v2, len2) = sets
        held = window if window is not None else (None,) * len(Window._fields)
        return plane_kernel.plane_operators((k1, v1), LAUNCH, (k2, v2))[1](
            query, *k1[:4], *v1[:4], len1, *k2[:4], *v2[:4], len2, *held, out_scale, float(scale),
            *_formats(k1, v1), *_formats(k2, v2),
        )  # fmt: skip
    pieces = [
        packed_decode_attention(query, keys, values, lengths, scale, window if i == 0 else None)
        for i, (keys, values, lengths) in enumerate(sets)
    ]
    out, lse = merge_attention(pieces)
    return (out if out_scale is None else scale_channels(out, out_scale)), lse


def packed_decode_attention(
    query: torch.Tensor,
    keys: PackedSlots,
    values: PackedSlots,
    lengths: torch.Tensor,
    scale: float,
    window: Window | None = None,
    rotation: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence, query [B, Hq, D], over the live slots (slot < lengths[b]) of a
    packed store, and over a full-precision `window` too where one is given. Returns (out [B, Hq, Dv] in the
    query's dtype, lse [B, Hq] float32); no live slot gives out = 0 and lse = -inf, as
    `kvbench.kernels.decode_attention`. With `rotation` R (a +-1 [D, D] matrix, D = Dv; QuaRot), the slots
    hold rotated keys and values: the query is rotated to meet them, q R / sqrt(D), and the output rotated
    back, out R / sqrt(D) (R R = D I for a Hadamard matrix). With `out_scale` [B, Hkv, Dv] (channels
    contiguous; ZipCache's channel scales, its values stored divided by them), the output's channels are then
    multiplied by their sequence's and KV head's scales (`scale_channels`). Where the plane kernel takes the
    store, the window is one more of its programs and the rotations happen in its prologue and in the combine
    kernel, as does the channel scaling; otherwise the window is `kvbench.kernels.decode_attention`, merged
    through the log-sum-exp, and the rotations and scaling are products around the call."""
    d = query.shape[-1]
    _check_store(query, keys, values)
    dv = values.codes.shape[-1] * 8 // values.bits
    if rotation is not None and (rotation.shape != (d, d) or dv != d or d & (d - 1) or not rotation.is_contiguous()):
        raise ValueError(
            f"rotation {tuple(rotation.shape)} for head_dim {d}, value dim {dv}: a contiguous [D, D] matrix, "
            "D = head_dim = value dim, a power of two"
        )
    formats = (float(scale), *_formats(keys, values))
    if plane_kernel.plane_plan(keys, values, LAUNCH) is not None:
        held = window if window is not None else (None,) * len(Window._fields)
        return plane_kernel.plane_operators((keys, values), LAUNCH)[0](
            query, *keys[:4], *values[:4], lengths, *held, rotation, out_scale, *formats
        )  # fmt: skip
    q = query if rotation is None else rotate(query, rotation)
    out, lse = torch.ops.kvbench.packed_decode_attention(q, *keys[:4], *values[:4], lengths, *formats)
    if window is not None:
        out, lse = merge_attention([(out, lse), kernels.decode_attention(q, *window.attention_inputs(), scale)])
    out = out if rotation is None else rotate(out, rotation)
    return (out if out_scale is None else scale_channels(out, out_scale)), lse


# `kvbench.plane_kernel` builds on the slots, launch and helpers above, and registers `kvbench::plane_attention`,
# which `packed_decode_attention` calls: imported last, once they exist.
from kvbench import plane_kernel  # noqa: E402

"""Decode attention over planar 2- and 4-bit codes: the plane kernels, the fast path of `kvbench.quant_kernels`.

Planar rows (`kvbench.quant`): a row's D channels are 4 planes of W = D / 4, and element e of the row (a
16-bit word of four 4-bit codes, or a byte of four 2-bit codes) holds channel g * W + e in its g-th field.
Each plane is thus a contiguous block of W channels, and one 32-bit register of elements holds codes of
every plane.

`_plane_split_kernel` is `kvbench.quant_kernels`' flash-decoding split kernel for the 2- and 4-bit stores
whose scales and zero-points it can fold per plane (`plane_plan`: values in per-token groups that planes lie
inside; keys so too, "token": QuaRot and RTN, or per channel: KIVI's "halves", ZipCache's sets "lead", "row",
"rows"). It reads the stores as `kvbench.quant_kernels` lays them out (`PackedSlots`, the slot and
parameter-row rule of its module doc) and is launched as that module's `LAUNCH` says (`LaunchConfig`;
`plane_launch`). Per tile, inline PTX turns each register of elements into registers of two 16-bit floats per
plane with one shift and one mask-or per register (`_bf16_nibbles`, `_f16_nibbles`; for bytes of 2-bit codes
two byte permutes first, `_bf16_crumbs`, `_f16_crumbs`; integer shifts under the interpreter), the four
planes are multiplied as exact codes on the tensor cores, and the parameters are folded into the products,
plane by plane (`kvbench.quant_kernels`' module doc gives the algebra; `_plane_split`'s docstring, each key
mode). For per-token keys and KIVI's "halves" (`CODES_FIRST_KEY_MODES`) the codes are the tensor cores' first
operand (`_scores`, `_weighted_values`: keys . q^T and values^T . p^T, each transposed back as a layout),
so the query rows pad a product to 8 rather than 16 and the tile loop takes fewer registers. The same
launch attends over a full-precision window (one more program) and applies QuaRot's rotation
(the query's in the prologue, the output's in `kvbench.kernels`' combine kernel). `_plane_pair_kernel` runs
two stores (ZipCache's sets, `pair_fits`) in one launch: each store's programs as the single kernel would run
them, side by side, and one combine for both and the window.

`kvbench::plane_attention` and `kvbench::plane_pair_attention` are their operators, which
`kvbench.quant_kernels.packed_decode_attention` and `packed_sets_attention` call: Triton on CUDA tensors and
under Triton's interpreter, the references elsewhere. A launch with a register cap (KIVI's "halves" by
default, `LaunchConfig.halves_max_registers`) goes through their opaque twins (`plane_operators`), which
torch.compile calls as they are, since Inductor's copy of a kernel drops ptxas's `maxnreg`.
Measured in benchmarks/README.md: "quant_attention.py with the plane kernel", "Launch of the 4-bit
kernels", "Where the plane kernel's instructions go" (`benchmarks/plane_sass.py` counts its SASS offline),
"Row sums, offset codes, one warp", "2-bit rows planar; ZipCache's two sets in one launch", "The plane
kernel's query rows", "The codes first", "The register cap for KIVI".
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import replace
from typing import NamedTuple

import torch

from kvbench import kernels, quant_kernels
from kvbench.quant import is_planar
from kvbench.quant_kernels import (
    FEW_HEADS,
    LaunchConfig,
    PackedSlots,
    Window,
    _split_plan,
    merge_attention,
    packed_decode_attention_reference,
    rotate,
    scale_channels,
)


def _fits_planes(group: int, dim: int) -> bool:
    """Per-token groups of `group` channels that each of the 4 planes of `dim` lies inside, at most 16 of them."""
    return dim % 4 == 0 and group % (dim // 4) == 0 and dim // min(group, dim) <= 16


# Key modes whose keys the kernel dequantizes (c * s + z) rather than folding their scales into the query:
# float16 for a 16-bit query, the parameters' own type ("lead" past lead).
DEQUANTIZED_KEY_MODES = ("rows", "lead")


def plane_plan(keys: PackedSlots, values: PackedSlots, launch: LaunchConfig) -> tuple[str, int] | None:
    """(key mode, tile slots) where `_plane_split_kernel` takes a store, else None (`_packed_split_kernel`
    does): planar codes (2 or 4 bits), values in per-token groups that planes lie inside, keys either so too
    ("token") or per channel ("row" where tiles divide the rows; "lead" where row 0 spans a prompt set and
    the launch asks for it: ZipCache's sets, row 0 folded below lead, rows read per slot past it;
    "halves" where a row is half a tile and the launch asks for it: KIVI's 32 tokens in 64-slot tiles;
    "rows" otherwise)."""
    d = keys.codes.shape[-1] * 8 // keys.bits
    dv = values.codes.shape[-1] * 8 // values.bits
    if not (is_planar(keys.bits) and is_planar(values.bits)) or keys.scale.stride(-1) != 1 != values.scale.stride(-1):
        return None
    if values.row_tokens != 1 or not _fits_planes(values.col_channels, dv):
        return None
    if keys.row_tokens == 1 and _fits_planes(keys.col_channels, d):
        return "token", launch.block_n
    if keys.col_channels == 1 and keys.row_tokens % launch.block_n == 0:
        return "row", launch.block_n
    if keys.col_channels == 1 and keys.prompt_row and launch.fold_lead:
        return "lead", launch.block_n
    if keys.col_channels == 1 and launch.fold_half_rows and 2 * keys.row_tokens == launch.block_n:
        return "halves", launch.block_n
    if keys.col_channels == 1:
        return "rows", launch.block_n
    return None


# Key modes whose products take the codes first (`LaunchConfig.codes_first`). H100, kernel alone
# (`quant_attention.py`, 695bb17): per-token 4-bit codes ("token") 2.5-5% faster at 32k and 128k, batch 1 and 4;
# KIVI's "halves" at 6 / 12 programs an SM: KIVI-2 4% / 9% faster at 32k batch 4 / 128k batch 1, 2% / 13%
# slower at 32k batch 1 / 128k batch 4 (KIVI-4 7% / 12% faster, 5% slower at 128k batch 4), and KIVI-2's step
# at 32k batch 4 9.96 -> 9.26 ms (KIVI-4's 9.46 -> 9.47); ZipCache's "lead" sets 5-11% slower, so they keep
# the query rows first; "row" and "rows" (KIVI off its default tiles) were not timed.
CODES_FIRST_KEY_MODES = ("token", "halves")
# The window program's tile with the codes first: its 16-bit rows at 64 slots a tile held more registers than
# the codes' loop (offline, sm_90, KIVI-2: the kernel at 197 registers a thread, 168 at 16 slots a tile). The
# window's program is one of many and shorter than a split's; its smaller tiles were not timed apart.
WINDOW_BLOCK_CODES_FIRST = 16


def window_block(launch: LaunchConfig) -> int:
    """The window program's tile (BLOCK_NW) under a store's launch: `WINDOW_BLOCK_CODES_FIRST` slots with the
    codes first, the launch's tile otherwise."""
    return WINDOW_BLOCK_CODES_FIRST if launch.codes_first else launch.block_n


def plane_launch(launch: LaunchConfig, zero_sums: bool, key_mode: str, pairs: int, slots: int) -> LaunchConfig:
    """The plane kernel's launch for a store: per-token keys ("token") take at least `query_rows_token_keys`
    query rows, and with summed value zero-points and pairs x slots of at least `one_warp_summed_slots`, one
    warp a program at the many-heads split target; the products take the codes first in
    `CODES_FIRST_KEY_MODES` only (where the launch asks for it), KIVI's "halves" then at its own split targets
    and register cap (`halves_programs_per_sm`, `halves_max_registers`).
    Other key modes keep the launch's warps: one warp was measured on per-token keys only, and ZipCache's "lead"
    loop, while it was one loop with a branch per tile, spilled there (offline, sm_90, Triton 3.7.1,
    `benchmarks/plane_sass.py --modes lead`: 989 local-memory operations and 4,269 instructions a tile, vs 90
    and 1,784 at two warps) and took ZipCache's two sets at 128k batch 4 to 1,491 us, kernel alone on the
    H200, vs 808 with per-slot key rows on one warp (`quant_attention.py`, ff5c769). Split into two loops it
    spills 3 operations in the prompt loop at one warp (1,511 instructions), none at two (833): untimed."""
    codes_first = launch.codes_first and key_mode in CODES_FIRST_KEY_MODES
    launch = replace(launch, codes_first=codes_first)
    if codes_first and key_mode == "halves":
        programs_per_sm, many_heads = launch.halves_programs_per_sm
        launch = replace(
            launch,
            programs_per_sm=programs_per_sm,
            programs_per_sm_many_heads=many_heads,
            max_registers=launch.halves_max_registers,
        )
    if key_mode == "token":
        launch = replace(launch, query_rows=max(launch.query_rows, launch.query_rows_token_keys))
    if zero_sums and key_mode == "token" and pairs * slots >= launch.one_warp_summed_slots:
        return replace(launch, num_warps=1, programs_per_sm=launch.programs_per_sm_many_heads)
    return launch


def query_block(launch: LaunchConfig, group: int) -> int:
    """The plane kernel's query rows a tile (BLOCK_G) under a store's launch (`plane_launch`): the group or
    the launch's `query_rows`, whichever is more, rounded up to a power of two."""
    return 1 << (max(launch.query_rows, group) - 1).bit_length()


def store_launch(keys: PackedSlots, values: PackedSlots, launch: LaunchConfig) -> tuple[str, bool, LaunchConfig] | None:
    """(key mode, summed value zero-points, launch) of the plane kernel for a store, None where it does not
    take it (`plane_plan`, `plane_launch`)."""
    plan = plane_plan(keys, values, launch)
    if plan is None:
        return None
    key_mode, block_n = plan
    zero_sums = launch.zero_row_sums and values.col_channels == values.codes.shape[-1] * 8 // values.bits
    b, hkv, slots = keys.codes.shape[:3]
    return key_mode, zero_sums, plane_launch(replace(launch, block_n=block_n), zero_sums, key_mode, b * hkv, slots)


def pair_launch(
    first: tuple[PackedSlots, PackedSlots], second: tuple[PackedSlots, PackedSlots], launch: LaunchConfig
) -> LaunchConfig:
    """The launch two stores of one `_plane_pair_kernel` start from, before each store's own (`store_launch`):
    one kernel has one order of the products, so the codes go first only where both stores' key modes take
    them (and with it KIVI's split targets and register cap, `plane_launch`). Both stores must be the plane
    kernel's (`plane_plan`)."""
    modes = [plane_plan(*store, launch)[0] for store in (first, second)]
    return launch if all(mode in CODES_FIRST_KEY_MODES for mode in modes) else replace(launch, codes_first=False)


def _shared_by_a_pair(launch: LaunchConfig) -> tuple[int, int, int, int]:
    """What two stores' launches must agree on to be one launch (`pair_fits`). (A plain function: torch.compile
    traces `pair_fits` inside the step, and Dynamo does not trace an `operator.attrgetter`.)"""
    return launch.block_n, launch.num_warps, launch.num_stages, launch.max_registers


def pair_fits(
    first: tuple[PackedSlots, PackedSlots], second: tuple[PackedSlots, PackedSlots], launch: LaunchConfig
) -> bool:
    """Whether two stores go into one launch (`_plane_pair_kernel`): the plane kernel takes both, with the same
    tile, warps, stages and register cap under their shared launch (`pair_launch`; each keeps its own split
    plan): the launch takes the first store's cap (`_launch`)."""
    if plane_plan(*first, launch) is None or plane_plan(*second, launch) is None:
        return False
    shared = pair_launch(first, second, launch)
    a, b = (_shared_by_a_pair(store_launch(*store, shared)[2]) for store in (first, second))
    return a == b


def pair_shares(slots: int, slots_2: int, batch_heads: int, launch: LaunchConfig) -> tuple[float, float]:
    """The fraction of the GPU's split target each of a pair's sets plans for: with the launch's
    `pair_shared_target`, up to `quant_kernels.FEW_HEADS` (sequence, KV head) pairs, one target split by the
    sets' slots; otherwise the whole target each."""
    if not launch.pair_shared_target or batch_heads > FEW_HEADS or slots + slots_2 == 0:
        return 1.0, 1.0
    return slots / (slots + slots_2), slots_2 / (slots + slots_2)


# `wave_target`'s estimate of a program's time, in units of a 4-bit tile: a tile by its code width (the
# "lead" prompt loop's SASS instructions a warp and tile, `plane_sass.py --modes lead`: 833 at 4 bits, 1,074
# at 2), and what a program does besides its tiles (folding the query, writing its partial, its share of the
# combine), as two tiles.
TILE_COST = {4: 1.0, 2: 1.3}
PROGRAM_COST = 2.0
WAVE_TARGETS = (4, 5, 6, 7, 8, 10, 12, 16)  # the programs-an-SM split targets `wave_target` chooses from
# An SM's registers (65,536 on Hopper), the plane kernel's registers a thread without a cap (ptxas takes up to
# 255 there), and the most warps an SM holds.
SM_REGISTERS, UNCAPPED_REGISTERS, MAX_WARPS_PER_SM = 65536, 255, 64


def resident_warps(launch: LaunchConfig) -> int:
    """Warps of the plane kernel an SM holds by registers, as `wave_target` counts them: 8 uncapped (ptxas may
    take fewer than 255: the 2-bit per-token loop at one warp takes 206-210 offline, 9 warps; the estimate
    stays at 8), 16 under a cap of 128 (KIVI's `halves_max_registers`, or `max_registers`). A pair is counted
    under the launch before each store's own (`plane_launch`), so a pair of capped "halves" stores (none
    today) would count 8."""
    registers = launch.max_registers or UNCAPPED_REGISTERS
    return max(1, min(MAX_WARPS_PER_SM, SM_REGISTERS // (32 * registers)))


def list_schedule_time(costs: list[float], resident: int) -> float:
    """When the last of `costs` (programs, in launch order) ends on a GPU that runs `resident` programs at once
    and starts the next program wherever one ends (list scheduling; the makespan)."""
    ends = [0.0] * max(1, resident)
    for cost in costs:
        heapq.heapreplace(ends, ends[0] + cost)
    return max(ends)


@functools.lru_cache(maxsize=64)
def wave_target(
    sets: tuple[tuple[int, int], ...], window_slots: int, batch_heads: int, num_sms: int, launch: LaunchConfig
) -> int:
    """The split target (programs an SM) of a launch above `quant_kernels.FEW_HEADS` (sequence, KV head)
    pairs, of a pair of stores (`LaunchConfig.pair_wave_target`) or of one (`store_wave_target`): of
    `launch.programs_per_sm_many_heads` and `WAVE_TARGETS`, the one whose programs end first under
    `list_schedule_time`, ties to the launch's own. `sets`: each store's (slots, bits); the programs are its
    splits' (`_split_plan`, costs by `TILE_COST` and `PROGRAM_COST`), in the kernel's grid order (every
    (sequence, KV head) pair's program of split 0, then of split 1, ...; the window's last), `resident_warps`
    of them an SM at once.

    Why: the programs of one launch run in waves of `num_sms * resident_warps / num_warps`, and a launch whose
    last wave is a sliver waits a whole program's time for it. ZipCache's two sets at 32k batch 4 (H100, kernel
    alone, f06e256): 98.0 us at 8 programs an SM (3.7 waves), 85.9 at 4 (2 waves); at 128k batch 4 the
    default's 4.0 waves win (291.1 us against 338.2 at 4). Over 3-16 programs an SM the estimate picked the
    best measured target for those and for KIVI's single stores (8); its order of the others is rougher
    (benchmarks/README.md, "Waves")."""
    resident = num_sms * max(1, resident_warps(launch) // launch.num_warps)

    def finish(target: int) -> float:
        plan = replace(launch, programs_per_sm_many_heads=target)
        costs = []
        for slots, bits in sets:
            splits, split_len = _split_plan(batch_heads, slots, num_sms, plan)
            tiles, per_split = -(-slots // launch.block_n), split_len // launch.block_n
            for split in range(splits):
                tiles_here = max(0, min(per_split, tiles - split * per_split))
                costs += [PROGRAM_COST + TILE_COST[bits] * tiles_here] * batch_heads
        if window_slots:
            costs += [PROGRAM_COST + -(-window_slots // launch.block_n)] * batch_heads
        return list_schedule_time(costs, resident)

    return min((launch.programs_per_sm_many_heads, *WAVE_TARGETS), key=finish)


if kernels.triton is not None:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    # Jit helpers shared with `_packed_split_kernel`, as plain globals under their own names: jit code calls
    # them by name, and Inductor's copy of a `wrap_triton` kernel defines a helper under its `def` name only.
    from kvbench.kernels import _online_softmax
    from kvbench.quant_kernels import _as_float, _slot_rows

    _TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

    # 4-bit codes to 16-bit floats, two elements (one 32-bit register of two 16-bit words) at a time: plane g
    # is bits [4g, 4g + 4) of each word, so one shift and one mask-or (`lop3`) make a register of two floats
    # 2^m + code (m = 7: bfloat16 128 + code, 0x4300; m = 10: float16 1024 + code, 0x6400), and one packed
    # subtract leaves the codes exactly: 11 instructions make 8 values. The PTX is a literal in each function
    # (torch.compile copies user kernels' source; a global or a string argument does not survive that).
    @triton.jit
    def _bf16_nibbles(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 t, m; mov.b32 m, 0x43004300;
            lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA; shr.b32 t, $4, 4;
            lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xEA; shr.b32 t, $4, 8;
            lop3.b32 $2, t, 0x000F000F, 0x43004300, 0xEA; shr.b32 t, $4, 12;
            lop3.b32 $3, t, 0x000F000F, 0x43004300, 0xEA;
            sub.rn.bf16x2 $0, $0, m; sub.rn.bf16x2 $1, $1, m; sub.rn.bf16x2 $2, $2, m; sub.rn.bf16x2 $3, $3, m; }""",
            "=r,=r,=r,=r,r",
            [elements],
            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
            True,
            2,
        )

    @triton.jit
    def _f16_nibbles(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 t, m; mov.b32 m, 0x64006400;
            lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xEA; shr.b32 t, $4, 4;
            lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xEA; shr.b32 t, $4, 8;
            lop3.b32 $2, t, 0x000F000F, 0x64006400, 0xEA; shr.b32 t, $4, 12;
            lop3.b32 $3, t, 0x000F000F, 0x64006400, 0xEA;
            sub.rn.f16x2 $0, $0, m; sub.rn.f16x2 $1, $1, m; sub.rn.f16x2 $2, $2, m; sub.rn.f16x2 $3, $3, m; }""",
            "=r,=r,=r,=r,r",
            [elements],
            (tl.float16, tl.float16, tl.float16, tl.float16),
            True,
            2,
        )

    # The same without the subtract: 2^m + code (bfloat16 128 + code, float16 1024 + code), for kernels that
    # take the offset out of their sums instead (`_plane_split_kernel`'s OFFSET): 7 instructions make 8 values.
    @triton.jit
    def _bf16_offset_nibbles(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 t;
            lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA; shr.b32 t, $4, 4;
            lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xEA; shr.b32 t, $4, 8;
            lop3.b32 $2, t, 0x000F000F, 0x43004300, 0xEA; shr.b32 t, $4, 12;
            lop3.b32 $3, t, 0x000F000F, 0x43004300, 0xEA; }""",
            "=r,=r,=r,=r,r",
            [elements],
            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
            True,
            2,
        )

    @triton.jit
    def _f16_offset_nibbles(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 t;
            lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xEA; shr.b32 t, $4, 4;
            lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xEA; shr.b32 t, $4, 8;
            lop3.b32 $2, t, 0x000F000F, 0x64006400, 0xEA; shr.b32 t, $4, 12;
            lop3.b32 $3, t, 0x000F000F, 0x64006400, 0xEA; }""",
            "=r,=r,=r,=r,r",
            [elements],
            (tl.float16, tl.float16, tl.float16, tl.float16),
            True,
            2,
        )

    # 2-bit codes (bytes of four) to 16-bit floats, four elements (one 32-bit register) at a time: two byte
    # permutes put elements 0 and 1 (2 and 3) into the low bytes of a register's two 16-bit halves, then plane
    # g is bits [2g, 2g + 2) of each half: the nibbles' shift, mask-or and subtract (the mask drops the high
    # bytes), 24 instructions make 16 values.
    @triton.jit
    def _bf16_crumbs(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 a, b, t, m; mov.b32 m, 0x43004300;
            prmt.b32 a, $8, 0, 0x4140; prmt.b32 b, $8, 0, 0x4342;
            lop3.b32 $0, a, 0x00030003, 0x43004300, 0xEA; lop3.b32 $1, b, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, a, 2; lop3.b32 $2, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, b, 2; lop3.b32 $3, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, a, 4; lop3.b32 $4, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, b, 4; lop3.b32 $5, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, a, 6; lop3.b32 $6, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, b, 6; lop3.b32 $7, t, 0x00030003, 0x43004300, 0xEA;
            sub.rn.bf16x2 $0, $0, m; sub.rn.bf16x2 $1, $1, m; sub.rn.bf16x2 $2, $2, m; sub.rn.bf16x2 $3, $3, m;
            sub.rn.bf16x2 $4, $4, m; sub.rn.bf16x2 $5, $5, m; sub.rn.bf16x2 $6, $6, m; sub.rn.bf16x2 $7, $7, m; }""",
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [elements],
            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
            True,
            4,
        )

    @triton.jit
    def _f16_crumbs(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 a, b, t, m; mov.b32 m, 0x64006400;
            prmt.b32 a, $8, 0, 0x4140; prmt.b32 b, $8, 0, 0x4342;
            lop3.b32 $0, a, 0x00030003, 0x64006400, 0xEA; lop3.b32 $1, b, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, a, 2; lop3.b32 $2, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, b, 2; lop3.b32 $3, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, a, 4; lop3.b32 $4, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, b, 4; lop3.b32 $5, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, a, 6; lop3.b32 $6, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, b, 6; lop3.b32 $7, t, 0x00030003, 0x64006400, 0xEA;
            sub.rn.f16x2 $0, $0, m; sub.rn.f16x2 $1, $1, m; sub.rn.f16x2 $2, $2, m; sub.rn.f16x2 $3, $3, m;
            sub.rn.f16x2 $4, $4, m; sub.rn.f16x2 $5, $5, m; sub.rn.f16x2 $6, $6, m; sub.rn.f16x2 $7, $7, m; }""",
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [elements],
            (tl.float16, tl.float16, tl.float16, tl.float16),
            True,
            4,
        )

    # The same without the subtracts: 2^m + code, for the offset form (`LaunchConfig.offset_crumbs`): 16
    # instructions make 16 values.
    @triton.jit
    def _bf16_offset_crumbs(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 a, b, t;
            prmt.b32 a, $8, 0, 0x4140; prmt.b32 b, $8, 0, 0x4342;
            lop3.b32 $0, a, 0x00030003, 0x43004300, 0xEA; lop3.b32 $1, b, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, a, 2; lop3.b32 $2, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, b, 2; lop3.b32 $3, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, a, 4; lop3.b32 $4, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, b, 4; lop3.b32 $5, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, a, 6; lop3.b32 $6, t, 0x00030003, 0x43004300, 0xEA;
            shr.b32 t, b, 6; lop3.b32 $7, t, 0x00030003, 0x43004300, 0xEA; }""",
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [elements],
            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
            True,
            4,
        )

    @triton.jit
    def _f16_offset_crumbs(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 a, b, t;
            prmt.b32 a, $8, 0, 0x4140; prmt.b32 b, $8, 0, 0x4342;
            lop3.b32 $0, a, 0x00030003, 0x64006400, 0xEA; lop3.b32 $1, b, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, a, 2; lop3.b32 $2, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, b, 2; lop3.b32 $3, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, a, 4; lop3.b32 $4, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, b, 4; lop3.b32 $5, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, a, 6; lop3.b32 $6, t, 0x00030003, 0x64006400, 0xEA;
            shr.b32 t, b, 6; lop3.b32 $7, t, 0x00030003, 0x64006400, 0xEA; }""",
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [elements],
            (tl.float16, tl.float16, tl.float16, tl.float16),
            True,
            4,
        )

    # The offset form without most shifts (`LaunchConfig.weighted_crumbs`): plane g masked where it lies, bits
    # [2g, 2g + 2), so each value is 2^m + w_g * code with the plane's weight w_g = 4^g, which the kernel takes
    # out (`_plane_split`'s WEIGHTED; `_plane_codes` names them). bfloat16's 7 mantissa bits hold planes 0-2 in place;
    # plane 3's top bit would land in the exponent, so it is shifted down two bits first (w_3 = 16): 12
    # instructions make 16 values. float16's 10 bits hold all four (w_3 = 64): 10 instructions.
    @triton.jit
    def _bf16_weighted_crumbs(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 a, b, t;
            prmt.b32 a, $8, 0, 0x4140; prmt.b32 b, $8, 0, 0x4342;
            lop3.b32 $0, a, 0x00030003, 0x43004300, 0xEA; lop3.b32 $1, b, 0x00030003, 0x43004300, 0xEA;
            lop3.b32 $2, a, 0x000C000C, 0x43004300, 0xEA; lop3.b32 $3, b, 0x000C000C, 0x43004300, 0xEA;
            lop3.b32 $4, a, 0x00300030, 0x43004300, 0xEA; lop3.b32 $5, b, 0x00300030, 0x43004300, 0xEA;
            shr.b32 t, a, 2; lop3.b32 $6, t, 0x00300030, 0x43004300, 0xEA;
            shr.b32 t, b, 2; lop3.b32 $7, t, 0x00300030, 0x43004300, 0xEA; }""",
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [elements],
            (tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
            True,
            4,
        )

    @triton.jit
    def _f16_weighted_crumbs(elements):
        return tl.inline_asm_elementwise(
            """{ .reg .b32 a, b;
            prmt.b32 a, $8, 0, 0x4140; prmt.b32 b, $8, 0, 0x4342;
            lop3.b32 $0, a, 0x00030003, 0x64006400, 0xEA; lop3.b32 $1, b, 0x00030003, 0x64006400, 0xEA;
            lop3.b32 $2, a, 0x000C000C, 0x64006400, 0xEA; lop3.b32 $3, b, 0x000C000C, 0x64006400, 0xEA;
            lop3.b32 $4, a, 0x00300030, 0x64006400, 0xEA; lop3.b32 $5, b, 0x00300030, 0x64006400, 0xEA;
            lop3.b32 $6, a, 0x00C000C0, 0x64006400, 0xEA; lop3.b32 $7, b, 0x00C000C0, 0x64006400, 0xEA; }""",
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [elements],
            (tl.float16, tl.float16, tl.float16, tl.float16),
            True,
            4,
        )

    @triton.constexpr_function
    def _weighted_plane3(offset):
        """Plane 3's weight w_3 in the weighted 2-bit offset codes (`_bf16_weighted_crumbs`, `_f16_weighted_crumbs`):
        64 where float16's 10 mantissa bits hold it in place (offset 1024), 16 where bfloat16's shift it down."""
        return 64.0 if offset == 1024.0 else 16.0

    @triton.jit
    def _plane_codes(
        elements, BITS: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr, OFFSET: tl.constexpr = 0.0,
        WEIGHTED: tl.constexpr = False,
    ):  # fmt: skip
        """Planar elements [N, W] or [W, N] (int16 words of four 4-bit codes, or uint8 bytes of four 2-bit codes;
        the integer path takes any BITS) -> the 4 planes' codes plus OFFSET as DTYPE values, exactly, each of
        the elements' shape:
        with ASM (a 16-bit DTYPE, compiled for CUDA) through `_bf16_nibbles` / `_f16_nibbles` (4 bits, OFFSET
        0), `_bf16_crumbs` / `_f16_crumbs` (2 bits, OFFSET 0) or their offset forms (OFFSET 128 for bfloat16,
        1024 for float16), otherwise by integer shifts and the exact float32 exponent trick, the offset added
        in float32. WEIGHTED (2 bits, OFFSET set): plane g comes out as OFFSET + w_g * code, w = (1, 4, 16, w_3)
        (`_weighted_plane3`)."""
        tl.static_assert(not WEIGHTED or (BITS == 2 and OFFSET != 0.0), "weights are for 2-bit offset codes")
        W1: tl.constexpr = 4.0 if WEIGHTED else 1.0
        W2: tl.constexpr = 16.0 if WEIGHTED else 1.0
        W3: tl.constexpr = _weighted_plane3(OFFSET) if WEIGHTED else 1.0
        if ASM and BITS == 4 and DTYPE == tl.bfloat16 and OFFSET != 0.0:  # noqa: SIM300
            c0, c1, c2, c3 = _bf16_offset_nibbles(elements)
        elif ASM and BITS == 4 and DTYPE == tl.bfloat16:  # noqa: SIM300
            c0, c1, c2, c3 = _bf16_nibbles(elements)
        elif ASM and BITS == 4 and OFFSET != 0.0:
            c0, c1, c2, c3 = _f16_offset_nibbles(elements)
        elif ASM and BITS == 4:
            c0, c1, c2, c3 = _f16_nibbles(elements)
        elif ASM and BITS == 2 and DTYPE == tl.bfloat16 and WEIGHTED:  # noqa: SIM300
            c0, c1, c2, c3 = _bf16_weighted_crumbs(elements)
        elif ASM and BITS == 2 and WEIGHTED:
            c0, c1, c2, c3 = _f16_weighted_crumbs(elements)
        elif ASM and BITS == 2 and DTYPE == tl.bfloat16 and OFFSET != 0.0:  # noqa: SIM300
            c0, c1, c2, c3 = _bf16_offset_crumbs(elements)
        elif ASM and BITS == 2 and DTYPE == tl.bfloat16:  # noqa: SIM300
            c0, c1, c2, c3 = _bf16_crumbs(elements)
        elif ASM and BITS == 2 and OFFSET != 0.0:
            c0, c1, c2, c3 = _f16_offset_crumbs(elements)
        elif ASM and BITS == 2:
            c0, c1, c2, c3 = _f16_crumbs(elements)
        else:
            words = elements.to(tl.int32)
            c0 = (_as_float(words & ((1 << BITS) - 1)) + OFFSET).to(DTYPE)
            c1 = (_as_float((words >> BITS) & ((1 << BITS) - 1)) * W1 + OFFSET).to(DTYPE)
            c2 = (_as_float((words >> (2 * BITS)) & ((1 << BITS) - 1)) * W2 + OFFSET).to(DTYPE)
            c3 = (_as_float((words >> (3 * BITS)) & ((1 << BITS) - 1)) * W3 + OFFSET).to(DTYPE)
        return c0, c1, c2, c3

    @triton.jit
    def _load_elements(base, slots, live, stride_s, offs_w, WIDTH: tl.constexpr):
        """A tile's planar elements [N, BLOCK_W] (0 where masked); strides in elements."""
        mask = live[:, None] & (offs_w < WIDTH)[None, :]
        return tl.load(base + slots[:, None] * stride_s + offs_w[None, :], mask=mask, other=0)

    @triton.jit
    def _load_values(base, slots, live, stride_s, offs_w, WIDTH: tl.constexpr, CODES_FIRST: tl.constexpr):
        """A tile's values (planar elements of codes, or one plane of the window's values): [N, BLOCK_W] as
        `_load_elements`, or with CODES_FIRST [BLOCK_W, N] (the products' first operand, `_weighted_values`),
        loaded that way (0 where masked)."""
        if CODES_FIRST:
            mask = (offs_w < WIDTH)[:, None] & live[None, :]
            elements = tl.load(base + slots[None, :] * stride_s + offs_w[:, None], mask=mask, other=0)
        else:
            elements = _load_elements(base, slots, live, stride_s, offs_w, WIDTH)
        return elements

    @triton.jit
    def _scores(q, keys, PRECISION: tl.constexpr, CODES_FIRST: tl.constexpr):
        """q . keys^T [G, N] for a query [G, W] and a tile's keys [N, W]. With CODES_FIRST the tensor cores take
        the keys as the first operand (keys . q^T, then transposed: a layout change, no data moved): a
        product's first operand has 16 rows and its second 8 columns, so a GQA group of 4 query rows pads to 8
        instead of 16, and the codes go in from registers."""
        if CODES_FIRST:
            scores = tl.trans(tl.dot(keys, tl.trans(q), input_precision=PRECISION))
        else:
            scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
        return scores

    @triton.jit
    def _add_scores(acc, q, keys, PRECISION: tl.constexpr, CODES_FIRST: tl.constexpr):
        """acc + `_scores`, accumulated in the product."""
        if CODES_FIRST:
            scores = tl.trans(tl.dot(keys, tl.trans(q), tl.trans(acc), input_precision=PRECISION))
        else:
            scores = tl.dot(q, tl.trans(keys), acc, input_precision=PRECISION)
        return scores

    @triton.jit
    def _weighted_values(p, values, acc, PRECISION: tl.constexpr, CODES_FIRST: tl.constexpr):
        """acc + p . values [G, W] for weights p [G, N] and a tile's values: [N, W], or with CODES_FIRST
        [W, N] (`_load_values`), taken as the products' first operand (`_scores`)."""
        if CODES_FIRST:
            out = tl.trans(tl.dot(values, tl.trans(p), tl.trans(acc), input_precision=PRECISION))
        else:
            out = tl.dot(p, values, acc, input_precision=PRECISION)
        return out

    @triton.jit
    def _column_params(base, slots, live, lead, stride_r, COLUMN: tl.constexpr, ROW_TOKENS: tl.constexpr):
        """The parameter in column COLUMN of each slot's row, float32 [N] (0 where masked)."""
        rows = _slot_rows(slots, lead, ROW_TOKENS)
        return tl.load(base + rows * stride_r + COLUMN, mask=live, other=0.0).to(tl.float32)

    @triton.jit
    def _zero_matrix(base, slots, live, lead, stride_r, COLUMNS: tl.constexpr, ROW_TOKENS: tl.constexpr):
        """Every slot's zero-points as [N, 16], for one tensor-core product (16 columns at least) that gives each
        query row its sum of p * zero per column: zero-point j of the slot's COLUMNS (at most 4: value groups
        hold whole planes, `_fits_planes`) in column 4 j, every other column 0. Read as [N, 4] and spread by
        two joins with zeros: an [N, 16] read under a column mask computed 16 addresses a slot (offline, sm_90,
        two warps: KIVI-2's "halves" tile loop 1,461 -> 1,269 SASS instructions a warp, KIVI-4's 1,332 ->
        1,224; the sums are the same products either way)."""
        cols = tl.arange(0, 4)
        rows = _slot_rows(slots, lead, ROW_TOKENS)
        zeros = tl.load(
            base + rows[:, None] * stride_r + cols[None, :], mask=live[:, None] & (cols < COLUMNS)[None, :], other=0.0
        )
        zeros = tl.reshape(tl.join(zeros, tl.zeros_like(zeros)), [zeros.shape[0], 8])  # column j at 2 j
        return tl.reshape(tl.join(zeros, tl.zeros_like(zeros)), [zeros.shape[0], 16])  # column j at 4 j

    @triton.jit
    def _row_params(scales, zeros, offs_w, mask, K_WIDTH: tl.constexpr):
        """One row of per-channel key parameters (`scales`, `zeros`: the row's first channel), per plane, as
        float32 vectors [W]: s0, s1, s2, s3, z0, z1, z2, z3."""
        s0 = tl.load(scales + offs_w, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(scales + K_WIDTH + offs_w, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(scales + 2 * K_WIDTH + offs_w, mask=mask, other=0.0).to(tl.float32)
        s3 = tl.load(scales + 3 * K_WIDTH + offs_w, mask=mask, other=0.0).to(tl.float32)
        z0 = tl.load(zeros + offs_w, mask=mask, other=0.0).to(tl.float32)
        z1 = tl.load(zeros + K_WIDTH + offs_w, mask=mask, other=0.0).to(tl.float32)
        z2 = tl.load(zeros + 2 * K_WIDTH + offs_w, mask=mask, other=0.0).to(tl.float32)
        z3 = tl.load(zeros + 3 * K_WIDTH + offs_w, mask=mask, other=0.0).to(tl.float32)
        return s0, s1, s2, s3, z0, z1, z2, z3

    @triton.jit
    def _row_bias(q0, q1, q2, q3, z0, z1, z2, z3):
        """q . z [G] over the four planes, in float32."""
        return tl.sum(
            q0.to(tl.float32) * z0[None, :]
            + q1.to(tl.float32) * z1[None, :]
            + q2.to(tl.float32) * z2[None, :]
            + q3.to(tl.float32) * z3[None, :],
            axis=1,
        )

    @triton.jit
    def _folded_row_logits(
        q0, q1, q2, q3, c0, c1, c2, c3, scales, zeros, offs_w, mask, K_WIDTH: tl.constexpr, DTYPE: tl.constexpr,
        PRECISION: tl.constexpr, CODES_FIRST: tl.constexpr,
    ):  # fmt: skip
        """Logits of a tile's codes (planes c_g [N, W]) under one row of per-channel key parameters (`scales`,
        `zeros`: the row's first channel): (sum over planes of (q_g * s_g) . c_g [G, N], q . z [G])."""
        s0, s1, s2, s3, z0, z1, z2, z3 = _row_params(scales, zeros, offs_w, mask, K_WIDTH)
        bias = _row_bias(q0, q1, q2, q3, z0, z1, z2, z3)
        logits = _scores((q0.to(tl.float32) * s0[None, :]).to(DTYPE), c0, PRECISION, CODES_FIRST)
        logits = _add_scores(logits, (q1.to(tl.float32) * s1[None, :]).to(DTYPE), c1, PRECISION, CODES_FIRST)
        logits = _add_scores(logits, (q2.to(tl.float32) * s2[None, :]).to(DTYPE), c2, PRECISION, CODES_FIRST)
        logits = _add_scores(logits, (q3.to(tl.float32) * s3[None, :]).to(DTYPE), c3, PRECISION, CODES_FIRST)
        return logits, bias

    @triton.jit
    def _folded_logits(qs0, qs1, qs2, qs3, c0, c1, c2, c3, PRECISION: tl.constexpr, CODES_FIRST: tl.constexpr):
        """sum over planes g of qs_g . c_g, [G, N]: a tile's codes (planes c_g [N, W]) against a query whose
        planes qs_g = q_g * s_g were folded once for many tiles (key mode "lead"). `_folded_row_logits` does
        not call it: with its products moved ahead of the dots, "row"'s SASS changed (Triton 3.7)."""
        logits = _scores(qs0, c0, PRECISION, CODES_FIRST)
        logits = _add_scores(logits, qs1, c1, PRECISION, CODES_FIRST)
        logits = _add_scores(logits, qs2, c2, PRECISION, CODES_FIRST)
        logits = _add_scores(logits, qs3, c3, PRECISION, CODES_FIRST)
        return logits

    @triton.jit
    def _slot_row_logits(
        q0, q1, q2, q3, c0, c1, c2, c3, scales, zeros, slots, live, lead, stride_r, offs_w, w_ok,
        K_WIDTH: tl.constexpr, ROW_TOKENS: tl.constexpr, K_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        CODES_FIRST: tl.constexpr,
    ):  # fmt: skip
        """Logits of a tile's codes (planes c_g [N, W]) under per-channel key rows of any size: each slot's row
        read and the keys dequantized, c * s + z in K_DTYPE (the codes converted to it first, exactly)."""
        params = _slot_rows(slots, lead, ROW_TOKENS)[:, None] * stride_r + offs_w[None, :]
        mask = live[:, None] & w_ok[None, :]
        k0 = c0.to(K_DTYPE) * tl.load(scales + params, mask=mask, other=0.0) + tl.load(
            zeros + params, mask=mask, other=0.0
        )
        params += K_WIDTH
        k1 = c1.to(K_DTYPE) * tl.load(scales + params, mask=mask, other=0.0) + tl.load(
            zeros + params, mask=mask, other=0.0
        )
        params += K_WIDTH
        k2 = c2.to(K_DTYPE) * tl.load(scales + params, mask=mask, other=0.0) + tl.load(
            zeros + params, mask=mask, other=0.0
        )
        params += K_WIDTH
        k3 = c3.to(K_DTYPE) * tl.load(scales + params, mask=mask, other=0.0) + tl.load(
            zeros + params, mask=mask, other=0.0
        )
        logits = _scores(q0.to(K_DTYPE), k0.to(K_DTYPE), PRECISION, CODES_FIRST)
        logits = _add_scores(logits, q1.to(K_DTYPE), k1.to(K_DTYPE), PRECISION, CODES_FIRST)
        logits = _add_scores(logits, q2.to(K_DTYPE), k2.to(K_DTYPE), PRECISION, CODES_FIRST)
        logits = _add_scores(logits, q3.to(K_DTYPE), k3.to(K_DTYPE), PRECISION, CODES_FIRST)
        return logits

    @triton.jit
    def _plane_split(
        bh,
        split,
        out_split,
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
        stride_kcb,
        stride_kch,
        stride_kcs,
        stride_ksb,
        stride_ksh,
        stride_ksr,
        stride_vcb,
        stride_vch,
        stride_vcs,
        stride_vsb,
        stride_vsh,
        stride_vsr,
        wk_ptr,
        wv_ptr,
        wpos_ptr,
        wq_ptr,
        total_splits,
        window_slots,
        stride_wkb,
        stride_wkh,
        stride_wks,
        stride_wvb,
        stride_wvh,
        stride_wvs,
        stride_wpb,
        stride_wph,
        stride_wps,
        rotation_ptr,
        rotation_scale,
        HEAD_DIM: tl.constexpr,
        VALUE_DIM: tl.constexpr,
        K_BITS: tl.constexpr,
        K_ROW_TOKENS: tl.constexpr,
        K_GROUP: tl.constexpr,
        K_MODE: tl.constexpr,
        V_BITS: tl.constexpr,
        V_GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_WV: tl.constexpr,
        BLOCK_NW: tl.constexpr,
        DTYPE: tl.constexpr,
        K_DTYPE: tl.constexpr,
        K_ASM: tl.constexpr,
        V_ASM: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        ROTATE: tl.constexpr,
        PRECISION: tl.constexpr,
        ZERO_SUMS: tl.constexpr,
        OFFSET: tl.constexpr,
        WEIGHTED: tl.constexpr,
        K_OFFSET: tl.constexpr,
        WINDOW_RING: tl.constexpr,
        UNMASKED: tl.constexpr,
        CODES_FIRST: tl.constexpr,
    ):
        """Program (bh = sequence x KV head, split) of decode attention over planar codes: `_packed_split_kernel`'s
        online softmax, with each K/V tile's 4 planes multiplied as exact codes on the tensor cores and the
        parameters folded into the products (the module doc's algebra, per plane):
        - keys "token" (per-token groups, each plane inside one group): logits = sum over planes g of
          s_g (q_g . c_g) + z_g sum(q_g);
        - keys "row" (per-channel groups of K_ROW_TOKENS tokens; tiles aligned to them): the tile's row of
          scales folds into the query, logits = sum_g (q_g * s_g) . c_g + q . z;
        - keys "halves" (per-channel groups of half a tile, KIVI's 32 tokens in tiles of 64; tiles aligned
          to the rows): each half's row folds into its own copy of the query as in "row", both halves'
          logits come from the whole tile's codes (twice the key products) and each slot takes its half's;
        - keys "rows" (per-channel groups of any other size, from any lead: KIVI's 32 tokens in tiles of
          64 without `fold_half_rows`, ZipCache's blocks without `fold_lead`): each slot's row is read and
          the keys dequantized, c * s + z in K_DTYPE
          (float16 for 16-bit queries: the parameters' own type, one multiply-add per pair of values; a
          bfloat16 query meets them in float16 too, exact unless a query value lies outside float16's range
          or below its normal range, 6e-5, where it loses bits);
        - keys "lead" (ZipCache's sets: row 0 for the prompt's slots [0, lead), then rows of
          K_ROW_TOKENS slots for the decode blocks; tiles aligned to lead): row 0 folds into the query once,
          before the loops; the tiles below lead take "row"'s logits from it in one loop, then the tiles past
          lead, as "rows" (their codes, made in DTYPE for the fold, converted to K_DTYPE first, exactly), in a
          second loop;
        - values (per-token groups, each plane inside one group): out_g = (p * s_g) . c_g + p . z_g, the
          zero-point terms of all planes from one [N, 16] product per tile, accumulated across tiles; with
          ZERO_SUMS (one zero-point per slot: V_GROUP = VALUE_DIM), p . z is a float32 row sum per tile.
        With OFFSET m (0: off; token keys with one parameter per slot, ZERO_SUMS values; 128 for bfloat16,
        1024 for float16), codes come out of the conversion (2-bit codes too under the launch's
        `offset_crumbs`) as m + c, one subtract fewer per register, and m is taken out of the sums:
        logits = s (q . (m + c)) + sum(q) (z - m s), and the value row sum holds p . z - m sum(p * s) (the same
        rounded p * s the products take), exact in exact arithmetic; the float32 sums then carry m against a
        mean code of 7.5 at 4 bits (~17x in bfloat16, ~137x in float16: 4 and 7 bits of 24) and of 1.5 at 2
        bits (~85x, ~680x: 6.5 and 9.5 bits).
        With WEIGHTED (both stores' codes 2-bit, OFFSET set; `LaunchConfig.weighted_crumbs`) plane g's codes come
        out as m + w_g c, w = (1, 4, 16, 16) in bfloat16 and (1, 4, 16, 64) in float16 (`_bf16_weighted_crumbs`):
        the packed splits' query planes are q_g / w_g, m sum_g q_g / w_g comes out of each slot's logit, and the
        value sums keep p . z and R = sum(rounded p * s) apart, each plane's accumulator turning into
        (acc_g - m R) / w_g after the packed tiles (the window's program has R = 0 and nothing accumulated then).
        With K_OFFSET m (key mode "lead", a 16-bit query; `LaunchConfig.lead_offset_keys`) the prompt set's key
        codes come out as m + c (2-bit: m + w_g c, the folded planes taking 1 / w_g), and m sum_g (q_g s_g / w_g)
        comes out of row 0's bias once a program; the decode blocks' tiles keep the subtract forms.
        Codes are exact in DTYPE, so rounding is where the folded operands (q * s, p * s) meet the tensor
        cores: as `_packed_split_kernel`'s folded modes. Parameter vectors are read a tile ahead (2-byte
        loads stall the pipeline when read in the tile that uses them).
        With HAS_WINDOW, one more program per (sequence, KV head), split == num_splits, attends over the
        full-precision window instead (slots whose position is >= 0, `kvbench.kernels`' convention), and
        the combine kernel merges it with the splits: the window costs no launch of its own and no merge.
        With WINDOW_RING the window's positions are not read but derived from the ring's counters
        (`quant_kernels.Window`): wpos_ptr and wq_ptr hold each sequence's tokens seen and tokens quantized,
        at strides stride_wpb and stride_wph, and the step computes no positions.
        With CODES_FIRST every product of a tile takes the tile (codes, the window's rows, the value
        zero-points) as its first operand and the value tiles are read [W, N] (`_load_values`); the window's
        tiles are BLOCK_NW slots.
        With ROTATE (QuaRot: keys and values stored rotated), the query is rotated here to meet them, each
        plane q_g = (q @ R[:, plane g]) * rotation_scale from the +-1 matrix R at rotation_ptr ([HEAD_DIM,
        HEAD_DIM], HEAD_DIM a power of two), exact products summed in float32 as the rotation outside would;
        the combine kernel rotates the output back. ROTATE 2 (`LaunchConfig.reload_rotated_query`) stores the
        planes in the program's own partial-output rows and loads them back, exactly: so they take the layout
        the unrotated query's loads give them, and the tile loop is the unrotated one (kept in the products'
        accumulator layout, ROTATE 1, the loop's logits take shuffles to meet it)."""
        b = (bh // num_kv_heads).to(tl.int64)
        h = (bh % num_kv_heads).to(tl.int64)
        tl.static_assert(K_OFFSET == 0.0 or K_MODE == "lead", "offset key codes fold into the lead row only")
        K_WIDTH: tl.constexpr = HEAD_DIM // 4
        V_WIDTH: tl.constexpr = VALUE_DIM // 4
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_W)
        offs_wv = tl.arange(0, BLOCK_WV)
        g_ok = offs_g < group
        w_ok = offs_w < K_WIDTH
        heads = h * group + offs_g

        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        if ROTATE:  # both rotated forms multiply the whole query row by the rotation's columns of each plane
            offs_d = tl.arange(0, HEAD_DIM)
            q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(DTYPE)
            r_cols = rotation_ptr + offs_d[:, None] * HEAD_DIM + offs_w[None, :]
        if ROTATE == 2:  # the planes of q @ R * scale, one at a time through this program's partial-output rows
            tl.static_assert(HEAD_DIM == VALUE_DIM, "a rotated query row fills a partial-output row")
            # the planes in DTYPE, inside the float32 rows
            scratch = o_part_ptr + ((b * num_kv_heads * group + heads) * total_splits + out_split) * VALUE_DIM
            q_rows = scratch.to(tl.pointer_type(DTYPE))[:, None] + offs_w[None, :]
            q_mask = g_ok[:, None] & w_ok[None, :]
            for plane in tl.static_range(4):  # a barrier apart: one plane's operands live at a time
                r = tl.load(r_cols + plane * K_WIDTH, mask=w_ok[None, :], other=0.0).to(DTYPE)
                rotated = (tl.dot(q, r, input_precision=PRECISION) * rotation_scale).to(DTYPE)
                tl.store(q_rows + plane * K_WIDTH, rotated, mask=q_mask)
                tl.debug_barrier()  # every thread's stores before any thread's loads
            q0 = tl.load(q_rows, mask=q_mask, other=0.0)
            q1 = tl.load(q_rows + K_WIDTH, mask=q_mask, other=0.0)
            q2 = tl.load(q_rows + 2 * K_WIDTH, mask=q_mask, other=0.0)
            q3 = tl.load(q_rows + 3 * K_WIDTH, mask=q_mask, other=0.0)
        elif ROTATE:  # the planes of q @ R * scale, kept in the products' layout
            r_mask = w_ok[None, :]
            q0 = tl.dot(q, tl.load(r_cols, mask=r_mask, other=0.0).to(DTYPE), input_precision=PRECISION)
            q1 = tl.dot(q, tl.load(r_cols + K_WIDTH, mask=r_mask, other=0.0).to(DTYPE), input_precision=PRECISION)
            q2 = tl.dot(q, tl.load(r_cols + 2 * K_WIDTH, mask=r_mask, other=0.0).to(DTYPE), input_precision=PRECISION)
            q3 = tl.dot(q, tl.load(r_cols + 3 * K_WIDTH, mask=r_mask, other=0.0).to(DTYPE), input_precision=PRECISION)
            q0 = (q0 * rotation_scale).to(DTYPE)
            q1 = (q1 * rotation_scale).to(DTYPE)
            q2 = (q2 * rotation_scale).to(DTYPE)
            q3 = (q3 * rotation_scale).to(DTYPE)
        else:
            q_mask = g_ok[:, None] & w_ok[None, :]
            q0 = tl.load(q_rows + offs_w[None, :], mask=q_mask, other=0.0).to(DTYPE)
            q1 = tl.load(q_rows + K_WIDTH + offs_w[None, :], mask=q_mask, other=0.0).to(DTYPE)
            q2 = tl.load(q_rows + 2 * K_WIDTH + offs_w[None, :], mask=q_mask, other=0.0).to(DTYPE)
            q3 = tl.load(q_rows + 3 * K_WIDTH + offs_w[None, :], mask=q_mask, other=0.0).to(DTYPE)
        qsum0 = tl.sum(q0.to(tl.float32), axis=1)
        qsum1 = tl.sum(q1.to(tl.float32), axis=1)
        qsum2 = tl.sum(q2.to(tl.float32), axis=1)
        qsum3 = tl.sum(q3.to(tl.float32), axis=1)
        W3: tl.constexpr = _weighted_plane3(OFFSET)  # WEIGHTED: plane 3's weight
        # WEIGHTED: the packed splits' query planes take 1 / w_g (powers of two: exact, except that float16
        # values below 6e-5 w_g turn subnormal after the division and lose bits); the window's program keeps q
        if WEIGHTED:
            packed = split < num_splits
            q1 = (q1.to(tl.float32) * tl.where(packed, 0.25, 1.0)).to(DTYPE)
            q2 = (q2.to(tl.float32) * tl.where(packed, 0.0625, 1.0)).to(DTYPE)
            q3 = (q3.to(tl.float32) * tl.where(packed, 1.0 / W3, 1.0)).to(DTYPE)
            # sum_g q_g / w_g: what m contributes to each slot's sum, from the operands the products take
            qsum_w = tl.sum(q0.to(tl.float32), axis=1) + tl.sum(q1.to(tl.float32), axis=1)
            qsum_w += tl.sum(q2.to(tl.float32), axis=1) + tl.sum(q3.to(tl.float32), axis=1)
        kc_base = kc_ptr + b * stride_kcb + h * stride_kch
        ks_base = ks_ptr + b * stride_ksb + h * stride_ksh
        kz_base = kz_ptr + b * stride_ksb + h * stride_ksh
        vc_base = vc_ptr + b * stride_vcb + h * stride_vch
        vs_base = vs_ptr + b * stride_vsb + h * stride_vsh
        vz_base = vz_ptr + b * stride_vsb + h * stride_vsh
        k_lead = tl.load(k_lead_ptr + b).to(tl.int32)
        v_lead = tl.load(v_lead_ptr + b).to(tl.int32)
        length = tl.load(len_ptr + b).to(tl.int32)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc0 = tl.zeros([BLOCK_G, BLOCK_WV], tl.float32)
        acc1 = tl.zeros([BLOCK_G, BLOCK_WV], tl.float32)
        acc2 = tl.zeros([BLOCK_G, BLOCK_WV], tl.float32)
        acc3 = tl.zeros([BLOCK_G, BLOCK_WV], tl.float32)
        zacc = tl.zeros([BLOCK_G, 16], tl.float32)
        zsum = tl.zeros([BLOCK_G], tl.float32)  # ZERO_SUMS: sum of p * z over the slots so far
        rsum = tl.zeros([BLOCK_G], tl.float32)  # WEIGHTED: sum of the rounded p * s over the slots so far
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        first = start
        if K_MODE == "row" or K_MODE == "lead":  # tiles start where key parameter rows do (`_packed_split_kernel`)
            first = start - (start + BLOCK_N - k_lead % BLOCK_N) % BLOCK_N
        if K_MODE == "lead":  # row 0, the prompt set's, folded into the query once: q_g * s_g and q . z
            ls0, ls1, ls2, ls3, lz0, lz1, lz2, lz3 = _row_params(ks_base, kz_base, offs_w, w_ok, K_WIDTH)
            lead_bias = _row_bias(q0, q1, q2, q3, lz0, lz1, lz2, lz3)
            lq0 = (q0.to(tl.float32) * ls0[None, :]).to(DTYPE)
            lq1 = (q1.to(tl.float32) * ls1[None, :]).to(DTYPE)
            lq2 = (q2.to(tl.float32) * ls2[None, :]).to(DTYPE)
            lq3 = (q3.to(tl.float32) * ls3[None, :]).to(DTYPE)
            if K_OFFSET != 0.0 and K_BITS == 2:  # weighted offset codes m + w_g c: the weights out of the planes
                LW3: tl.constexpr = _weighted_plane3(K_OFFSET)
                lq1 = (lq1.to(tl.float32) * 0.25).to(DTYPE)
                lq2 = (lq2.to(tl.float32) * 0.0625).to(DTYPE)
                lq3 = (lq3.to(tl.float32) * (1.0 / LW3)).to(DTYPE)
            if K_OFFSET != 0.0:  # the prompt set's codes carry m: m sum_g lq_g out of the bias, once for every tile
                lead_bias -= K_OFFSET * (tl.sum(lq0.to(tl.float32), axis=1) + tl.sum(lq1.to(tl.float32), axis=1))
                lead_bias -= K_OFFSET * (tl.sum(lq2.to(tl.float32), axis=1) + tl.sum(lq3.to(tl.float32), axis=1))
        if K_MODE == "halves":  # tiles start where a row does, so each half of a tile is one row
            first = start - (start + K_ROW_TOKENS - k_lead % K_ROW_TOKENS) % K_ROW_TOKENS
        end = tl.where(split < num_splits, end, first)  # the window's program reads no packed slot
        # Tiles aligned to rows start before the split and mask its slots below `start`; the others start
        # at `start`, so only `end` bounds them.
        ALIGNED: tl.constexpr = K_MODE == "row" or K_MODE == "halves" or K_MODE == "lead"
        ahead = first + offs_n
        ahead_live = ((ahead >= start) & (ahead < end)) if ALIGNED else ahead < end
        if K_MODE == "token":
            ks0 = _column_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, 0 * K_WIDTH // K_GROUP, 1)
            kz0 = _column_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, 0 * K_WIDTH // K_GROUP, 1)
            if K_GROUP < HEAD_DIM:
                ks1 = _column_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, 1 * K_WIDTH // K_GROUP, 1)
                kz1 = _column_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, 1 * K_WIDTH // K_GROUP, 1)
                ks2 = _column_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, 2 * K_WIDTH // K_GROUP, 1)
                kz2 = _column_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, 2 * K_WIDTH // K_GROUP, 1)
                ks3 = _column_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, 3 * K_WIDTH // K_GROUP, 1)
                kz3 = _column_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, 3 * K_WIDTH // K_GROUP, 1)
        vs0 = _column_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, 0 * V_WIDTH // V_GROUP, 1)
        if V_GROUP < VALUE_DIM:
            vs1 = _column_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, 1 * V_WIDTH // V_GROUP, 1)
            vs2 = _column_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, 2 * V_WIDTH // V_GROUP, 1)
            vs3 = _column_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, 3 * V_WIDTH // V_GROUP, 1)
        if ZERO_SUMS:
            vz0 = _column_params(vz_base, ahead, ahead_live, v_lead, stride_vsr, 0, 1)
        else:
            vz = _zero_matrix(vz_base, ahead, ahead_live, v_lead, stride_vsr, VALUE_DIM // V_GROUP, 1)
        # "lead" runs two loops, the prompt set's tiles (below lead, row 0 folded) and then the decode blocks'
        # (per slot), so that neither carries the other's registers: one loop with a branch per tile spilled
        # (offline, sm_90: 90 local-memory operations at two warps). Other modes run one loop.
        # With UNMASKED, the first phase runs as three loops: the tile that starts below `start`, the tiles
        # wholly inside [start, end) without slot masks (no masked loads, no -inf select in the softmax), and
        # the tiles past them. Pieces: the phases, the first split in three where UNMASKED.
        PHASES: tl.constexpr = 2 if K_MODE == "lead" else 1
        PIECES: tl.constexpr = PHASES + 2 if UNMASKED else PHASES
        lead_tile = tl.minimum(tl.maximum(k_lead, first), end)  # tiles are aligned to lead
        for piece in tl.static_range(PIECES):
            phase = (1 if piece == 3 else 0) if UNMASKED else piece
            lo = first
            hi = end
            if PHASES == 2:
                lo = first if phase == 0 else lead_tile
                hi = lead_tile if phase == 0 else end
            if UNMASKED and phase == 0:  # tiles start at lo + k BLOCK_N; the inner ones lie in [start, end)
                inner_lo = tl.minimum(lo + tl.cdiv(tl.maximum(start - lo, 0), BLOCK_N) * BLOCK_N, hi)
                inner_hi = lo + tl.maximum(tl.minimum(end, hi) - lo, 0) // BLOCK_N * BLOCK_N
                inner_hi = tl.maximum(tl.minimum(inner_hi, hi), inner_lo)
                if piece == 0:
                    hi = inner_lo
                elif piece == 1:
                    lo = inner_lo
                    hi = inner_hi
                else:
                    lo = inner_hi
            for tile in range(lo, hi, BLOCK_N):
                slots = tile + offs_n
                if UNMASKED and piece == 1:  # every slot of the tile is live
                    live = tl.full([BLOCK_N], 1, tl.int1)
                else:
                    live = ((slots >= start) & (slots < end)) if ALIGNED else slots < end
                ahead = slots + BLOCK_N
                ahead_live = ((ahead >= start) & (ahead < end)) if ALIGNED else ahead < end

                k_el = _load_elements(kc_base, slots, live, stride_kcs, offs_w, K_WIDTH)
                if K_MODE == "lead" and phase == 0 and K_OFFSET != 0.0:  # the prompt set's, as offset codes
                    c0, c1, c2, c3 = _plane_codes(k_el, K_BITS, DTYPE, K_ASM, K_OFFSET, K_BITS == 2)
                elif K_MODE == "lead":  # the folded query's dtype; the decode blocks' tiles convert them to K_DTYPE
                    c0, c1, c2, c3 = _plane_codes(k_el, K_BITS, DTYPE, K_ASM, OFFSET)
                else:
                    c0, c1, c2, c3 = _plane_codes(k_el, K_BITS, K_DTYPE, K_ASM, OFFSET, WEIGHTED)
                if K_MODE == "token":
                    if K_GROUP < HEAD_DIM:  # a scale and a zero-point per plane
                        logits = ks0[None, :] * _scores(q0, c0, PRECISION, CODES_FIRST)
                        logits += ks1[None, :] * _scores(q1, c1, PRECISION, CODES_FIRST)
                        logits += ks2[None, :] * _scores(q2, c2, PRECISION, CODES_FIRST)
                        logits += ks3[None, :] * _scores(q3, c3, PRECISION, CODES_FIRST)
                        logits += qsum0[:, None] * kz0[None, :] + qsum1[:, None] * kz1[None, :]
                        logits += qsum2[:, None] * kz2[None, :] + qsum3[:, None] * kz3[None, :]
                        ks1 = _column_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, 1 * K_WIDTH // K_GROUP, 1)
                        kz1 = _column_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, 1 * K_WIDTH // K_GROUP, 1)
                        ks2 = _column_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, 2 * K_WIDTH // K_GROUP, 1)
                        kz2 = _column_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, 2 * K_WIDTH // K_GROUP, 1)
                        ks3 = _column_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, 3 * K_WIDTH // K_GROUP, 1)
                        kz3 = _column_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, 3 * K_WIDTH // K_GROUP, 1)
                    else:  # one scale and zero-point per slot
                        qc = _scores(q0, c0, PRECISION, CODES_FIRST)
                        qc = _add_scores(qc, q1, c1, PRECISION, CODES_FIRST)
                        qc = _add_scores(qc, q2, c2, PRECISION, CODES_FIRST)
                        qc = _add_scores(qc, q3, c3, PRECISION, CODES_FIRST)
                        if WEIGHTED:  # the codes carry m: m sum_g q_g / w_g comes out of each sum
                            qc = qc - OFFSET * qsum_w[:, None]
                        elif OFFSET != 0.0:  # the codes carry m: sum(q) m s comes out with the zero-point
                            kz0 = kz0 - OFFSET * ks0
                        logits = ks0[None, :] * qc + (qsum0 + qsum1 + qsum2 + qsum3)[:, None] * kz0[None, :]
                    ks0 = _column_params(ks_base, ahead, ahead_live, k_lead, stride_ksr, 0 * K_WIDTH // K_GROUP, 1)
                    kz0 = _column_params(kz_base, ahead, ahead_live, k_lead, stride_ksr, 0 * K_WIDTH // K_GROUP, 1)
                elif K_MODE == "rows":  # per-channel rows of any size: each slot's row read, keys dequantized
                    logits = _slot_row_logits(
                        q0, q1, q2, q3, c0, c1, c2, c3, ks_base, kz_base, slots, live, k_lead, stride_ksr, offs_w, w_ok,
                        K_WIDTH, K_ROW_TOKENS, K_DTYPE, PRECISION, CODES_FIRST,
                    )  # fmt: skip
                elif K_MODE == "lead":  # phase 0: the prompt set's tiles (below lead); 1: the decode blocks'
                    if phase == 0:
                        logits = _folded_logits(lq0, lq1, lq2, lq3, c0, c1, c2, c3, PRECISION, CODES_FIRST)
                        logits += lead_bias[:, None]
                    else:
                        logits = _slot_row_logits(
                            q0, q1, q2, q3, c0, c1, c2, c3, ks_base, kz_base, slots, live, k_lead, stride_ksr, offs_w,
                            w_ok, K_WIDTH, K_ROW_TOKENS, K_DTYPE, PRECISION, CODES_FIRST,
                        )  # fmt: skip
                elif K_MODE == "halves":  # two rows, one per half of the tile: each folded into q, halves chosen
                    half = tile + K_ROW_TOKENS
                    row_a = _slot_rows(tile, k_lead, K_ROW_TOKENS)
                    row_b = _slot_rows(half, k_lead, K_ROW_TOKENS)
                    b_mask = w_ok & (half < end)  # a last tile's second row may lie past the parameters
                    logits_a, bias_a = _folded_row_logits(
                        q0, q1, q2, q3, c0, c1, c2, c3, ks_base + row_a * stride_ksr, kz_base + row_a * stride_ksr,
                        offs_w, w_ok, K_WIDTH, DTYPE, PRECISION, CODES_FIRST,
                    )  # fmt: skip
                    logits_b, bias_b = _folded_row_logits(
                        q0, q1, q2, q3, c0, c1, c2, c3, ks_base + row_b * stride_ksr, kz_base + row_b * stride_ksr,
                        offs_w, b_mask, K_WIDTH, DTYPE, PRECISION, CODES_FIRST,
                    )  # fmt: skip
                    logits = tl.where(
                        (offs_n < K_ROW_TOKENS)[None, :], logits_a + bias_a[:, None], logits_b + bias_b[:, None]
                    )
                else:  # "row": one row of per-channel parameters for the whole tile
                    row = _slot_rows(tile, k_lead, K_ROW_TOKENS)
                    logits, bias = _folded_row_logits(
                        q0, q1, q2, q3, c0, c1, c2, c3, ks_base + row * stride_ksr, kz_base + row * stride_ksr,
                        offs_w, w_ok, K_WIDTH, DTYPE, PRECISION, CODES_FIRST,
                    )  # fmt: skip
                    logits += bias[:, None]
                p, alpha, m_new, l_i = _online_softmax(logits, live, m_i, l_i, scale_log2)

                v_el = _load_values(vc_base, slots, live, stride_vcs, offs_wv, V_WIDTH, CODES_FIRST)
                c0, c1, c2, c3 = _plane_codes(v_el, V_BITS, DTYPE, V_ASM, OFFSET, WEIGHTED)
                if ZERO_SUMS:
                    if WEIGHTED:  # the codes carry m and w_g: the rounded p * s summed apart (after the loops)
                        rsum = rsum * alpha + tl.sum((p * vs0[None, :]).to(DTYPE).to(tl.float32), axis=1)
                        zsum = zsum * alpha + tl.sum(p * vz0[None, :], axis=1)
                    elif OFFSET != 0.0:  # the codes carry m: m times the rounded p * s (what the products take) out
                        rounded = (p * vs0[None, :]).to(DTYPE).to(tl.float32)
                        zsum = zsum * alpha + tl.sum(p * vz0[None, :] - OFFSET * rounded, axis=1)
                    else:
                        zsum = zsum * alpha + tl.sum(p * vz0[None, :], axis=1)
                    vz0 = _column_params(vz_base, ahead, ahead_live, v_lead, stride_vsr, 0, 1)
                else:
                    zacc = _weighted_values(
                        p.to(DTYPE), tl.trans(vz.to(DTYPE)) if CODES_FIRST else vz.to(DTYPE), zacc * alpha[:, None],
                        PRECISION, CODES_FIRST,
                    )  # fmt: skip
                    vz = _zero_matrix(vz_base, ahead, ahead_live, v_lead, stride_vsr, VALUE_DIM // V_GROUP, 1)
                if V_GROUP < VALUE_DIM:
                    acc0 = _weighted_values(
                        (p * vs0[None, :]).to(DTYPE), c0, acc0 * alpha[:, None], PRECISION, CODES_FIRST
                    )
                    acc1 = _weighted_values(
                        (p * vs1[None, :]).to(DTYPE), c1, acc1 * alpha[:, None], PRECISION, CODES_FIRST
                    )
                    acc2 = _weighted_values(
                        (p * vs2[None, :]).to(DTYPE), c2, acc2 * alpha[:, None], PRECISION, CODES_FIRST
                    )
                    acc3 = _weighted_values(
                        (p * vs3[None, :]).to(DTYPE), c3, acc3 * alpha[:, None], PRECISION, CODES_FIRST
                    )
                    vs1 = _column_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, 1 * V_WIDTH // V_GROUP, 1)
                    vs2 = _column_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, 2 * V_WIDTH // V_GROUP, 1)
                    vs3 = _column_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, 3 * V_WIDTH // V_GROUP, 1)
                else:
                    p_scaled = (p * vs0[None, :]).to(DTYPE)
                    acc0 = _weighted_values(p_scaled, c0, acc0 * alpha[:, None], PRECISION, CODES_FIRST)
                    acc1 = _weighted_values(p_scaled, c1, acc1 * alpha[:, None], PRECISION, CODES_FIRST)
                    acc2 = _weighted_values(p_scaled, c2, acc2 * alpha[:, None], PRECISION, CODES_FIRST)
                    acc3 = _weighted_values(p_scaled, c3, acc3 * alpha[:, None], PRECISION, CODES_FIRST)
                vs0 = _column_params(vs_base, ahead, ahead_live, v_lead, stride_vsr, 0 * V_WIDTH // V_GROUP, 1)
                m_i = m_new

        if WEIGHTED:  # plane g's sums are m R + w_g (p s) . c_g: the codes' own, before the window's program adds
            acc0 = acc0 - OFFSET * rsum[:, None]
            acc1 = (acc1 - OFFSET * rsum[:, None]) * 0.25
            acc2 = (acc2 - OFFSET * rsum[:, None]) * 0.0625
            acc3 = (acc3 - OFFSET * rsum[:, None]) * (1.0 / W3)
        if HAS_WINDOW:  # the window's program: slots of the model's dtype, read plane by plane as the codes
            wk_base = wk_ptr + b * stride_wkb + h * stride_wkh
            wv_base = wv_ptr + b * stride_wvb + h * stride_wvh
            if WINDOW_RING:  # the ring's counters: wpos_ptr holds tokens seen, wq_ptr tokens quantized
                last = tl.load(wpos_ptr + b * stride_wpb).to(tl.int32) - 1
                quantized = tl.load(wq_ptr + b * stride_wph).to(tl.int32)
            # BLOCK_NW: the window's tile, 16 slots with the codes first (`WINDOW_BLOCK_CODES_FIRST`)
            for tile in range(0, tl.where(split == num_splits, window_slots, 0), BLOCK_NW):
                slots = tile + tl.arange(0, BLOCK_NW)
                if WINDOW_RING:  # slot r holds position last - (last - r) mod R; last - r >= -R, so one + R wraps it
                    behind = last - slots
                    behind = tl.where(behind < 0, behind + window_slots, behind) % window_slots
                    live = (last - behind >= quantized) & (slots < window_slots)
                else:
                    position = tl.load(
                        wpos_ptr + b * stride_wpb + h * stride_wph + slots * stride_wps,
                        mask=slots < window_slots,
                        other=-1,
                    )
                    live = position >= 0
                k_rows = wk_base + slots[:, None] * stride_wks + offs_w[None, :]
                k_mask = live[:, None] & w_ok[None, :]
                k0 = tl.load(k_rows, mask=k_mask, other=0.0).to(DTYPE)
                k1 = tl.load(k_rows + K_WIDTH, mask=k_mask, other=0.0).to(DTYPE)
                k2 = tl.load(k_rows + 2 * K_WIDTH, mask=k_mask, other=0.0).to(DTYPE)
                k3 = tl.load(k_rows + 3 * K_WIDTH, mask=k_mask, other=0.0).to(DTYPE)
                logits = _scores(q0, k0, PRECISION, CODES_FIRST)
                logits = _add_scores(logits, q1, k1, PRECISION, CODES_FIRST)
                logits = _add_scores(logits, q2, k2, PRECISION, CODES_FIRST)
                logits = _add_scores(logits, q3, k3, PRECISION, CODES_FIRST)
                p, alpha, m_new, l_i = _online_softmax(logits, live, m_i, l_i, scale_log2)
                p = p.to(DTYPE)
                v0 = _load_values(wv_base, slots, live, stride_wvs, offs_wv, V_WIDTH, CODES_FIRST)
                v1 = _load_values(wv_base + V_WIDTH, slots, live, stride_wvs, offs_wv, V_WIDTH, CODES_FIRST)
                v2 = _load_values(wv_base + 2 * V_WIDTH, slots, live, stride_wvs, offs_wv, V_WIDTH, CODES_FIRST)
                v3 = _load_values(wv_base + 3 * V_WIDTH, slots, live, stride_wvs, offs_wv, V_WIDTH, CODES_FIRST)
                acc0 = _weighted_values(p, v0.to(DTYPE), acc0 * alpha[:, None], PRECISION, CODES_FIRST)
                acc1 = _weighted_values(p, v1.to(DTYPE), acc1 * alpha[:, None], PRECISION, CODES_FIRST)
                acc2 = _weighted_values(p, v2.to(DTYPE), acc2 * alpha[:, None], PRECISION, CODES_FIRST)
                acc3 = _weighted_values(p, v3.to(DTYPE), acc3 * alpha[:, None], PRECISION, CODES_FIRST)
                m_i = m_new

        any_live = l_i > 0.0
        norm = tl.where(any_live, l_i, 1.0)
        lse2 = tl.where(any_live, m_i + tl.log2(norm), float("-inf"))
        rows = (b * num_kv_heads * group + heads) * total_splits + out_split  # kvbench.kernels' partial layout
        out = o_part_ptr + rows[:, None] * VALUE_DIM + offs_wv[None, :]
        mask = g_ok[:, None] & (offs_wv < V_WIDTH)[None, :]
        if ZERO_SUMS:
            z0 = zsum
            z1 = zsum
            z2 = zsum
            z3 = zsum
        else:
            cols = tl.arange(0, 16)[None, :]  # zero-point j's sums in column 4 j (`_zero_matrix`)
            z0 = tl.sum(tl.where(cols == 4 * (0 * V_WIDTH // V_GROUP), zacc, 0.0), axis=1)
            z1 = tl.sum(tl.where(cols == 4 * (1 * V_WIDTH // V_GROUP), zacc, 0.0), axis=1)
            z2 = tl.sum(tl.where(cols == 4 * (2 * V_WIDTH // V_GROUP), zacc, 0.0), axis=1)
            z3 = tl.sum(tl.where(cols == 4 * (3 * V_WIDTH // V_GROUP), zacc, 0.0), axis=1)
        tl.store(out, (acc0 + z0[:, None]) / norm[:, None], mask=mask)
        tl.store(out + V_WIDTH, (acc1 + z1[:, None]) / norm[:, None], mask=mask)
        tl.store(out + 2 * V_WIDTH, (acc2 + z2[:, None]) / norm[:, None], mask=mask)
        tl.store(out + 3 * V_WIDTH, (acc3 + z3[:, None]) / norm[:, None], mask=mask)
        tl.store(lse_part_ptr + rows, lse2, mask=g_ok)

    @triton.jit(do_not_specialize=["split_len", "num_splits", "total_splits", "window_slots"])
    def _plane_split_kernel(
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
        stride_kcb,
        stride_kch,
        stride_kcs,
        stride_ksb,
        stride_ksh,
        stride_ksr,
        stride_vcb,
        stride_vch,
        stride_vcs,
        stride_vsb,
        stride_vsh,
        stride_vsr,
        wk_ptr,
        wv_ptr,
        wpos_ptr,
        wq_ptr,
        total_splits,
        window_slots,
        stride_wkb,
        stride_wkh,
        stride_wks,
        stride_wvb,
        stride_wvh,
        stride_wvs,
        stride_wpb,
        stride_wph,
        stride_wps,
        rotation_ptr,
        rotation_scale,
        HEAD_DIM: tl.constexpr,
        VALUE_DIM: tl.constexpr,
        K_BITS: tl.constexpr,
        K_ROW_TOKENS: tl.constexpr,
        K_GROUP: tl.constexpr,
        K_MODE: tl.constexpr,
        V_BITS: tl.constexpr,
        V_GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_WV: tl.constexpr,
        BLOCK_NW: tl.constexpr,
        DTYPE: tl.constexpr,
        K_DTYPE: tl.constexpr,
        K_ASM: tl.constexpr,
        V_ASM: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        ROTATE: tl.constexpr,
        PRECISION: tl.constexpr,
        ZERO_SUMS: tl.constexpr,
        OFFSET: tl.constexpr,
        WEIGHTED: tl.constexpr,
        K_OFFSET: tl.constexpr,
        WINDOW_RING: tl.constexpr,
        UNMASKED: tl.constexpr,
        CODES_FIRST: tl.constexpr,
    ):
        """One launch over one store: grid (sequence x KV head, splits + the window's program); `_plane_split`
        says what each program does."""
        _plane_split(
            tl.program_id(0), tl.program_id(1), tl.program_id(1), q_ptr, kc_ptr, ks_ptr, kz_ptr, k_lead_ptr, vc_ptr,
            vs_ptr, vz_ptr, v_lead_ptr, len_ptr, o_part_ptr, lse_part_ptr, scale_log2, num_kv_heads, group, split_len,
            num_splits, stride_qb, stride_qh, stride_kcb, stride_kch, stride_kcs, stride_ksb, stride_ksh, stride_ksr,
            stride_vcb, stride_vch, stride_vcs, stride_vsb, stride_vsh, stride_vsr, wk_ptr, wv_ptr, wpos_ptr, wq_ptr,
            total_splits, window_slots, stride_wkb, stride_wkh, stride_wks, stride_wvb, stride_wvh, stride_wvs,
            stride_wpb, stride_wph, stride_wps, rotation_ptr, rotation_scale, HEAD_DIM, VALUE_DIM, K_BITS,
            K_ROW_TOKENS, K_GROUP, K_MODE, V_BITS, V_GROUP, BLOCK_G, BLOCK_N, BLOCK_W, BLOCK_WV, BLOCK_NW, DTYPE,
            K_DTYPE, K_ASM, V_ASM, HAS_WINDOW, ROTATE, PRECISION, ZERO_SUMS, OFFSET, WEIGHTED, K_OFFSET, WINDOW_RING,
            UNMASKED, CODES_FIRST,
        )  # fmt: skip

    # fmt: off
    @triton.jit(
        do_not_specialize=["split_len", "num_splits", "split_len_2", "num_splits_2", "total_splits", "window_slots"]
    )
    def _plane_pair_kernel(
        # `_plane_split_kernel`'s arguments, the first store's and those the stores share
        q_ptr, kc_ptr, ks_ptr, kz_ptr, k_lead_ptr, vc_ptr, vs_ptr, vz_ptr, v_lead_ptr, len_ptr, o_part_ptr,
        lse_part_ptr, scale_log2, num_kv_heads, group, split_len, num_splits, stride_qb, stride_qh, stride_kcb,
        stride_kch, stride_kcs, stride_ksb, stride_ksh, stride_ksr, stride_vcb, stride_vch, stride_vcs, stride_vsb,
        stride_vsh, stride_vsr, wk_ptr, wv_ptr, wpos_ptr, wq_ptr, total_splits, window_slots, stride_wkb, stride_wkh,
        stride_wks, stride_wvb, stride_wvh, stride_wvs, stride_wpb, stride_wph, stride_wps, rotation_ptr,
        rotation_scale,
        # the second store's
        kc_ptr_2, ks_ptr_2, kz_ptr_2, k_lead_ptr_2, vc_ptr_2, vs_ptr_2, vz_ptr_2, v_lead_ptr_2, len_ptr_2,
        split_len_2, num_splits_2, stride_kcb_2, stride_kch_2, stride_kcs_2, stride_ksb_2, stride_ksh_2, stride_ksr_2,
        stride_vcb_2, stride_vch_2, stride_vcs_2, stride_vsb_2, stride_vsh_2, stride_vsr_2,
        HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, K_BITS: tl.constexpr, K_ROW_TOKENS: tl.constexpr,
        K_GROUP: tl.constexpr, K_MODE: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_WV: tl.constexpr,
        BLOCK_NW: tl.constexpr,
        DTYPE: tl.constexpr, K_DTYPE: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr,
        HAS_WINDOW: tl.constexpr, ROTATE: tl.constexpr, PRECISION: tl.constexpr, ZERO_SUMS: tl.constexpr,
        OFFSET: tl.constexpr, WEIGHTED: tl.constexpr, K_OFFSET: tl.constexpr,
        K_BITS_2: tl.constexpr, K_ROW_TOKENS_2: tl.constexpr, K_GROUP_2: tl.constexpr, K_MODE_2: tl.constexpr,
        V_BITS_2: tl.constexpr, V_GROUP_2: tl.constexpr, K_DTYPE_2: tl.constexpr, K_ASM_2: tl.constexpr,
        V_ASM_2: tl.constexpr, ZERO_SUMS_2: tl.constexpr, OFFSET_2: tl.constexpr, WEIGHTED_2: tl.constexpr,
        K_OFFSET_2: tl.constexpr, WINDOW_RING: tl.constexpr,
        UNMASKED: tl.constexpr, UNMASKED_2: tl.constexpr, CODES_FIRST: tl.constexpr,
    ):
    # fmt: on
        """One launch over two stores (ZipCache's sets), each as `_plane_split_kernel` would launch it: the first
        store's num_splits programs, then the second's num_splits_2 (names ending in _2 are its arguments) and,
        with HAS_WINDOW, the window's program after them; all write partials of one [rows, total_splits] layout,
        so one combine merges both sets and the window. The two sets' programs run side by side instead of one
        launch after the other."""
        split = tl.program_id(1)
        if split < num_splits:
            _plane_split(
                tl.program_id(0), split, split, q_ptr, kc_ptr, ks_ptr, kz_ptr, k_lead_ptr, vc_ptr, vs_ptr, vz_ptr,
                v_lead_ptr, len_ptr, o_part_ptr, lse_part_ptr, scale_log2, num_kv_heads, group, split_len, num_splits,
                stride_qb, stride_qh, stride_kcb, stride_kch, stride_kcs, stride_ksb, stride_ksh, stride_ksr,
                stride_vcb, stride_vch, stride_vcs, stride_vsb, stride_vsh, stride_vsr, wk_ptr, wv_ptr, wpos_ptr,
                wq_ptr, total_splits, window_slots, stride_wkb, stride_wkh, stride_wks, stride_wvb, stride_wvh,
                stride_wvs, stride_wpb, stride_wph, stride_wps, rotation_ptr, rotation_scale, HEAD_DIM, VALUE_DIM,
                K_BITS, K_ROW_TOKENS, K_GROUP, K_MODE, V_BITS, V_GROUP, BLOCK_G, BLOCK_N, BLOCK_W, BLOCK_WV, BLOCK_NW,
                DTYPE, K_DTYPE, K_ASM, V_ASM, False, ROTATE, PRECISION, ZERO_SUMS, OFFSET, WEIGHTED, K_OFFSET,
                WINDOW_RING, UNMASKED, CODES_FIRST,
            )  # fmt: skip
        else:
            _plane_split(
                tl.program_id(0), split - num_splits, split, q_ptr, kc_ptr_2, ks_ptr_2, kz_ptr_2, k_lead_ptr_2,
                vc_ptr_2, vs_ptr_2, vz_ptr_2, v_lead_ptr_2, len_ptr_2, o_part_ptr, lse_part_ptr, scale_log2,
                num_kv_heads, group, split_len_2, num_splits_2, stride_qb, stride_qh, stride_kcb_2, stride_kch_2,
                stride_kcs_2, stride_ksb_2, stride_ksh_2, stride_ksr_2, stride_vcb_2, stride_vch_2, stride_vcs_2,
                stride_vsb_2, stride_vsh_2, stride_vsr_2, wk_ptr, wv_ptr, wpos_ptr, wq_ptr, total_splits, window_slots,
                stride_wkb, stride_wkh, stride_wks, stride_wvb, stride_wvh, stride_wvs, stride_wpb, stride_wph,
                stride_wps, rotation_ptr, rotation_scale, HEAD_DIM, VALUE_DIM, K_BITS_2, K_ROW_TOKENS_2, K_GROUP_2,
                K_MODE_2, V_BITS_2, V_GROUP_2, BLOCK_G, BLOCK_N, BLOCK_W, BLOCK_WV, BLOCK_NW, DTYPE, K_DTYPE_2, K_ASM_2,
                V_ASM_2, HAS_WINDOW, ROTATE, PRECISION, ZERO_SUMS_2, OFFSET_2, WEIGHTED_2, K_OFFSET_2, WINDOW_RING,
                UNMASKED_2, CODES_FIRST,
            )  # fmt: skip

    class _StoreLaunch(NamedTuple):
        """One store as the plane kernels take it: its runtime arguments in the kernels' order (pointers; the
        split plan, split_len then num_splits; strides), its constexprs and the launch it runs under."""

        pointers: list[torch.Tensor]
        splits: tuple[int, int]
        strides: list[int]
        constexprs: dict
        launch: LaunchConfig

    def _store_launch(
        query: torch.Tensor,
        keys: PackedSlots,
        values: PackedSlots,
        lengths: torch.Tensor,
        launch: LaunchConfig,
        sm_share: float = 1.0,
        window_slots: int | None = None,
    ) -> _StoreLaunch:
        """`sm_share`: the fraction of the GPU's split target this store's plan takes (a pair's sets may share
        one target, `LaunchConfig.pair_shared_target`). `window_slots`: a single store's window, where its
        launch may take the split target of its waves (`LaunchConfig.store_wave_target`, for KIVI's "halves"
        `halves_wave_target`); None for a pair's stores, whose target the pair chose."""
        b, _, d = query.shape
        hkv, s = keys.codes.shape[1], keys.codes.shape[2]
        key_mode, zero_sums, launch = store_launch(keys, values, launch)
        num_sms = max(1, round(kernels._num_sms(query.device) * sm_share))
        by_waves = launch.store_wave_target or (launch.halves_wave_target and key_mode == "halves")
        if window_slots is not None and by_waves and b * hkv > FEW_HEADS:
            target = wave_target(((s, keys.bits),), window_slots, b * hkv, num_sms, launch)
            launch = replace(launch, programs_per_sm_many_heads=target)
        num_splits, split_len = _split_plan(b * hkv, s, num_sms, launch)
        upcast, _ = kernels._upcast_and_precision(query.dtype)
        dtype = tl.float32 if upcast else _TL_DTYPES[query.dtype]
        # Elements: 16-bit words of 4-bit codes, bytes of 2-bit ones. The inline PTX needs the compiled GPU
        # path and a 16-bit dot.
        k_codes = keys.codes.view(torch.int16) if keys.bits == 4 else keys.codes
        v_codes = values.codes.view(torch.int16) if values.bits == 4 else values.codes
        # Dequantized keys (`DEQUANTIZED_KEY_MODES`) are float16 for a 16-bit query: c * s + z in the
        # parameters' own type.
        key_dtype = tl.float16 if key_mode in DEQUANTIZED_KEY_MODES and dtype != tl.float32 else dtype
        asm = not kernels._INTERPRETED
        # Offset codes: per-token keys with one parameter per slot and summed value zero-points only, for a
        # 16-bit query (what the conversion saves; a float32 query converts by shifts and gains nothing).
        sixteen_bit = query.dtype in (torch.bfloat16, torch.float16)
        # 2-bit codes where the launch asks for their offset form (`LaunchConfig.offset_crumbs`).
        offset_fits = zero_sums and sixteen_bit and key_mode == "token" and keys.col_channels == d
        offset_fits = offset_fits and all(bits == 4 or launch.offset_crumbs for bits in (keys.bits, values.bits))
        offset = (1024.0 if dtype == tl.float16 else 128.0) if launch.offset_codes and offset_fits else 0.0
        # ZipCache's prompt-set keys, whose parameter row folds into the query once, as offset codes where the
        # launch asks (`LaunchConfig.lead_offset_keys`; 2-bit codes weighted)
        k_folded = launch.lead_offset_keys and key_mode == "lead" and keys.bits in (2, 4)
        k_offset = (1024.0 if dtype == tl.float16 else 128.0) if k_folded and sixteen_bit else 0.0
        constexprs = {
            "K_BITS": keys.bits, "K_ROW_TOKENS": keys.row_tokens, "K_GROUP": keys.col_channels, "K_MODE": key_mode,
            "V_BITS": values.bits, "V_GROUP": values.col_channels, "K_DTYPE": key_dtype,
            "K_ASM": asm and key_dtype != tl.float32, "V_ASM": asm and dtype != tl.float32, "ZERO_SUMS": zero_sums,
            "OFFSET": offset, "WEIGHTED": offset != 0.0 and launch.weighted_crumbs and keys.bits == values.bits == 2,
            "K_OFFSET": k_offset, "UNMASKED": launch.unmasked_tiles,
        }  # fmt: skip
        pointers = [k_codes, keys.scale, keys.zero, keys.lead, v_codes, values.scale, values.zero, values.lead]
        strides = [*k_codes.stride()[:3], *keys.scale.stride()[:3], *v_codes.stride()[:3], *values.scale.stride()[:3]]
        return _StoreLaunch([*pointers, lengths], (split_len, num_splits), strides, constexprs, launch)

    def _plane_attention_triton(
        query: torch.Tensor,
        stores: list[_StoreLaunch],
        scale: float,
        window: Window | None = None,
        rotation: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One store (`_plane_split_kernel`) or two under one launch (`_plane_pair_kernel`), the window's program
        last, then one combine over all their partials (which rotates and scales the output where asked)."""
        b, hq, d = query.shape
        first = stores[0]
        hkv = first.pointers[0].shape[1]
        dv = first.pointers[4].shape[-1] * 4  # value elements of four codes
        group = hq // hkv
        total_splits = sum(store.splits[1] for store in stores) + (window is not None)  # the window's: last
        o_part = torch.empty(b * hq, total_splits, dv, dtype=torch.float32, device=query.device)
        lse_part = torch.empty(b * hq, total_splits, dtype=torch.float32, device=query.device)
        # Without a window its pointers are the query's and its sizes 0: the kernel never reads them.
        wk, wv, wpos, wq = query, query, query, query
        window_strides = (0,) * 9
        ring = window is not None and window.positions is None
        if ring:
            wk, wv, wpos, wq = window.keys, window.values, window.seen, window.quantized
            window_strides = (*wk.stride()[:3], *wv.stride()[:3], wpos.stride(0), wq.stride(0), 0)
        elif window is not None:
            wk, wv, wpos = window.keys, window.values, window.positions
            window_strides = (*wk.stride()[:3], *wv.stride()[:3], *wpos.stride())
        upcast, precision = kernels._upcast_and_precision(query.dtype)
        codes_first = first.launch.codes_first  # a pair's stores agree (`pair_launch` decides for both)
        arguments = [
            query, *first.pointers, o_part, lse_part, scale * kernels.LOG2E, hkv, group, *first.splits,
            query.stride(0), query.stride(1), *first.strides, wk, wv, wpos, wq, total_splits,
            wk.shape[2] if window is not None else 0, *window_strides,
            query if rotation is None else rotation,  # never read without ROTATE
            d**-0.5,
        ]  # fmt: skip
        constexprs = first.constexprs | {
            "HEAD_DIM": d, "VALUE_DIM": dv, "BLOCK_G": max(query_block(store.launch, group) for store in stores),
            "BLOCK_N": first.launch.block_n,
            "BLOCK_W": kernels._dot_block(d // 4), "BLOCK_WV": kernels._dot_block(dv // 4),
            "DTYPE": tl.float32 if upcast else _TL_DTYPES[query.dtype], "HAS_WINDOW": window is not None,
            "ROTATE": 0 if rotation is None else 2 if first.launch.reload_rotated_query else 1,
            "PRECISION": precision, "WINDOW_RING": ring,
            "CODES_FIRST": codes_first, "BLOCK_NW": window_block(first.launch),
        }  # fmt: skip
        kernel = _plane_split_kernel
        if len(stores) == 2:
            second = stores[1]
            arguments += [*second.pointers, *second.splits, *second.strides]
            constexprs |= {f"{name}_2": value for name, value in second.constexprs.items()}
            kernel = _plane_pair_kernel
        _launch(kernel, (b * hkv, total_splits), arguments, constexprs, first.launch)
        return kernels._combine_splits(o_part, lse_part, b, hq, query.dtype, rotation, out_scale)

    def _launch(kernel, grid: tuple[int, int], arguments: list, constexprs: dict, launch: LaunchConfig) -> None:
        """One plane-kernel launch under `launch`: through `wrap_triton` (torch.compile traces it), or, with a
        register cap (the store's launch's `max_registers`, `plane_launch`), straight to Triton with ptxas's
        `maxnreg`, which Inductor's copy of a kernel would drop: only the opaque operators (`plane_operators`)
        take a cap."""
        options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
        if launch.max_registers:
            kernel[grid](*arguments, **constexprs, **options, maxnreg=launch.max_registers)
        else:
            wrap_triton(kernel)[grid](*arguments, **constexprs, **options)


def _plane_attention(
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
    window_keys: torch.Tensor | None,
    window_values: torch.Tensor | None,
    window_positions: torch.Tensor | None,
    window_seen: torch.Tensor | None,
    window_quantized: torch.Tensor | None,
    rotation: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    scale: float,
    k_format: list[int],
    v_format: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed store in the plane kernel's layouts (`plane_plan`), with a full-precision window, a rotation
    and channel scales where given (`packed_decode_attention`), in one launch of `_plane_split_kernel` and the
    combine on CUDA; elsewhere the references, merged, with the rotation as two products and the scales as
    one."""
    keys = PackedSlots(k_codes, k_scale, k_zero, k_lead, *k_format)
    values = PackedSlots(v_codes, v_scale, v_zero, v_lead, *v_format)
    window = (
        None
        if window_keys is None
        else Window(window_keys, window_values, window_positions, window_seen, window_quantized)
    )
    if kernels._use_triton(query):
        # `quant_kernels.LAUNCH`, read at each call: benchmarks and tests assign it.
        window_slots = 0 if window is None else window.keys.shape[2]
        store = _store_launch(query, keys, values, lengths, quant_kernels.LAUNCH, window_slots=window_slots)
        return _plane_attention_triton(query, [store], scale, window, rotation, out_scale)
    q = query if rotation is None else rotate(query, rotation)
    out, lse = packed_decode_attention_reference(q, keys, values, lengths, scale)
    if window is not None:
        dense = kernels.decode_attention_reference(q, *window.attention_inputs(), scale)
        out, lse = merge_attention([(out, lse), dense])
    out = out if rotation is None else rotate(out, rotation)
    return (out if out_scale is None else scale_channels(out, out_scale)), lse


def _plane_pair(
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
    k_codes_2: torch.Tensor,
    k_scale_2: torch.Tensor,
    k_zero_2: torch.Tensor,
    k_lead_2: torch.Tensor,
    v_codes_2: torch.Tensor,
    v_scale_2: torch.Tensor,
    v_zero_2: torch.Tensor,
    v_lead_2: torch.Tensor,
    lengths_2: torch.Tensor,
    window_keys: torch.Tensor | None,
    window_values: torch.Tensor | None,
    window_positions: torch.Tensor | None,
    window_seen: torch.Tensor | None,
    window_quantized: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    scale: float,
    k_format: list[int],
    v_format: list[int],
    k_format_2: list[int],
    v_format_2: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two packed stores that `pair_fits` (ZipCache's sets), with a full-precision window and channel scales
    where given, as one attention: one launch of `_plane_pair_kernel` and one combine (which scales) on CUDA;
    elsewhere the references, merged, then scaled."""
    first = (
        PackedSlots(k_codes, k_scale, k_zero, k_lead, *k_format),
        PackedSlots(v_codes, v_scale, v_zero, v_lead, *v_format),
    )
    second = (
        PackedSlots(k_codes_2, k_scale_2, k_zero_2, k_lead_2, *k_format_2),
        PackedSlots(v_codes_2, v_scale_2, v_zero_2, v_lead_2, *v_format_2),
    )
    window = (
        None
        if window_keys is None
        else Window(window_keys, window_values, window_positions, window_seen, window_quantized)
    )
    if kernels._use_triton(query):
        launch = pair_launch(first, second, quant_kernels.LAUNCH)
        batch_heads = k_codes.shape[0] * k_codes.shape[1]
        if launch.pair_wave_target and batch_heads > FEW_HEADS:
            sets = ((k_codes.shape[2], first[0].bits), (k_codes_2.shape[2], second[0].bits))
            window_slots = 0 if window is None else window.keys.shape[2]
            target = wave_target(sets, window_slots, batch_heads, kernels._num_sms(query.device), launch)
            launch = replace(launch, programs_per_sm_many_heads=target)
        shares = pair_shares(k_codes.shape[2], k_codes_2.shape[2], batch_heads, launch)
        stores = [
            _store_launch(query, *first, lengths, launch, shares[0]),
            _store_launch(query, *second, lengths_2, launch, shares[1]),
        ]
        return _plane_attention_triton(query, stores, scale, window, out_scale=out_scale)
    pieces = [
        packed_decode_attention_reference(query, *first, lengths, scale),
        packed_decode_attention_reference(query, *second, lengths_2, scale),
    ]
    if window is not None:
        pieces.append(kernels.decode_attention_reference(query, *window.attention_inputs(), scale))
    out, lse = merge_attention(pieces)
    return (out if out_scale is None else scale_channels(out, out_scale)), lse


# Each body twice: as a traced operator (torch.compile sees its kernels) and as an opaque one (torch.compile
# calls it as it is), which a register cap needs (`plane_operators`).
_plane_attention_op = kernels._make_op("kvbench::plane_attention")(_plane_attention)
_plane_pair_op = kernels._make_op("kvbench::plane_pair_attention")(_plane_pair)
_plane_attention_opaque_op = kernels._make_opaque_op("kvbench::plane_attention_opaque")(_plane_attention)
_plane_pair_opaque_op = kernels._make_opaque_op("kvbench::plane_pair_attention_opaque")(_plane_pair)


def plane_operators(
    first: tuple[PackedSlots, PackedSlots],
    launch: LaunchConfig,
    second: tuple[PackedSlots, PackedSlots] | None = None,
) -> tuple:
    """(single-store, pair) operators for a call over the store `first` (keys, values), or the pair `first`,
    `second`, under `launch`: the traced ones, or where the first store's launch caps registers (`store_launch`,
    for a pair under `pair_launch`: KIVI's codes-first "halves" at `halves_max_registers`, the rest at
    `max_registers`) the opaque ones, whose launches go straight to Triton with the cap (`_launch` takes the
    first store's)."""
    if second is not None:
        launch = pair_launch(first, second, launch)
    if store_launch(*first, launch)[2].max_registers:
        return torch.ops.kvbench.plane_attention_opaque, torch.ops.kvbench.plane_pair_attention_opaque
    return torch.ops.kvbench.plane_attention, torch.ops.kvbench.plane_pair_attention

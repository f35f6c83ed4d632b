"""Decode attention over packed (quantized) K/V slots: a Triton kernel for CUDA and its PyTorch reference.

The kernel is `kvbench.kernels`' flash-decoding split kernel with its K/V tiles read packed: each program
reads the codes of its tiles (a 4-bit cache reads a quarter of bf16's bytes) plus their float16 scales and
zero-points, and the online softmax, the partial outputs and the combine kernel that merges the splits are
`kvbench.kernels`' own. It returns the same contract as `kvbench.kernels.decode_attention`: (out [B, Hq, Dv]
in the query's dtype, lse [B, Hq] float32), so a layer merges it with attention over other slots (a
full-precision window) through the log-sum-exp.

Slot layout (`PackedSlots`): slots [0, length[b]) of sequence b are live (quantized tokens fill a store
from its front; the order of tokens does not matter to attention, keys being stored post-RoPE). Codes are
[B, Hkv, S, D * bits / 8] uint8 (`kvbench.quant.pack`, one bit stream per slot). Scale and zero-point are
float16 [B, Hkv, R, C]: slot s uses parameter row 0 if s < lead[b], else row 1 + (s - lead[b]) //
row_tokens, and channel d uses column d // col_channels. This one rule covers per-token groups
(row_tokens = lead = 1, col_channels = group), per-channel groups of G tokens (row_tokens = lead = G,
col_channels = 1) and ZipCache's keys (one row for the whole prompt set, lead = its size, then one row per
decode block of row_tokens tokens).

Why the kernel is shaped as it is (decode attention is bound by memory, and a packed tile holds 2-8 times
more values per byte than a bf16 one, so dequantization must cost a few instructions per value):
- A tile's codes are one contiguous uint8 load per slot row ([BLOCK_N, D * bits / 8]), split into codes
  by shifts and masks on whole fields (a byte into two nibbles, a nibble into two 2-bit codes; 3-bit rows
  as 24-bit words of 8 codes), never a gather per value.
- Codes become floats by the exponent trick, never by an integer-to-float conversion (a low-throughput
  instruction on NVIDIA GPUs): with a 16-bit query, two codes spread into one 32-bit register and one OR
  make it two bfloat16 128 + code (or float16 1024 + code) values, whose offset's share of a dot product
  is subtracted once per row (`_split_fields`, `_code_values`); a float32 query's codes are
  (code | 0x4B000000) - 2^23, exact in float32.
- Scales and zero-points are applied where they are cheapest, per parameter layout (`_param_mode`):
  one parameter per slot (per-token groups spanning the head: QuaRot, ZipCache's values) is folded into
  the attention algebra, q.(c s + z) = s (q.c) + z sum(q) for keys and p (c s + z) = (p s) c + (p.z) for
  values, so the tile's codes go to the tensor cores as they are; per-channel keys whose rows span whole
  tiles (tiles are aligned to the rows) fold one scale row into the query, (q * s).c + q.z; rows shorter
  than a tile and per-token groups of a power-of-two width are loaded once per row or group and broadcast
  over the tile; any other layout (ZipCache's odd block sizes) reads each slot's parameter row.
- Numerics against the float32 reference: where a layout is folded, q * s or p * s is rounded to the
  query's dtype for the tensor cores instead of the dequantized key or value; where values are
  dequantized for a 16-bit query, c * s + z is one float16 multiply-add (the parameters are float16;
  11 significant bits) before the rounding to the query's dtype; float32 queries stay in float32.
- Each K/V tile is read once for all query heads of its KV head (GQA), as in `kvbench.kernels`.

Like `kvbench.kernels`, the attention is a `torch.library` operator (`kvbench::packed_decode_attention`):
Triton on CUDA tensors and under Triton's interpreter (`TRITON_INTERPRET=1`, the tests), the reference
elsewhere; static grids and no host syncs, so it runs in the compiled, graph-captured decode step.
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


def live_positions(lengths: torch.Tensor, slots: int, heads: int) -> torch.Tensor:
    """[B, Hkv, S] positions in `kvbench.kernels`' convention: the slot index where live, -1 where not."""
    s = torch.arange(slots, device=lengths.device)
    return s.masked_fill(s >= lengths.view(-1, 1), -1).view(-1, 1, slots).expand(-1, heads, slots)


def packed_decode_attention_reference(
    query: torch.Tensor, keys: PackedSlots, values: PackedSlots, lengths: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: dequantize every slot, then `kvbench.kernels.decode_attention_reference` over the live ones."""
    k, v = dequantize_slots(keys), dequantize_slots(values)
    positions = live_positions(lengths, k.shape[2], k.shape[1])
    return kernels.decode_attention_reference(query, k, v, positions, scale)


@dataclass(frozen=True)
class LaunchConfig:
    """How the split kernel is launched: slots per tile, warps and pipeline stages per program, and the
    flash-decoding split target (programs per SM when batch x KV heads alone would not fill the GPU)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # As `kvbench.kernels`: at ~150 registers a thread, about 3 programs of 4 warps fit on an SM, so 2 per
    # SM start in one wave (more would leave a partial second wave: a tail of idle SMs).
    programs_per_sm: int = 2


# The launch every call uses; `benchmarks/quant_attention.py --configs` times alternatives to this one.
LAUNCH = LaunchConfig()


def _split_plan(batch_heads: int, slots: int, num_sms: int, launch: LaunchConfig) -> tuple[int, int]:
    """(number of splits, slots per split): `kvbench.kernels._split_plan` with this kernel's tile and target."""
    tiles = max(1, -(-slots // launch.block_n))  # S = 0: one split, empty, so out = 0 and lse = -inf
    wanted = -(-launch.programs_per_sm * num_sms // batch_heads)
    tiles_per_split = -(-tiles // max(1, min(wanted, tiles, kernels.MAX_SPLITS)))
    return -(-tiles // tiles_per_split), tiles_per_split * launch.block_n


def _param_mode(packed: PackedSlots, dim: int, block_n: int, can_align: bool) -> str:
    """How the kernel applies a store's scales and zero-points (the module doc says why):
    "slot": one parameter per slot, folded into the dot products;
    "row": per-channel rows of a multiple of block_n slots, tiles aligned to them, one row folded per tile;
    "rows": per-channel rows of a power-of-two divisor of block_n slots, tiles aligned, each row broadcast;
    "columns": per-token groups of a power-of-two width, each group's parameter broadcast;
    "gather": anything else, every slot's row read for every value.
    Only keys align tiles to their rows (`can_align`), so per-channel values take "gather"."""
    rows, cols = packed.row_tokens, packed.col_channels
    if rows == 1 and cols >= dim:
        return "slot"
    if rows == 1 and cols & (cols - 1) == 0:
        return "columns"
    if can_align and cols == 1 and rows % block_n == 0:
        return "row"
    if can_align and cols == 1 and block_n % rows == 0:
        return "rows"
    return "gather"


if kernels.triton is not None:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

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
        [N, BLOCK_D // 2] pairs of them (`_split_fields`)."""
        if 8 % BITS == 0:  # whole codes per byte: one contiguous load of the rows' bytes
            offs = tl.arange(0, BLOCK_D * BITS // 8)
            # ROW_BYTES is a constant: for whole rows (the usual case) the column mask folds away.
            mask = live[:, None] & (offs < ROW_BYTES)[None, :]
            fields = tl.load(base + slots[:, None] * stride_s + offs[None, :] * stride_c, mask=mask, other=0).to(
                tl.int32
            )
            codes = _split_fields(fields, 8, BITS, PAIRS)
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
        if K_MODE == "row" or K_MODE == "rows":
            # Tiles start where key parameter rows do (lead + a multiple of BLOCK_N), so none straddles
            # two rows ("row") or a row boundary cuts it into whole rows ("rows"); the first may begin
            # before the split and the last reach past it, their outside slots masked.
            first = start - (start + BLOCK_N - k_lead % BLOCK_N) % BLOCK_N
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
        for tile in range(first, end, BLOCK_N):
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
            # The cast keeps the loop-carried maxima fp32 when the compiler passes the scale as fp64.
            logits = (logits * scale_log2).to(tl.float32)
            logits = tl.where(live[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp2 gives 0, not NaN
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(logits - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)

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
        out = torch.empty(b, hq, dv, dtype=query.dtype, device=query.device)
        lse = torch.empty(b, hq, dtype=torch.float32, device=query.device)
        upcast, precision = kernels._upcast_and_precision(query.dtype)
        key_mode = _param_mode(keys, d, launch.block_n, can_align=True)
        value_mode = _param_mode(values, dv, launch.block_n, can_align=False)
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
            K_PAIRS=half_dot and keys.bits < 8,
            V_BITS=values.bits,
            V_ROW_TOKENS=values.row_tokens,
            V_COL_CHANNELS=values.col_channels,
            V_MODE=value_mode,
            V_PAIRS=half_dot and values.bits < 8,
            BLOCK_G=kernels._dot_block(group),
            BLOCK_N=launch.block_n,
            BLOCK_D=kernels._dot_block(d),
            BLOCK_DV=kernels._dot_block(dv),
            UPCAST=upcast,
            PRECISION=precision,
            num_warps=launch.num_warps,
            num_stages=launch.num_stages,
        )
        wrap_triton(kernels._decode_combine_kernel)[(b * hq,)](
            o_part,
            lse_part,
            out,
            lse,
            num_splits,
            dv,
            *out.stride(),
            hq,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            COMBINE_BLOCK=kernels.COMBINE_BLOCK,
            BLOCK_DV=triton.next_power_of_2(dv),
            num_warps=kernels.NUM_WARPS,
        )
        return out, lse


@kernels._make_op("kvbench::packed_decode_attention")
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


def packed_decode_attention(
    query: torch.Tensor, keys: PackedSlots, values: PackedSlots, lengths: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence, query [B, Hq, D], over the live slots (slot < lengths[b]) of a
    packed store. Returns (out [B, Hq, Dv] in the query's dtype, lse [B, Hq] float32); no live slot gives
    out = 0 and lse = -inf, as `kvbench.kernels.decode_attention`."""
    b, hq, d = query.shape
    if keys.codes.shape[0] != b or hq % keys.codes.shape[1] or keys.codes.shape[-1] * 8 != d * keys.bits:
        raise ValueError(f"query {tuple(query.shape)} does not fit packed keys {tuple(keys.codes.shape)}")
    if keys.scale.stride() != keys.zero.stride() or values.scale.stride() != values.zero.stride():
        raise ValueError("scale and zero-point must share one layout")
    return torch.ops.kvbench.packed_decode_attention(
        query,
        *keys[:4],
        *values[:4],
        lengths,
        float(scale),
        list(keys[4:]),
        list(values[4:]),
    )

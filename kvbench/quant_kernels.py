"""Decode attention over packed (quantized) K/V slots: a Triton kernel for CUDA and its PyTorch reference.

The kernel is `kvbench.kernels`' flash-decoding split kernel with its K/V tile loads replaced: each program
reads the packed codes of its tiles (a 4-bit cache reads a quarter of bf16's bytes) plus their float16
scale and zero-point, and dequantizes in registers; the online softmax, the partial outputs and the combine
kernel that merges the splits are `kvbench.kernels`' own. It returns the same contract as
`kvbench.kernels.decode_attention`: (out [B, Hq, Dv] in the query's dtype, lse [B, Hq] float32), so a
layer merges it with attention over other slots (a full-precision window) through the log-sum-exp.

Slot layout (`PackedSlots`): slots [0, length[b]) of sequence b are live (quantized tokens fill a store
from its front; the order of tokens does not matter to attention, keys being stored post-RoPE). Codes are
[B, Hkv, S, D * bits / 8] uint8 (`kvbench.quant.pack`, one bit stream per slot). Scale and zero-point are
float16 [B, Hkv, R, C]: slot s uses parameter row 0 if s < lead[b], else row 1 + (s - lead[b]) //
row_tokens, and channel d uses column d // col_channels. This one rule covers per-token groups
(row_tokens = lead = 1, col_channels = group), per-channel groups of G tokens (row_tokens = lead = G,
col_channels = 1) and ZipCache's keys (one row for the whole prompt set, lead = its size, then one row per
decode block of row_tokens tokens).

Like `kvbench.kernels`, the attention is a `torch.library` operator (`kvbench::packed_decode_attention`):
Triton on CUDA tensors and under Triton's interpreter (`TRITON_INTERPRET=1`, the tests), the reference
elsewhere; static grids and no host syncs, so it runs in the compiled, graph-captured decode step.
"""

from __future__ import annotations

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


if kernels.triton is not None:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    @triton.jit
    def _load_dequantized(
        codes_ptr,
        scale_ptr,
        zero_ptr,
        slot,
        chan,
        mask,
        lead,
        row_bytes,
        stride_cs,
        stride_cc,
        stride_sr,
        stride_sc,
        BITS: tl.constexpr,
        ROW_TOKENS: tl.constexpr,
        COL_CHANNELS: tl.constexpr,
    ):
        """float32 values at (slot, chan), two index tensors that broadcast to the tile's shape."""
        bit = chan * BITS
        byte = bit // 8
        ptr = codes_ptr + slot * stride_cs + byte * stride_cc
        raw = tl.load(ptr, mask=mask, other=0).to(tl.int32)
        if 8 % BITS != 0:  # 3-bit codes may straddle two bytes: read the next one too
            nxt = tl.load(ptr + stride_cc, mask=mask & (byte + 1 < row_bytes), other=0).to(tl.int32)
            raw = raw | (nxt << 8)
        code = (raw >> (bit % 8)) & ((1 << BITS) - 1)
        row = tl.where(slot < lead, 0, 1 + (slot - lead) // ROW_TOKENS)
        params = row * stride_sr + (chan // COL_CHANNELS) * stride_sc
        scale = tl.load(scale_ptr + params, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + params, mask=mask, other=0.0).to(tl.float32)
        return code.to(tl.float32) * scale + zero

    @triton.jit
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
        head_dim,
        value_dim,
        k_row_bytes,
        v_row_bytes,
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
        K_BITS: tl.constexpr,
        K_ROW_TOKENS: tl.constexpr,
        K_COL_CHANNELS: tl.constexpr,
        V_BITS: tl.constexpr,
        V_ROW_TOKENS: tl.constexpr,
        V_COL_CHANNELS: tl.constexpr,
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
        d_ok = offs_d < head_dim
        dv_ok = offs_dv < value_dim
        heads = h * group + offs_g

        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        kc_base = kc_ptr + b * stride_kcb + h * stride_kch
        ks_base = ks_ptr + b * stride_ksb + h * stride_ksh
        kz_base = kz_ptr + b * stride_ksb + h * stride_ksh
        vc_base = vc_ptr + b * stride_vcb + h * stride_vch
        vs_base = vs_ptr + b * stride_vsb + h * stride_vsh
        vz_base = vz_ptr + b * stride_vsb + h * stride_vsh
        k_lead = tl.load(k_lead_ptr + b)
        v_lead = tl.load(v_lead_ptr + b)
        length = tl.load(len_ptr + b)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        for n0 in range(start, end, BLOCK_N):
            slots = n0 + offs_n
            live = slots < end
            # K transposed, [D, N], so the logits are one q @ kT.
            kt = _load_dequantized(
                kc_base,
                ks_base,
                kz_base,
                slots[None, :],
                offs_d[:, None],
                live[None, :] & d_ok[:, None],
                k_lead,
                k_row_bytes,
                stride_kcs,
                stride_kcc,
                stride_ksr,
                stride_ksc,
                K_BITS,
                K_ROW_TOKENS,
                K_COL_CHANNELS,
            )
            v = _load_dequantized(
                vc_base,
                vs_base,
                vz_base,
                slots[:, None],
                offs_dv[None, :],
                live[:, None] & dv_ok[None, :],
                v_lead,
                v_row_bytes,
                stride_vcs,
                stride_vcc,
                stride_vsr,
                stride_vsc,
                V_BITS,
                V_ROW_TOKENS,
                V_COL_CHANNELS,
            )
            if not UPCAST:  # the tensor cores' input type: the query's
                kt = kt.to(q.dtype)
                v = v.to(q.dtype)
            logits = (tl.dot(q, kt, input_precision=PRECISION) * scale_log2).to(tl.float32)
            logits = tl.where(live[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp2 gives 0, not NaN
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(logits - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        any_live = l_i > 0.0
        out = acc / tl.where(any_live, l_i, 1.0)[:, None]
        lse2 = tl.where(any_live, m_i + tl.log2(tl.where(any_live, l_i, 1.0)), float("-inf"))
        rows = (b * num_kv_heads * group + heads) * num_splits + split  # kvbench.kernels' partial layout
        tl.store(o_part_ptr + rows[:, None] * value_dim + offs_dv[None, :], out, mask=g_ok[:, None] & dv_ok[None, :])
        tl.store(lse_part_ptr + rows, lse2, mask=g_ok)

    def _packed_attention_triton(
        query: torch.Tensor, keys: PackedSlots, values: PackedSlots, lengths: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, hq, d = query.shape
        hkv, s = keys.codes.shape[1], keys.codes.shape[2]
        dv = values.codes.shape[-1] * 8 // values.bits
        group = hq // hkv
        num_splits, split_len = kernels._split_plan(b * hkv, s, kernels._num_sms(query.device))
        o_part = torch.empty(b * hq, num_splits, dv, dtype=torch.float32, device=query.device)
        lse_part = torch.empty(b * hq, num_splits, dtype=torch.float32, device=query.device)
        out = torch.empty(b, hq, dv, dtype=query.dtype, device=query.device)
        lse = torch.empty(b, hq, dtype=torch.float32, device=query.device)
        upcast, precision = kernels._upcast_and_precision(query.dtype)
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
            d,
            dv,
            keys.codes.shape[-1],
            values.codes.shape[-1],
            split_len,
            num_splits,
            *query.stride(),
            *keys.codes.stride(),
            *keys.scale.stride(),
            *values.codes.stride(),
            *values.scale.stride(),
            K_BITS=keys.bits,
            K_ROW_TOKENS=keys.row_tokens,
            K_COL_CHANNELS=keys.col_channels,
            V_BITS=values.bits,
            V_ROW_TOKENS=values.row_tokens,
            V_COL_CHANNELS=values.col_channels,
            BLOCK_G=kernels._dot_block(group),
            BLOCK_N=kernels.BLOCK_N,
            BLOCK_D=kernels._dot_block(d),
            BLOCK_DV=kernels._dot_block(dv),
            UPCAST=upcast,
            PRECISION=precision,
            num_warps=kernels.NUM_WARPS,
            num_stages=kernels.NUM_STAGES,
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
        return _packed_attention_triton(query, keys, values, lengths, scale)
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

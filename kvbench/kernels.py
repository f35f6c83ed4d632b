"""Decode attention over a fixed-size slot buffer, and prefill's attention scores: Triton kernels for CUDA,
PyTorch references elsewhere.

The compiled decode step attends one new query per sequence over `S` slots, some empty or evicted
(positions < 0). SDPA with a boolean mask and `enable_gqa` leaves the fast kernels on CUDA, and expanding
KV heads (transformers' `repeat_kv`) multiplies the bytes read, so `decode_attention` is flash-decoding
(Dao et al., "Flash-Decoding for long-context inference", 2023): the slots are split into chunks across
programs, each program reads its chunk's K/V tiles once for all G query heads of its KV head (GQA is
never expanded), keeps an online softmax in float32, and a second small kernel combines the chunks
through their log-sum-exp. `received_attention` recomputes, from that log-sum-exp, the probability each
slot received (what H2O and Scissorhands accumulate) without materialising the [B, Hq, S] matrix.

`received_attention_prefill` is the same score for a chunk of T causal prefill queries [B, Hq, T, D] (the
last T of the S positions in the keys): the probability each key receives, summed over the chunk's queries
and each KV head's G query heads. It takes two passes, as a flash-attention backward does, because each
query's softmax needs its whole row's log-sum-exp before any of its probabilities can join a key's sum: the
first kernel computes each (query, head) row's log-sum-exp online over the K tiles the row sees, the second
recomputes the logits tile by tile and sums exp(logit - lse) down each key's column. Cost: Q·K^T twice, in
tensor-core dots, and [B, Hq, T] floats of log-sum-exp written and read back; no probability matrix (the
PyTorch reference writes and re-reads float32 blocks of [B, Hq, 64, S]).

All three are `torch.library` operators (`kvbench::decode_attention`, `kvbench::received_attention`,
`kvbench::received_attention_prefill`), so `torch.compile(fullgraph=True)` traces them without graph breaks;
their launches have static grids and no host syncs, so they can be captured in CUDA graphs (keep `scale` a
per-model constant: dynamo turns a float argument that changes between calls into a graph input read back
with .item()). Triton runs on CUDA tensors, and on any tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, which the tests use); everywhere else, and when Triton is not installed, the
operators run the PyTorch references.

Conventions: query [B, Hq, D] (prefill: [B, Hq, T, D]); keys [B, Hkv, S, D]; values [B, Hkv, S, Dv];
positions [B, Hkv, S] (any integer dtype, a slot is live iff its position >= 0); Hq = G * Hkv, and query
head `h * G + g` belongs to KV head `h` (transformers' `repeat_kv` order). A sequence/KV head with no live
slot gets out = 0 and lse = -inf, and its slots receive 0.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: the operators run the references
    triton = None

LOG2E = math.log2(math.e)
BLOCK_N = 64  # slots per K/V tile
# The combine kernel: a program takes COMBINE_CHANNELS of one row's value channels and reads at most
# COMBINE_ELEMENTS partial outputs at a time (8,192 floats: 64 a thread at 4 warps); where it rotates QuaRot's
# outputs back it takes the whole row, ROTATED_COMBINE_BLOCK splits a pass. Offline (sm_90, Triton 3.6, 4
# warps) the rotated program at 128 channels takes 150 registers at 32 splits a pass and spills at 64.
COMBINE_CHANNELS = 32
COMBINE_ELEMENTS = 8192
ROTATED_COMBINE_BLOCK = 32
MAX_SPLITS = 256
# Flash-decoding's split target: programs per SM while batch x KV heads alone would not fill the GPU. Measured
# on an H200 at 32k (benchmarks/decode_parts.py): 4 beats 2 up to 32 (sequence, KV head) pairs (GQA batch 1:
# 43.4 -> 40.6 us; GQA batch 4: 140 -> 131; MHA batch 1: 141 -> 129), 2 beats 4 at 128 (MHA batch 4: 611 ->
# 483 us: 5 splits a head overfill the SMs, 3 do not).
PROGRAMS_PER_SM = 4
PROGRAMS_PER_SM_MANY_HEADS = 2  # above FEW_HEADS (sequence, KV head) pairs
FEW_HEADS = 64
NUM_WARPS = 4
NUM_STAGES = 2  # double-buffered K/V tile loads; the kernel is bound by memory bandwidth
# Prefill scoring (`received_attention_prefill`): tiles of PREFILL_ROWS (query, head) rows by PREFILL_KEYS keys.
# The log-sum-exp kernel holds a row tile and streams K tiles, a flash-attention forward's shape (PREFILL_LSE_WARPS:
# two warpgroups of 64 rows); the column-sum kernel holds a K tile and streams row tiles in one warpgroup
# (NUM_WARPS) whose MMA rows are the keys, so each key's sum over the rows stays inside its warp. Offline (sm_90,
# Triton 3.7, head dim 128, 16-bit inputs, specialised as launched) they take 79 and 140 registers, no spills.
PREFILL_ROWS = 128
PREFILL_KEYS = 64
PREFILL_LSE_WARPS = 8


def compile_caches_off() -> None:
    """Turn torch.compile's caches off for this process. AOTAutograd's cache keys a graph on Dynamo's graph,
    where each kvbench operator is one opaque node, not on the Python inside it that chose its kernels'
    launch (this module's `BLOCK_N`, `quant_kernels.LAUNCH`), so from a warm cache directory a graph compiled
    under one launch is replayed under another. Seen on an H100: ZipCache's step (32k, batch 4) compiled under
    a one-warp launch, then run under the default launch in the same cache directory, replayed the one-warp
    graph (4.7 s to compile, 10.71 ms a step, against 9.55 ms in a directory of its own). Inductor's FX graph
    cache hashes the kernels' source and constants and would not; the switches below (`force_disable_caches`
    first: environment variables can force the others on) turn every cache off all the same, and Dynamo's
    precompile cache where it exists. A process that changes such a setting and then compiles calls this."""
    import torch._dynamo.config
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    # torch.compiler.config's switch (Inductor's is an alias of it where both exist)
    config = getattr(torch.compiler, "config", torch._inductor.config)
    if hasattr(config, "force_disable_caches"):
        config.force_disable_caches = True
    if hasattr(torch._dynamo.config, "caching_precompile"):
        torch._dynamo.config.caching_precompile = False


def decode_attention_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: float32 math, KV heads broadcast over their query-head group by einsum (never copied).

    Returns (out [B, Hq, Dv] in the query's dtype, lse [B, Hq] float32).
    """
    b, hq, d = query.shape
    hkv = keys.shape[1]
    q = query.float().view(b, hkv, hq // hkv, d)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.float()) * scale
    live = (as_positions(positions, keys) >= 0).unsqueeze(2)
    logits = logits.masked_fill(~live, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where no slot is live
    # exp(-inf - -inf) would be NaN on a sequence with no live slot; its probabilities are all 0 instead.
    probs = torch.where(live, torch.exp(logits - lse.nan_to_num(neginf=0.0).unsqueeze(-1)), 0.0)
    out = torch.einsum("bhgs,bhsv->bhgv", probs, values.float())
    return out.reshape(b, hq, values.shape[-1]).to(query.dtype), lse.reshape(b, hq)


def received_attention_reference(
    query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float, lse: torch.Tensor
) -> torch.Tensor:
    """The oracle: exp(q·k·scale − lse) on live slots, 0 on empty ones, summed over each KV head's G query
    heads; float32 [B, Hkv, S]."""
    b, hq, d = query.shape
    hkv = keys.shape[1]
    q = query.float().view(b, hkv, hq // hkv, d)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.float()) * scale
    probs = torch.exp(logits - lse.float().view(b, hkv, hq // hkv, 1))
    return torch.where((positions >= 0).unsqueeze(2), probs, 0.0).sum(dim=2)


def received_attention_prefill_reference(
    query: torch.Tensor, keys: torch.Tensor, scale: float, query_block: int = 64
) -> torch.Tensor:
    """The oracle: float32 softmax of each prefill query over the keys it sees, summed over the queries and
    each KV head's G query heads; float32 [B, Hkv, S]. Queries go in blocks of `query_block`, so at most
    [B, Hq, query_block, S] probabilities exist at once (never the chunk's whole [T, S] matrix: at 32k keys a
    512-query chunk would be 2 GiB per layer for an 8B model)."""
    b, hq, t, d = query.shape
    hkv, s = keys.shape[1], keys.shape[2]
    k = keys.float()
    received = torch.zeros(b, hkv, s, dtype=torch.float32, device=keys.device)
    for start in range(0, t, query_block):
        q = query[:, :, start : start + query_block].float()
        rows = q.shape[2]
        q = q.view(b, hkv, hq // hkv, rows, d)
        logits = torch.einsum("bhgtd,bhsd->bhgts", q, k) * scale
        # Query i of the chunk sits at position s - t + start + i and sees keys up to that position.
        visible = torch.ones(rows, s, dtype=torch.bool, device=keys.device).tril(s - t + start)
        received += logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).sum(dim=(2, 3))
    return received


def positions_from_lengths(lengths: torch.Tensor, slots: int, heads: int) -> torch.Tensor:
    """[B, heads, slots] positions for each sequence's live length [B]: the slot index below it, -1 from it on."""
    s = torch.arange(slots, device=lengths.device)
    return s.masked_fill(s >= lengths.view(-1, 1), -1).view(-1, 1, slots).expand(-1, heads, slots)


def as_positions(live: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Slot positions [B, Hkv, S] from either form `decode_attention` takes: positions themselves, or each
    sequence's live length [B]."""
    return live if live.dim() != 1 else positions_from_lengths(live, keys.shape[2], keys.shape[1])


def _check_shapes(query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> None:
    b, hq, d = query.shape
    bk, hkv, s, dk = keys.shape
    if bk != b or dk != d or hq % hkv != 0:
        raise ValueError(f"query {tuple(query.shape)} does not fit keys {tuple(keys.shape)}")
    if tuple(positions.shape) not in ((b, hkv, s), (b,)):
        raise ValueError(f"positions {tuple(positions.shape)} should be {(b, hkv, s)}, or lengths {(b,)}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_plan(batch_heads: int, seq_len: int, num_sms: int) -> tuple[int, int]:
    """(number of splits, slots per split), splits a multiple of BLOCK_N slots and none of them empty.

    Flash-decoding's point: at batch 1 the B x Hkv programs alone would occupy a few of the SMs, so the
    sequence is split until there are about PROGRAMS_PER_SM programs per SM (fewer once the pairs are many:
    more splits only add combine work and a partial last wave).
    """
    tiles = max(1, _cdiv(seq_len, BLOCK_N))  # S = 0: one split, empty, so out = 0 and lse = -inf
    per_sm = PROGRAMS_PER_SM if batch_heads <= FEW_HEADS else PROGRAMS_PER_SM_MANY_HEADS
    wanted = _cdiv(per_sm * num_sms, batch_heads)
    tiles_per_split = _cdiv(tiles, max(1, min(wanted, tiles, MAX_SPLITS)))
    return _cdiv(tiles, tiles_per_split), tiles_per_split * BLOCK_N


if triton is not None:

    def _dot_block(n: int) -> int:
        """Tile sizes are powers of two, and tl.dot's reduction dimension must be at least 16; the group is
        padded to 16 as well, the row count of one tensor-core MMA. Padded lanes are masked. (The plane
        kernel holds only the group's rows, `plane_kernel.query_block`; the dense decode kernel timed no
        faster that way: benchmarks/README.md, "The plane kernel's query rows".)"""
        return max(16, triton.next_power_of_2(n))

    @functools.lru_cache
    def _num_sms(device: torch.device) -> int:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
        # Only Triton's interpreter launches on other devices; a small count keeps several tiles per split
        # there, so the tests cover both the in-split loop and the cross-split combine.
        return 4

    @triton.jit
    def _online_softmax(logits, live, m_i, l_i, scale_log2):
        """One tile of the online softmax, logits in log2 units (scale_log2 = scale·log2 e): (p, alpha, m_new,
        l_new) from the tile's raw logits [G, N] and the running maxima m_i and sums l_i [G]."""
        # The cast keeps the loop-carried maxima fp32 when the compiler passes the scale as fp64.
        logits = (logits * scale_log2).to(tl.float32)
        logits = tl.where(live[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        # While every slot seen so far is empty m_new is -inf; subtracting 0 instead keeps exp2 at 0 rather
        # than exp2(-inf - -inf) = NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(logits - m_ref[:, None])
        return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)

    @triton.jit
    def _decode_split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        o_part_ptr,
        lse_part_ptr,
        scale_log2,
        seq_len,
        num_kv_heads,
        group,
        split_len,
        num_splits,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_vd,
        stride_pb,
        stride_ph,
        stride_ps,
        HEAD_DIM: tl.constexpr,
        VALUE_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        PREFIX: tl.constexpr,
    ):
        """One (sequence, KV head, split): softmax-weighted values of the split's live slots for the G query
        heads, normalised, plus their log2-sum-exp (-inf when none is live). Logits are in log2 units
        (scale_log2 = scale·log2 e) so the exponentials are exp2. PREFIX: pos_ptr holds each sequence's
        length, the slots below it live; else positions, live where >= 0."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        # int64 offsets: b * stride_kb overflows int32 beyond 2^31 cached elements
        b = (bh // num_kv_heads).to(tl.int64)
        h = (bh % num_kv_heads).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        g_ok = offs_g < group
        # Constant masks when a tile spans the whole head (the usual case), so K/V rows load in wide vectors.
        d_ok = offs_d < HEAD_DIM
        dv_ok = offs_dv < VALUE_DIM
        heads = h * group + offs_g  # the query heads of KV head h, in repeat_kv order

        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        p_base = pos_ptr + b * stride_pb + h * stride_ph

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)
        if PREFIX:  # tiles past the length hold nothing: not read at all
            end = tl.minimum(end, tl.load(pos_ptr + b * stride_pb).to(tl.int32))
        for n0 in range(start, end, BLOCK_N):
            slots = n0 + offs_n
            in_split = slots < end
            if PREFIX:  # noqa: SIM108 (a constexpr branch: the positions' load is not even compiled)
                live = in_split
            else:
                live = tl.load(p_base + slots * stride_ps, mask=in_split, other=-1) >= 0
            # K is loaded transposed, [D, N], so the logits are one q @ kT.
            kt = tl.load(
                k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                mask=in_split[None, :] & d_ok[:, None],
                other=0.0,
            )
            v = tl.load(
                v_base + slots[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                mask=in_split[:, None] & dv_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            p, alpha, m_new, l_i = _online_softmax(tl.dot(q, kt, input_precision=PRECISION), live, m_i, l_i, scale_log2)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        any_live = l_i > 0.0
        out = acc / tl.where(any_live, l_i, 1.0)[:, None]
        lse2 = tl.where(any_live, m_i + tl.log2(tl.where(any_live, l_i, 1.0)), float("-inf"))
        rows = (b * num_kv_heads * group + heads) * num_splits + split  # partials are [B*Hq, splits, ...]
        tl.store(o_part_ptr + rows[:, None] * VALUE_DIM + offs_dv[None, :], out, mask=g_ok[:, None] & dv_ok[None, :])
        tl.store(lse_part_ptr + rows, lse2, mask=g_ok)

    @triton.jit
    def _decode_combine_kernel(
        o_part_ptr,
        lse_part_ptr,
        out_ptr,
        lse_ptr,
        num_splits,
        value_dim,
        stride_ob,
        stride_oh,
        stride_od,
        num_q_heads,
        rotation_ptr,
        rotation_scale,
        scale_ptr,
        stride_sb,
        stride_sh,
        group,
        BLOCK_SPLITS: tl.constexpr,
        COMBINE_BLOCK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        ROTATE: tl.constexpr,
        SCALE: tl.constexpr,
    ):
        """One (sequence, query head) and BLOCK_DV of its value channels (program_id 1 picks which): the
        splits' outputs weighted by exp2(lse2_split - lse2_total); with ROTATE (BLOCK_DV then covers the whole
        row), multiplied by the [Dv, Dv] matrix at rotation_ptr times rotation_scale (a +-1 Hadamard matrix and
        1 / sqrt(Dv): attention computed in QuaRot's rotated basis, rotated back), in float32; with SCALE, each
        channel then multiplied by its scale at scale_ptr (per sequence and KV head, `group` query heads a KV
        head: ZipCache's channel scales, its values stored divided by them), in float32.

        The combine is latency-bound (at most 32 KiB of partials a program): when COMBINE_BLOCK covers every
        split, the weights come from the log-sum-exps already loaded and the outputs arrive in one load, in
        flight with theirs."""
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        b = row // num_q_heads
        hq = row % num_q_heads
        offs_s = tl.arange(0, BLOCK_SPLITS)
        lse2 = tl.load(lse_part_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        m = tl.max(lse2, axis=0)
        m_ref = tl.where(m == float("-inf"), 0.0, m)  # no live slot in any split: all weights 0, not NaN
        total = tl.sum(tl.exp2(lse2 - m_ref), axis=0)

        offs_dv = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < value_dim
        if COMBINE_BLOCK >= BLOCK_SPLITS:
            o = tl.load(
                o_part_ptr + (row * num_splits + offs_s)[:, None] * value_dim + offs_dv[None, :],
                mask=(offs_s < num_splits)[:, None] & dv_ok[None, :],
                other=0.0,
            )
            acc = tl.sum(tl.exp2(lse2 - m_ref)[:, None] * o, axis=0)
        else:
            offs_c = tl.arange(0, COMBINE_BLOCK)
            acc = tl.zeros([BLOCK_DV], tl.float32)
            for s0 in range(0, num_splits, COMBINE_BLOCK):
                splits = s0 + offs_c
                s_ok = splits < num_splits
                lse_c = tl.load(lse_part_ptr + row * num_splits + splits, mask=s_ok, other=float("-inf"))
                o = tl.load(
                    o_part_ptr + (row * num_splits + splits)[:, None] * value_dim + offs_dv[None, :],
                    mask=s_ok[:, None] & dv_ok[None, :],
                    other=0.0,
                )
                acc += tl.sum(tl.exp2(lse_c - m_ref)[:, None] * o, axis=0)

        any_live = total > 0.0
        out = acc / tl.where(any_live, total, 1.0)
        if ROTATE:  # out @ R * scale: a [Dv, Dv] product per head, a few multiply-adds per thread
            rotation = tl.load(
                rotation_ptr + offs_dv[:, None] * value_dim + offs_dv[None, :],
                mask=dv_ok[:, None] & dv_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            out = tl.sum(out[:, None] * rotation, axis=0) * rotation_scale
        if SCALE:
            channel_scale = tl.load(scale_ptr + b * stride_sb + (hq // group) * stride_sh + offs_dv, mask=dv_ok)
            out = out * channel_scale.to(tl.float32)
        tl.store(
            out_ptr + b * stride_ob + hq * stride_oh + offs_dv * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=dv_ok,
        )
        # back from log2 to natural-log units: times ln 2
        lse = tl.where(any_live, (m_ref + tl.log2(tl.where(any_live, total, 1.0))) * 0.6931471805599453, float("-inf"))
        if chunk == 0:
            tl.store(lse_ptr + row, lse)

    @triton.jit
    def _received_kernel(
        q_ptr,
        k_ptr,
        pos_ptr,
        lse_ptr,
        out_ptr,
        scale_log2,
        seq_len,
        num_kv_heads,
        group,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_kd,
        stride_pb,
        stride_ph,
        stride_ps,
        stride_lb,
        stride_lh,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One (sequence, KV head, tile of slots): sum over the G query heads of exp2(logit2 - lse2)."""
        bh = tl.program_id(0)
        tile = tl.program_id(1)
        # int64 offsets: b * stride_kb overflows int32 beyond 2^31 cached elements
        b = (bh // num_kv_heads).to(tl.int64)
        h = (bh % num_kv_heads).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        slots = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        g_ok = offs_g < group
        d_ok = offs_d < HEAD_DIM
        in_seq = slots < seq_len
        heads = h * group + offs_g

        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        kt = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
            mask=in_seq[None, :] & d_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        # lse is natural-log; times log2 e to meet the exp2 logits. Padded heads get +inf, hence p = 0.
        lse2 = tl.load(lse_ptr + b * stride_lb + heads * stride_lh, mask=g_ok, other=float("inf")) * 1.4426950408889634
        live = tl.load(pos_ptr + b * stride_pb + h * stride_ph + slots * stride_ps, mask=in_seq, other=-1) >= 0
        p = tl.exp2((tl.dot(q, kt, input_precision=PRECISION) * scale_log2).to(tl.float32) - lse2[:, None])
        # where, not a product: a KV head with no live slot has lse = -inf and p = inf on its (empty) slots.
        p = tl.where(live[None, :] & g_ok[:, None], p, 0.0)
        tl.store(out_ptr + (b * num_kv_heads + h) * seq_len + slots, tl.sum(p, axis=0), mask=in_seq)

    @triton.jit
    def _prefill_lse_step(
        q,
        k_base,
        n0,
        seq_len,
        last_key,
        m_i,
        l_i,
        scale_log2,
        stride_ks,
        stride_kd,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        CAUSAL: tl.constexpr,
    ):
        """One K tile (keys n0 ..) of the online log2-sum-exp: the running maxima m_i and sums l_i [M] of
        the rows q [M, D] updated. CAUSAL: the tile crosses some row's last visible key (last_key [M]), or the
        sequence's end; else every row sees all of it and no mask is built."""
        keys = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kt_mask = offs_d[:, None] < HEAD_DIM
        if CAUSAL:
            kt_mask = kt_mask & (keys < seq_len)[None, :]
        kt = tl.load(k_base + keys[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=kt_mask, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        logits = (tl.dot(q, kt, input_precision=PRECISION) * scale_log2).to(tl.float32)
        if CAUSAL:
            logits = tl.where(keys[None, :] <= last_key[:, None], logits, float("-inf"))
        # Never -inf - -inf: every row sees key 0, in the first tile, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_new = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(logits - m_new[:, None]), axis=1)
        return m_new, l_new

    @triton.jit
    def _prefill_lse_kernel(
        q_ptr,
        k_ptr,
        lse2_ptr,
        scale_log2,
        num_queries,
        seq_len,
        num_kv_heads,
        group,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_kd,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Prefill scoring's first pass. One (sequence, KV head, tile of BLOCK_M rows): each row's log2-sum-exp
        of its scaled logits over the keys its query sees, which the second pass (`_prefill_received_kernel`)
        needs before it can add any of the row's probabilities to a key's sum. A row is a (query, head of the
        group) pair, query-major (row r: query r // G, head h * G + r % G), so the G heads of a query share a
        tile and each K tile is loaded once for all of them; lse2 [B, Hkv, T * G] holds the rows in that
        order. Query t sits at position S - T + t and sees keys 0 .. S - T + t: the key tiles past the tile's
        last query are never read, and only those past its first query's are masked."""
        bh = tl.program_id(0)
        # The last queries see the most keys: their tiles start first, so the short ones fill the tail.
        tile = tl.num_programs(1) - 1 - tl.program_id(1)
        # int64 offsets: b * stride_kb overflows int32 beyond 2^31 cached elements
        b = (bh // num_kv_heads).to(tl.int64)
        h = (bh % num_kv_heads).to(tl.int64)
        num_rows = num_queries * group
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        # Rows past the last repeat the last query: read in bounds, computed, never stored.
        t = tl.minimum(rows // group, num_queries - 1)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(
            q_ptr
            + b * stride_qb
            + (h * group + rows % group)[:, None] * stride_qh
            + t[:, None] * stride_qt
            + offs_d[None, :] * stride_qd,
            mask=offs_d[None, :] < HEAD_DIM,
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        offset = seq_len - num_queries  # the chunk's first query's position
        last_key = offset + t
        # Keys below the tile's first query's position (in whole tiles) are seen by every row: no mask.
        unmasked_end = (offset + (tile * BLOCK_M) // group + 1) // BLOCK_N * BLOCK_N
        end = offset + tl.minimum(((tile + 1) * BLOCK_M - 1) // group, num_queries - 1) + 1
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, unmasked_end, BLOCK_N):
            m_i, l_i = _prefill_lse_step(
                q, k_base, n0, seq_len, last_key, m_i, l_i, scale_log2, stride_ks, stride_kd,
                HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST, PRECISION, False,
            )  # fmt: skip
        for n0 in range(unmasked_end, end, BLOCK_N):
            m_i, l_i = _prefill_lse_step(
                q, k_base, n0, seq_len, last_key, m_i, l_i, scale_log2, stride_ks, stride_kd,
                HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST, PRECISION, True,
            )  # fmt: skip
        tl.store(lse2_ptr + bh.to(tl.int64) * num_rows + rows, m_i + tl.log2(l_i), mask=rows < num_rows)

    @triton.jit
    def _prefill_received_step(
        k,
        q_base,
        lse2_base,
        r0,
        keys,
        offset,
        num_queries,
        group,
        scale_log2,
        stride_qh,
        stride_qt,
        stride_qd,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        CAUSAL: tl.constexpr,
    ):
        """The probabilities the keys of k [N, D] receive from rows r0 .. r0 + BLOCK_M (`_prefill_lse_kernel`'s
        rows), summed over those rows: [N] float32. CAUSAL: some row does not see every key of the tile."""
        rows = r0 + tl.arange(0, BLOCK_M)
        t = tl.minimum(rows // group, num_queries - 1)  # rows past the last: in bounds, and p = 0 below
        offs_d = tl.arange(0, BLOCK_D)
        # Q transposed, [D, M]: the logits come out [N, M], a key per row, so the sum over the queries stays
        # within each warp's rows.
        qt = tl.load(
            q_base + (rows % group)[None, :] * stride_qh + t[None, :] * stride_qt + offs_d[:, None] * stride_qd,
            mask=offs_d[:, None] < HEAD_DIM,
            other=0.0,
        )
        if UPCAST:
            qt = qt.to(tl.float32)
        # Rows past the last get lse2 = +inf, hence p = exp2(-inf) = 0.
        lse2 = tl.load(lse2_base + rows, mask=rows < num_queries * group, other=float("inf"))
        p = tl.exp2((tl.dot(k, qt, input_precision=PRECISION) * scale_log2).to(tl.float32) - lse2[None, :])
        if CAUSAL:
            p = tl.where(keys[:, None] <= (offset + t)[None, :], p, 0.0)
        return tl.sum(p, axis=1)

    @triton.jit
    def _prefill_received_kernel(
        q_ptr,
        k_ptr,
        lse2_ptr,
        out_ptr,
        scale_log2,
        num_queries,
        seq_len,
        num_kv_heads,
        group,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_kd,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Prefill scoring's second pass. One (sequence, KV head, tile of BLOCK_N keys): the probability
        exp2(logit2 - lse2) each key receives, its logits recomputed in tensor-core dots and its lse2 the first
        pass's, summed over every (query, head) row that sees it, in float32, stored once. The K tile is
        loaded once; the row tiles before the first query that sees the tile's first key are skipped, and
        only those before the first query that sees its last key are masked. Keys past the sequence load as
        0 and their sums are not stored."""
        bh = tl.program_id(0)
        tile = tl.program_id(1)
        # int64 offsets: b * stride_kb overflows int32 beyond 2^31 cached elements
        b = (bh // num_kv_heads).to(tl.int64)
        h = (bh % num_kv_heads).to(tl.int64)
        keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + keys[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            mask=(keys < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        q_base = q_ptr + b * stride_qb + h * group * stride_qh
        num_rows = num_queries * group
        lse2_base = lse2_ptr + bh.to(tl.int64) * num_rows
        offset = seq_len - num_queries  # the chunk's first query's position
        # Query t sees key j iff j <= offset + t: the first query seeing the tile's first key, and the first
        # seeing its last (at most T: then no row sees the whole tile).
        first_query = tl.maximum(tile * BLOCK_N - offset, 0)
        whole_query = tl.minimum(tl.maximum(tile * BLOCK_N + BLOCK_N - 1 - offset, 0), num_queries)
        masked_start = first_query * group // BLOCK_M * BLOCK_M
        unmasked_start = tl.cdiv(whole_query * group, BLOCK_M) * BLOCK_M
        acc = tl.zeros([BLOCK_N], tl.float32)
        for r0 in range(masked_start, unmasked_start, BLOCK_M):
            acc += _prefill_received_step(
                k, q_base, lse2_base, r0, keys, offset, num_queries, group, scale_log2, stride_qh, stride_qt,
                stride_qd, HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST, PRECISION, True,
            )  # fmt: skip
        for r0 in range(unmasked_start, num_rows, BLOCK_M):
            acc += _prefill_received_step(
                k, q_base, lse2_base, r0, keys, offset, num_queries, group, scale_log2, stride_qh, stride_qt,
                stride_qd, HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST, PRECISION, False,
            )  # fmt: skip
        tl.store(out_ptr + bh.to(tl.int64) * seq_len + keys, acc, mask=keys < seq_len)

    def _upcast_and_precision(dtype: torch.dtype) -> tuple[bool, str]:
        """(UPCAST, PRECISION): float32 inputs get IEEE dots (TF32 would miss 1e-4). Triton 3.7's interpreter
        miscomputes bfloat16 tl.dot, so there bfloat16 tiles go to float32 first; float16 keeps the GPU path."""
        upcast = _INTERPRETED and dtype == torch.bfloat16
        return upcast, "ieee" if dtype == torch.float32 or upcast else "tf32"

    def _decode_attention_triton(
        query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, hq, d = query.shape
        hkv, s = keys.shape[1], keys.shape[2]
        dv = values.shape[-1]
        group = hq // hkv
        num_splits, split_len = _split_plan(b * hkv, s, _num_sms(query.device))
        o_part = torch.empty(b * hq, num_splits, dv, dtype=torch.float32, device=query.device)
        lse_part = torch.empty(b * hq, num_splits, dtype=torch.float32, device=query.device)
        upcast, precision = _upcast_and_precision(keys.dtype)
        wrap_triton(_decode_split_kernel)[(b * hkv, num_splits)](
            query,
            keys,
            values,
            positions,
            o_part,
            lse_part,
            scale * LOG2E,
            s,
            hkv,
            group,
            split_len,
            num_splits,
            *query.stride(),
            *keys.stride(),
            *values.stride(),
            *(positions.stride() if positions.dim() == 3 else (positions.stride(0), 0, 0)),  # lengths: one a sequence
            HEAD_DIM=d,
            VALUE_DIM=dv,
            BLOCK_G=_dot_block(group),
            BLOCK_N=BLOCK_N,
            BLOCK_D=_dot_block(d),
            BLOCK_DV=_dot_block(dv),
            UPCAST=upcast,
            PRECISION=precision,
            PREFIX=positions.dim() == 1,
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
        )
        return _combine_splits(o_part, lse_part, b, hq, query.dtype)

    def _combine_splits(
        o_part: torch.Tensor,
        lse_part: torch.Tensor,
        b: int,
        hq: int,
        dtype: torch.dtype,
        rotation: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The combine kernel: the splits' partial outputs [B * Hq, splits, Dv] (normalised) and log2-sum-exps
        [B * Hq, splits] into (out [B, Hq, Dv] in dtype, lse [B, Hq] float32); with `rotation` (a [Dv, Dv]
        matrix of +-1, contiguous), out is multiplied by rotation / sqrt(Dv), then with `out_scale` ([B, Hkv,
        Dv], channels contiguous) by each channel's scale, before it is rounded to dtype."""
        dv = o_part.shape[2]
        out = torch.empty(b, hq, dv, dtype=dtype, device=o_part.device)
        lse = torch.empty(b, hq, dtype=torch.float32, device=o_part.device)
        _launch_combine(o_part, lse_part, out, lse, rotation, out_scale)
        return out, lse

    def _combine_blocks(num_splits: int, dv: int, rotated: bool) -> dict[str, int]:
        """The combine kernel's tile sizes. The rotation needs a row's channels in one program; otherwise they
        are split between programs so that every split's outputs fit one load of at most COMBINE_ELEMENTS.
        Rotated, passes of ROTATED_COMBINE_BLOCK splits leave registers for the [Dv, Dv] matrix."""
        block_splits = triton.next_power_of_2(num_splits)
        if rotated:
            block_dv = triton.next_power_of_2(dv)
            return {"BLOCK_SPLITS": block_splits, "COMBINE_BLOCK": min(block_splits, ROTATED_COMBINE_BLOCK),
                    "BLOCK_DV": block_dv}  # fmt: skip
        block_dv = min(COMBINE_CHANNELS, triton.next_power_of_2(dv))
        return {"BLOCK_SPLITS": block_splits, "COMBINE_BLOCK": min(block_splits, COMBINE_ELEMENTS // block_dv),
                "BLOCK_DV": block_dv}  # fmt: skip

    def _launch_combine(
        o_part: torch.Tensor,
        lse_part: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        rotation: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
    ) -> None:
        """The combine kernel into `out` [B, Hq, Dv] (any strides) and `lse` (B * Hq contiguous floats);
        `_combine_splits` says what `rotation` and `out_scale` do."""
        num_splits, dv = o_part.shape[1], o_part.shape[2]
        b, hq = out.shape[:2]
        if out_scale is not None and (
            out_scale.dim() != 3
            or out_scale.shape[0] != b
            or out_scale.shape[1] == 0
            or hq % out_scale.shape[1]
            or out_scale.shape[2] != dv
            or out_scale.stride(2) != 1
        ):
            raise ValueError(
                f"out_scale {tuple(out_scale.shape)}: [{b}, Hkv, {dv}] (Hkv dividing {hq} heads), channels contiguous"
            )
        blocks = _combine_blocks(num_splits, dv, rotation is not None)
        scale = lse_part if out_scale is None else out_scale  # never read without SCALE
        group = 1 if out_scale is None else hq // out_scale.shape[1]
        wrap_triton(_decode_combine_kernel)[(o_part.shape[0], _cdiv(dv, blocks["BLOCK_DV"]))](
            o_part,
            lse_part,
            out,
            lse,
            num_splits,
            dv,
            *out.stride(),
            hq,
            lse_part if rotation is None else rotation,  # never read without ROTATE
            dv**-0.5,
            scale,
            scale.stride(0),
            scale.stride(1) if scale.dim() > 1 else 0,
            group,
            **blocks,
            ROTATE=rotation is not None,
            SCALE=out_scale is not None,
            num_warps=NUM_WARPS,
        )

    def _received_attention_triton(
        query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float, lse: torch.Tensor
    ) -> torch.Tensor:
        b, hq, d = query.shape
        hkv, s = keys.shape[1], keys.shape[2]
        group = hq // hkv
        out = torch.empty(b, hkv, s, dtype=torch.float32, device=query.device)
        upcast, precision = _upcast_and_precision(keys.dtype)
        wrap_triton(_received_kernel)[(b * hkv, triton.cdiv(s, BLOCK_N))](
            query,
            keys,
            positions,
            lse,
            out,
            scale * LOG2E,
            s,
            hkv,
            group,
            *query.stride(),
            *keys.stride(),
            *positions.stride(),
            *lse.stride(),
            HEAD_DIM=d,
            BLOCK_G=_dot_block(group),
            BLOCK_N=BLOCK_N,
            BLOCK_D=_dot_block(d),
            UPCAST=upcast,
            PRECISION=precision,
            num_warps=NUM_WARPS,
        )
        return out

    def _received_attention_prefill_triton(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
        b, hq, t, d = query.shape
        hkv, s = keys.shape[1], keys.shape[2]
        group = hq // hkv
        lse2 = torch.empty(b, hkv, t * group, dtype=torch.float32, device=query.device)
        out = torch.empty(b, hkv, s, dtype=torch.float32, device=query.device)
        upcast, precision = _upcast_and_precision(keys.dtype)
        args = (scale * LOG2E, t, s, hkv, group, *query.stride(), *keys.stride())
        constants = {
            "HEAD_DIM": d,
            "BLOCK_M": PREFILL_ROWS,
            "BLOCK_N": PREFILL_KEYS,
            "BLOCK_D": _dot_block(d),
            "UPCAST": upcast,
            "PRECISION": precision,
        }
        wrap_triton(_prefill_lse_kernel)[(b * hkv, triton.cdiv(t * group, PREFILL_ROWS))](
            query, keys, lse2, *args, **constants, num_warps=PREFILL_LSE_WARPS, num_stages=NUM_STAGES
        )
        wrap_triton(_prefill_received_kernel)[(b * hkv, triton.cdiv(s, PREFILL_KEYS))](
            query, keys, lse2, out, *args, **constants, num_warps=NUM_WARPS, num_stages=NUM_STAGES
        )
        return out

    from triton.runtime.interpreter import InterpretedFunction

    _INTERPRETED = isinstance(_decode_split_kernel, InterpretedFunction)

    def _make_op(name: str, mutates_args: tuple[str, ...] = ()):
        return triton_op(name, mutates_args=mutates_args)
else:
    _INTERPRETED = False

    def _make_op(name: str, mutates_args: tuple[str, ...] = ()):
        def register(fn):
            op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
            op.register_fake(fn)  # fn runs the references, which work on fake tensors too
            return op

        return register


def _make_opaque_op(name: str):
    """`_make_op` for an operator that torch.compile does not trace into: its graph calls the operator, which
    runs as it is (at capture, under CUDA graphs), so its kernels launch with options that Inductor's copy of a
    user kernel would drop (`plane_kernel`'s register cap). Its fake runs the references (`_references_only`)."""

    def register(fn):
        def launch(*args, **kwargs):
            # as `triton_op` runs its body: launches straight to Triton, not through the traceable wrapper
            with _wrap_triton_off():
                return fn(*args, **kwargs)

        def fake(*args, **kwargs):
            with _references_only():
                return fn(*args, **kwargs)

        schema = torch.library.infer_schema(fn, mutates_args=())
        op = torch.library.custom_op(name, launch, mutates_args=(), schema=schema)
        op.register_fake(fake)
        return op

    return register


_REFERENCES_ONLY = False  # `_references_only`: the operators' bodies take the references


@contextlib.contextmanager
def _references_only() -> Iterator[None]:
    global _REFERENCES_ONLY
    before, _REFERENCES_ONLY = _REFERENCES_ONLY, True
    try:
        yield
    finally:
        _REFERENCES_ONLY = before


def _wrap_triton_off():
    """`wrap_triton` hands back the kernel itself while this holds (torch's switch, as `triton_op` uses it)."""
    from torch._library.triton import set_wrap_triton_enabled

    return set_wrap_triton_enabled(False)


def _use_triton(tensor: torch.Tensor) -> bool:
    return triton is not None and (tensor.is_cuda or _INTERPRETED) and not _REFERENCES_ONLY


# With Triton these are `triton_op`s: their body is also their fake implementation (under fake tensors the
# wrapped launches are no-ops and only the allocations' shapes count), and torch.compile traces the body
# into the graph, so Inductor sees the kernels themselves.
@_make_op("kvbench::decode_attention")
def _decode_attention_op(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(query):
        return _decode_attention_triton(query, keys, values, positions, scale)
    return decode_attention_reference(query, keys, values, positions, scale)


@_make_op("kvbench::received_attention")
def _received_attention_op(
    query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float, lse: torch.Tensor
) -> torch.Tensor:
    if _use_triton(query):
        return _received_attention_triton(query, keys, positions, scale, lse)
    return received_attention_reference(query, keys, positions, scale, lse)


@_make_op("kvbench::received_attention_prefill")
def _received_attention_prefill_op(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    if _use_triton(query):
        return _received_attention_prefill_triton(query, keys, scale)
    return received_attention_prefill_reference(query, keys, scale)


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence over the live slots (positions >= 0) of a slot buffer.

    query [B, Hq, D], keys [B, Hkv, S, D], values [B, Hkv, S, Dv], positions [B, Hkv, S] (integers), or
    lengths [B] (integers, any stride) where each sequence's slots below its length are live (a dense cache:
    no positions to materialise or read, and the kernel skips the tiles past the length); float16, bfloat16
    or float32.
    Returns (out [B, Hq, Dv] in the query's dtype, lse [B, Hq] float32), lse being the log-sum-exp of the
    scaled logits over live slots. No live slot: out = 0, lse = -inf.
    """
    _check_shapes(query, keys, positions)
    return torch.ops.kvbench.decode_attention(query, keys, values, positions, float(scale))


def received_attention(
    query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float, lse: torch.Tensor
) -> torch.Tensor:
    """Probability each slot received from the current query (exp(q·k·scale − lse) for live slots, 0 for
    empty ones), summed over the G query heads of its KV head: float32 [B, Hkv, S]. `lse` is
    `decode_attention`'s, so the probabilities are those the output was computed with. `positions` as
    `decode_attention` takes them (lengths are expanded to positions here)."""
    _check_shapes(query, keys, positions)
    positions = as_positions(positions, keys)
    return torch.ops.kvbench.received_attention(query, keys, positions, float(scale), lse)


def received_attention_prefill(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention each key receives from a chunk of causal prefill queries, summed over the queries and each
    KV head's G query heads: float32 [B, Hkv, S].

    query [B, Hq, T, D] are the last T of the S positions in keys [B, Hkv, S, D] (query i sits at position
    S - T + i and sees keys 0 .. S - T + i); float16, bfloat16 or float32. Each key gets the sum of
    softmax(q·k·scale) over the queries that see it, so a KV head's row sums to G * T.
    """
    b, hq, t, d = query.shape
    bk, hkv, s, dk = keys.shape
    if bk != b or dk != d or hq % hkv != 0 or t > s:
        raise ValueError(f"prefill query {tuple(query.shape)} does not fit keys {tuple(keys.shape)}")
    return torch.ops.kvbench.received_attention_prefill(query, keys, float(scale))

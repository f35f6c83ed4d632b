"""Upper-bound attention scores of key pages from their cuboid digests, in one pass over the digests.

A page digest bounds each channel of the page's keys: `upper` >= k >= `lower` per channel (ArkVale's
cuboid). For a query q the bound Σ_i max(q_i upper_i, q_i lower_i) equals q⁺·upper + q⁻·lower
(q⁺ = max(q, 0), q⁻ = min(q, 0)). A KV head's pages serve all the query heads that share it, so the score
is that bound averaged over them, which (linear in q) is mean(q⁺)·upper + mean(q⁻)·lower.

Why a kernel: as two batched products (`einsum`) cuBLAS picked a 16x16 tensor-core kernel for these
one-row products and read each digest tensor in its own launch: 19 us each per layer at 4 x 30k tokens of
a 7B MHA model on an H200 (`benchmarks/profile_step.py`), where reading both digests once takes ~15 us.
Here one Triton program per (sequence, KV head, tile of pages) averages its query halves itself (a kernel
of their own before), reads the tile of both digests once and accumulates in float32. Elsewhere (CPU, no
Triton) the same sums run as `einsum` in the digests' dtype.

`cuboid_scores(query, upper, lower)`: query [B, Hq, D]; upper, lower [B, H, N, D] of one dtype, Hq a
multiple of H; returns float32 [B, H, N]. The averaged halves are rounded to the digests' dtype first (the
products' inputs), in the kernel as in the reference.
"""

from __future__ import annotations

import torch

from kvbench import kernels

# Pages a program reads, with one warp: at 8 KV heads x 1,026 pages (Llama-3.1-8B, batch 1) 3.0 us on an H100
# against 4.1 with 32 pages and 4 warps; at 4 x 32 heads x 1,026 pages (bandwidth-bound) 23.8 us either way.
BLOCK_PAGES = 16
WARPS = 1


def query_halves(query: torch.Tensor, heads: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """mean(q⁺), mean(q⁻) [B, heads, D] over each KV head's query heads, in float32, then as `dtype`."""
    b, hq, d = query.shape
    q = query.float().view(b, heads, hq // heads, d)
    return q.clamp(min=0).mean(dim=2).to(dtype), q.clamp(max=0).mean(dim=2).to(dtype)


def cuboid_scores_reference(query: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """The products in the digests' dtype (float32 accumulation on a GPU), as float32."""
    positive, negative = query_halves(query, upper.shape[1], upper.dtype)
    scores = torch.einsum("bhd,bhnd->bhn", positive, upper) + torch.einsum("bhd,bhnd->bhn", negative, lower)
    return scores.float()


if kernels.triton is not None:
    import triton
    import triton.language as tl

    from kvbench.kernels import wrap_triton

    @triton.jit
    def _as_digest_dtype(x, dtype: tl.constexpr):
        """float32 `x` rounded to `dtype` (to nearest, ties to even) and back. bfloat16 by its bits: Triton's
        interpreter, which the tests run, truncates a float32 -> bfloat16 cast where the GPU rounds."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # finite values: no NaN reaches here
            return bits.to(tl.float32, bitcast=True)
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _cuboid_scores_kernel(
        query, upper, lower, out, heads, n_pages, group,
        q_sb, q_sh, d_sb, d_sh, d_sn, out_sb, out_sh,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b, h = pid // heads, pid % heads
        pages = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        # The KV head's query heads h * group ... h * group + group - 1, averaged as halves, rounded as the
        # digests (the reference's products take both in the digests' dtype).
        rows = tl.arange(0, BLOCK_G)
        q_ok = (rows[:, None] < group) & col_ok[None, :]
        q = tl.load(query + b * q_sb + (h * group + rows[:, None]) * q_sh + cols[None, :], mask=q_ok, other=0.0)
        q = q.to(tl.float32)
        q_pos = _as_digest_dtype(tl.sum(tl.maximum(q, 0.0), axis=0) / group, upper.dtype.element_ty)
        q_neg = _as_digest_dtype(tl.sum(tl.minimum(q, 0.0), axis=0) / group, upper.dtype.element_ty)
        both = (pages[:, None] < n_pages) & col_ok[None, :]
        offsets = b * d_sb + h * d_sh + pages[:, None] * d_sn + cols[None, :]
        high = tl.load(upper + offsets, mask=both, other=0.0).to(tl.float32)
        low = tl.load(lower + offsets, mask=both, other=0.0).to(tl.float32)
        scores = tl.sum(high * q_pos[None, :] + low * q_neg[None, :], axis=1)
        tl.store(out + b * out_sb + h * out_sh + pages, scores, mask=pages < n_pages)

    def _cuboid_scores_triton(query: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        b, h, n, d = upper.shape
        # The kernel reads both digests with one set of strides, each row of D values contiguous (the layers'
        # buffers are all that; any other layout is copied here), and the query's rows of D contiguous values.
        if upper.stride() != lower.stride() or upper.stride(-1) != 1:
            upper, lower = upper.contiguous(), lower.contiguous()
        if query.stride(-1) != 1:
            query = query.contiguous()
        group = query.shape[1] // h
        out = torch.empty(b, h, n, dtype=torch.float32, device=upper.device)
        wrap_triton(_cuboid_scores_kernel)[(b * h, triton.cdiv(n, BLOCK_PAGES))](
            query, upper, lower, out, h, n, group,
            query.stride(0), query.stride(1), upper.stride(0), upper.stride(1), upper.stride(2),
            out.stride(0), out.stride(1),
            D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=BLOCK_PAGES, BLOCK_G=max(2, triton.next_power_of_2(group)),
            num_warps=WARPS,
        )  # fmt: skip
        return out


@kernels._make_op("kvbench::cuboid_scores")
def _cuboid_scores_op(query: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    if kernels._use_triton(upper):
        return _cuboid_scores_triton(query, upper, lower)
    return cuboid_scores_reference(query, upper, lower)


def cuboid_scores(query: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Per KV head and page, the bound averaged over the head's query heads: float32 [B, H, N] (module doc)."""
    if upper.shape != lower.shape or query.shape[0] != upper.shape[0] or query.shape[1] % upper.shape[1]:
        raise ValueError(
            f"cuboid_scores: query [B, Hq, D] and digests [B, H, N, D] of one batch, Hq a multiple of H: got "
            f"{tuple(query.shape)}, {tuple(upper.shape)}, {tuple(lower.shape)}"
        )
    if query.shape[-1] != upper.shape[-1]:
        raise ValueError(f"cuboid_scores: query and digest widths differ: {query.shape[-1]} vs {upper.shape[-1]}")
    return torch.ops.kvbench.cuboid_scores(query, upper, lower)

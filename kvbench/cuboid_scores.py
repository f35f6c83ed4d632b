"""Upper-bound attention scores of key pages from their cuboid digests, in one pass over the digests.

A page digest bounds each channel of the page's keys: `upper` >= k >= `lower` per channel (ArkVale's
cuboid). For a query q the bound Σ_i max(q_i upper_i, q_i lower_i) equals q⁺·upper + q⁻·lower
(q⁺ = max(q, 0), q⁻ = min(q, 0)), so a caller passes the two halves of its query (already averaged over
the query heads that share a KV head: the bound is linear in q) and gets one score per page.

Why a kernel: as two batched products (`einsum`) cuBLAS picked a 16x16 tensor-core kernel for these
one-row products and read each digest tensor in its own launch: 19 us each per layer at 4 x 30k tokens of
a 7B MHA model on an H200 (`benchmarks/profile_step.py`), where reading both digests once takes ~15 us.
Here one Triton program per (sequence, KV head, tile of pages) reads the tile of both digests once and
accumulates in float32. Elsewhere (CPU, no Triton) the same sums run as `einsum` in the digests' dtype.

`cuboid_scores(positive, negative, upper, lower)`: positive, negative [B, H, D]; upper, lower [B, H, N, D],
all one dtype; returns float32 [B, H, N].
"""

from __future__ import annotations

import torch

from kvbench import kernels

BLOCK_PAGES = 32  # pages a program reads: 4 x 32 heads x 1,026 pages make 4,352 programs, 8 x 1,026 make 264


def cuboid_scores_reference(
    positive: torch.Tensor, negative: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor
) -> torch.Tensor:
    """The products in the digests' dtype (float32 accumulation on a GPU), as float32."""
    scores = torch.einsum("bhd,bhnd->bhn", positive, upper) + torch.einsum("bhd,bhnd->bhn", negative, lower)
    return scores.float()


if kernels.triton is not None:
    import triton
    import triton.language as tl

    from kvbench.kernels import wrap_triton

    @triton.jit
    def _cuboid_scores_kernel(
        positive, negative, upper, lower, out, heads, n_pages,
        q_sb, q_sh, d_sb, d_sh, d_sn, out_sb, out_sh,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b, h = pid // heads, pid % heads
        pages = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        q_pos = tl.load(positive + b * q_sb + h * q_sh + cols, mask=col_ok, other=0.0).to(tl.float32)
        q_neg = tl.load(negative + b * q_sb + h * q_sh + cols, mask=col_ok, other=0.0).to(tl.float32)
        both = (pages[:, None] < n_pages) & col_ok[None, :]
        offsets = b * d_sb + h * d_sh + pages[:, None] * d_sn + cols[None, :]
        high = tl.load(upper + offsets, mask=both, other=0.0).to(tl.float32)
        low = tl.load(lower + offsets, mask=both, other=0.0).to(tl.float32)
        scores = tl.sum(high * q_pos[None, :] + low * q_neg[None, :], axis=1)
        tl.store(out + b * out_sb + h * out_sh + pages, scores, mask=pages < n_pages)

    def _cuboid_scores_triton(
        positive: torch.Tensor, negative: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor
    ) -> torch.Tensor:
        b, h, n, d = upper.shape
        # The kernel reads both halves of the query with one set of strides, both digests with another, each
        # row of D values contiguous (the layers' buffers are all that; any other layout is copied here).
        alike = positive.stride() == negative.stride() and upper.stride() == lower.stride()
        if not alike or any(t.stride(-1) != 1 for t in (positive, upper)):
            positive, negative, upper, lower = (t.contiguous() for t in (positive, negative, upper, lower))
        out = torch.empty(b, h, n, dtype=torch.float32, device=upper.device)
        wrap_triton(_cuboid_scores_kernel)[(b * h, triton.cdiv(n, BLOCK_PAGES))](
            positive, negative, upper, lower, out, h, n,
            positive.stride(0), positive.stride(1), upper.stride(0), upper.stride(1), upper.stride(2),
            out.stride(0), out.stride(1),
            D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=BLOCK_PAGES,
        )  # fmt: skip
        return out


@kernels._make_op("kvbench::cuboid_scores")
def _cuboid_scores_op(
    positive: torch.Tensor, negative: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor
) -> torch.Tensor:
    if kernels._use_triton(upper):
        return _cuboid_scores_triton(positive, negative, upper, lower)
    return cuboid_scores_reference(positive, negative, upper, lower)


def cuboid_scores(
    positive: torch.Tensor, negative: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor
) -> torch.Tensor:
    """Σ_i positive_i upper_i + negative_i lower_i per page: float32 [B, H, N] (see the module doc)."""
    if upper.shape != lower.shape or positive.shape != negative.shape or positive.shape[:2] != upper.shape[:2]:
        raise ValueError(
            f"cuboid_scores: queries [B, H, D] and digests [B, H, N, D] of one batch and head count: got "
            f"{tuple(positive.shape)}, {tuple(negative.shape)}, {tuple(upper.shape)}, {tuple(lower.shape)}"
        )
    if positive.shape[-1] != upper.shape[-1]:
        raise ValueError(f"cuboid_scores: query and digest widths differ: {positive.shape[-1]} vs {upper.shape[-1]}")
    return torch.ops.kvbench.cuboid_scores(positive, negative, upper, lower)

"""Which pages to recall and which resident slots they replace, for one decode step, in one kernel.

A paged cache with a host backup (ArkVale) ranks every page each step and keeps the `k` best on the device:
1. the `k` best candidate pages by score (`top`, best first);
2. `missing`: those of them that are candidates, not resident, and the row is active;
3. victims: the resident slots whose pages score lowest, where a page among `top` or not a candidate
   (sinks, window, empty slots read as page 0) is never a victim (`k` of them, lowest first);
4. missing pages first (stable), each paired with the next victim slot.

Why a kernel: in PyTorch this is ~12 small kernels a layer (masking, two top-k, a scatter of the resident
pages, gathers, an argsort) of 1-6 us each; here one Triton program per (sequence, group) row holds its
scores in registers, takes both top-k with Triton's bitonic `tl.topk` (packed with their index, as
`kvbench.topk`), and compares the k best pages with the resident slots directly. Elsewhere (CPU) the
reference below runs; the tests compare the two.

`select_pages(scores, slot_page, n_sink, newest_candidate, active, k)`:
scores float32 [B, G, N]; slot_page int64 [B, G, S] (-1: empty); n_sink an int; newest_candidate int64
[B] (pages at or past it are window pages); active bool [B]. Returns (pages, slots, fetch) [B, G, k]:
page pages[.., i] goes into slot slots[.., i] where fetch[.., i]. Among equal scores the kernel prefers
the higher index and the reference (`torch.topk`) any of them.
"""

from __future__ import annotations

import torch

from kvbench import kernels
from kvbench.topk import float_order_keys, largest_keys

MAX_KERNEL_PAGES = 16384  # pages and slots within 2^14: float keys (within +-2^31) pack without overflow


def select_pages_reference(
    scores: torch.Tensor,
    slot_page: torch.Tensor,
    n_sink: int,
    newest_candidate: torch.Tensor,
    active: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = scores.shape[0]
    pages = torch.arange(scores.shape[-1], device=scores.device)
    candidate = (pages >= n_sink) & (pages < newest_candidate.view(b, 1, 1))  # [B, 1, N]
    _, top = largest_keys(float_order_keys(scores.masked_fill(~candidate, float("-inf"))), k)
    resident = torch.zeros_like(candidate.expand_as(scores)).scatter_(2, slot_page.clamp(min=0), True)
    missing = ~resident.gather(2, top) & candidate.expand_as(scores).gather(2, top) & active.view(b, 1, 1)
    keep_score = scores.masked_fill(~candidate, float("inf")).scatter(2, top, float("inf"))
    resident_score = keep_score.gather(2, slot_page.clamp(min=0))
    _, victim_slots = largest_keys(float_order_keys(-resident_score), k)  # lowest score first
    order = missing.to(torch.int8).argsort(dim=-1, descending=True, stable=True)  # missing pages first
    return top.gather(2, order), victim_slots, missing.gather(2, order)


if kernels.triton is not None:
    import triton
    import triton.language as tl

    from kvbench.kernels import wrap_triton

    @triton.jit
    def _float_key(score):
        """float32 -> int64 in the same order (as `kvbench.topk.float_order_keys`)."""
        bits = score.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)

    @triton.jit
    def _select_pages_kernel(
        scores_ptr, slot_page_ptr, newest_ptr, active_ptr, pages_out, slots_out, fetch_out,
        groups, N, S, K, n_sink,
        BITS: tl.constexpr, N_PAD: tl.constexpr, S_PAD: tl.constexpr, K_PAD: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        b = row // groups
        newest = tl.load(newest_ptr + b)
        active = tl.load(active_ptr + b) != 0

        # 1. The k best candidate pages: keys packed with their page index, bitonic top-k.
        page = tl.arange(0, N_PAD)
        in_row = page < N
        score = tl.load(scores_ptr + row * N + page, mask=in_row, other=0.0)
        candidate = (page >= n_sink) & (page < newest)
        key = _float_key(tl.where(candidate, score, float("-inf")))
        # Padding packs below every real packed value (those lie within +-2^(31 + BITS)): int64's minimum.
        top = tl.topk(tl.where(in_row, key * (1 << BITS) + page, tl.full([N_PAD], -(2**63), tl.int64)), K_PAD)
        j = tl.arange(0, K_PAD)
        real = j < K
        top_page = tl.where(real, top & ((1 << BITS) - 1), -1)  # -1 beyond k: matches no slot

        # 2. Resident or not: each top page against every slot (empty slots read as page 0).
        slot = tl.arange(0, S_PAD)
        in_slots = slot < S
        held = tl.maximum(tl.load(slot_page_ptr + row * S + slot, mask=in_slots, other=0), 0)
        held = tl.where(in_slots, held, -2)  # padding slots hold no page
        resident = tl.max((top_page[:, None] == held[None, :]).to(tl.int32), axis=1) > 0
        top_candidate = (top_page >= n_sink) & (top_page < newest)
        missing = real & ~resident & top_candidate & active

        # 3. Victims: a resident slot's page score, +inf for pages to keep; the k lowest, lowest first.
        held_score = tl.load(scores_ptr + row * N + held, mask=in_slots, other=0.0)
        in_top = tl.max((held[:, None] == top_page[None, :]).to(tl.int32), axis=1) > 0
        keep = in_top | (held < n_sink) | (held >= newest)
        # x * -1, not -x: Triton's negation is 0 - x, which turns +0.0 into +0.0 (torch.neg gives -0.0).
        victim_key = _float_key(tl.where(keep, float("inf"), held_score) * -1.0)
        packed = tl.where(in_slots, victim_key * (1 << BITS) + slot, tl.full([S_PAD], -(2**63), tl.int64))
        victims = tl.topk(packed, K_PAD)
        tl.store(slots_out + row * K + j, victims & ((1 << BITS) - 1), mask=real)

        # 4. Missing pages first, each group in its own order: a stable partition by running counts.
        missing_i = missing.to(tl.int32)
        n_missing = tl.sum(missing_i, axis=0)
        before = tl.cumsum(missing_i, axis=0) - missing_i
        kept_before = j - before
        position = tl.where(missing, before, n_missing + kept_before)
        tl.store(pages_out + row * K + position, top_page, mask=real)
        tl.store(fetch_out + row * K + position, missing.to(tl.int8), mask=real)

    def _select_pages_triton(
        scores: torch.Tensor,
        slot_page: torch.Tensor,
        n_sink: int,
        newest_candidate: torch.Tensor,
        active: torch.Tensor,
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, g, n = scores.shape
        s = slot_page.shape[-1]
        scores, slot_page = scores.float().contiguous(), slot_page.contiguous()
        pages = torch.empty(b, g, k, dtype=torch.int64, device=scores.device)
        slots = torch.empty_like(pages)
        fetch = torch.empty(b, g, k, dtype=torch.int8, device=scores.device)
        n_pad, s_pad = max(2, triton.next_power_of_2(n)), max(2, triton.next_power_of_2(s))
        wrap_triton(_select_pages_kernel)[(b * g,)](
            scores, slot_page, newest_candidate.contiguous(), active.to(torch.int8).contiguous(),
            pages, slots, fetch, g, n, s, k, n_sink,
            BITS=max(n_pad, s_pad).bit_length() - 1, N_PAD=n_pad, S_PAD=s_pad,
            K_PAD=max(2, triton.next_power_of_2(k)), num_warps=4 if n_pad <= 1024 else 8,
        )  # fmt: skip
        return pages, slots, fetch


# The operator returns `fetch` as int8 0/1 and the caller compares it: Inductor could not lower a view of the
# kernel's int8 output as bool inside the operator ("torch.bool is not supported by torch.iinfo", on the H200).
@kernels._make_op("kvbench::select_pages")
def _select_pages_op(
    scores: torch.Tensor,
    slot_page: torch.Tensor,
    n_sink: int,
    newest_candidate: torch.Tensor,
    active: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fits = max(scores.shape[-1], slot_page.shape[-1]) <= MAX_KERNEL_PAGES
    if kernels._use_triton(scores) and fits:
        return _select_pages_triton(scores, slot_page, n_sink, newest_candidate, active, k)
    pages, slots, fetch = select_pages_reference(scores, slot_page, n_sink, newest_candidate, active, k)
    return pages, slots, fetch.to(torch.int8)


def select_pages(
    scores: torch.Tensor,
    slot_page: torch.Tensor,
    n_sink: int,
    newest_candidate: torch.Tensor,
    active: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pages, slots, fetch) [B, G, k] for one step (see the module doc)."""
    if not 1 <= k <= min(scores.shape[-1], slot_page.shape[-1]):
        raise ValueError(
            f"select_pages: 1 <= k <= pages and slots: got k={k}, scores {tuple(scores.shape)}, "
            f"slots {tuple(slot_page.shape)}"
        )
    pages, slots, fetch = torch.ops.kvbench.select_pages(scores, slot_page, n_sink, newest_candidate, active, k)
    return pages, slots, fetch != 0

"""Which pages to recall and which resident slots they replace, for one decode step, in one kernel.

A paged cache with a host backup (ArkVale) ranks every page each step and keeps the `k` best on the device.
For each row (sequence b, group g of KV heads):
0. a page's score is the mean of its group's KV heads' scores; pages [n_sink, newest) are candidates,
   newest = min((tokens - 1) // page_size - n_window + 1, N - n_window) (later pages are the window; the
   bound only matters for more tokens than the pages hold, which no cache writes), and the row selects
   only while it holds more tokens than its slots (`active`: tokens > capacity);
1. the `k` best candidate pages by score (`top`, best first);
2. `missing`: those of them that are candidates, not resident, and the row is active;
3. victims: the resident slots whose pages score lowest, where a page among `top` or not a candidate
   (sinks, window, empty slots read as page 0) is never a victim (`k` of them, lowest first);
4. missing pages first (stable), each paired with the next victim slot;
5. a recall cap (a benchmark setting; None: none) keeps the first `ceil(cap)` pairs and fetches on the
   row's n-th selection step at most floor((n + 1) cap) - floor(n cap) of them, so a fraction is a rate;
6. the step's bookkeeping, in place: `slot_page` names each fetched page in its slot, and `counters`
   [B, G, 2] add the selection step (where active) and the pages fetched.

Why a kernel: in PyTorch this is ~12 small kernels a layer (masking, two top-k, a scatter of the resident
pages, gathers, an argsort), and the mean, the cap and the bookkeeping around it another ~6, each 1-6 us;
here one Triton program per (sequence, group) row holds its scores in registers, takes both top-k with
Triton's bitonic `tl.topk` (packed with their index, as `kvbench.topk`), compares the k best pages with the
resident slots directly and writes the row's bookkeeping. Elsewhere (CPU) the reference below runs; the
tests compare the two.

`select_pages(head_scores, slot_page, counters, tokens, schedule, k, cap)`: head_scores float32 [B, H, N]
(per KV head); slot_page int64 [B, G, S] (-1: empty); counters float32 [B, G, 2]; tokens int64 [B].
Returns (pages, slots, fetch) [B, G, width], width = min(ceil(cap), k) or k: page pages[.., i] goes into
slot slots[.., i] where fetch[.., i] (int8, 1 or 0: `host_pages.gather_pages` takes it as it is, so no
kernel converts it to bool). Among equal scores the kernel prefers the higher index and the
reference (`torch.topk`) any of them; a row with fewer than k pages between sinks and window names page -1
(the reference: some page outside them) in the places past them, none of them fetched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench import kernels
from kvbench.topk import float_order_keys, largest_keys

MAX_KERNEL_PAGES = 16384  # pages and slots within 2^14: float keys (within +-2^31) pack without overflow
SELECTION_STEPS, PAGES_RECALLED = 0, 1  # counters [B, G, 2], per row: steps it selected on, pages it recalled


@dataclass(frozen=True)
class PageSchedule:
    """Which pages a row may select: sinks first, a window last, and only once its slots are full."""

    n_sink: int  # pages [0, n_sink) always stay
    n_window: int  # the page being written and the n_window - 1 before it always stay
    page_size: int
    capacity: int  # tokens the row's slots hold: no selection until the row holds more


def recall_width(k: int, cap: float | None) -> int:
    """Pairs a step returns: all `k`, or the `ceil(cap)` a capped step can fetch at most."""
    return k if cap is None else min(math.ceil(cap), k)


def select_pages_reference(
    head_scores: torch.Tensor,
    slot_page: torch.Tensor,
    counters: torch.Tensor,
    tokens: torch.Tensor,
    schedule: PageSchedule,
    k: int,
    cap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, n = head_scores.shape
    groups = slot_page.shape[1]
    scores = head_scores.float().view(b, groups, h // groups, n).mean(dim=2)
    newest = (tokens - 1).div(schedule.page_size, rounding_mode="floor").clamp(max=n - 1) - schedule.n_window + 1
    active = tokens > schedule.capacity
    pages = torch.arange(n, device=scores.device)
    candidate = (pages >= schedule.n_sink) & (pages < newest.view(b, 1, 1))  # [B, 1, N]
    _, top = largest_keys(float_order_keys(scores.masked_fill(~candidate, float("-inf"))), k)
    resident = torch.zeros_like(candidate.expand_as(scores)).scatter_(2, slot_page.clamp(min=0), True)
    missing = ~resident.gather(2, top) & candidate.expand_as(scores).gather(2, top) & active.view(b, 1, 1)
    keep_score = scores.masked_fill(~candidate, float("inf")).scatter(2, top, float("inf"))
    resident_score = keep_score.gather(2, slot_page.clamp(min=0))
    _, victim_slots = largest_keys(float_order_keys(-resident_score), k)  # lowest score first
    order = missing.to(torch.int8).argsort(dim=-1, descending=True, stable=True)  # missing pages first
    width = recall_width(k, cap)
    top, victim_slots, fetch = (t[..., :width] for t in (top.gather(2, order), victim_slots, missing.gather(2, order)))
    if cap is not None:
        steps = counters[..., SELECTION_STEPS]
        allowed = torch.floor((steps + 1) * cap) - torch.floor(steps * cap)  # float32, as the kernel
        fetch = fetch & (torch.arange(width, device=fetch.device) < allowed.unsqueeze(-1))
    slot_page.scatter_(2, victim_slots, torch.where(fetch, top, slot_page.gather(2, victim_slots)))
    counters[..., SELECTION_STEPS] += active.view(b, 1).float()
    counters[..., PAGES_RECALLED] += fetch.sum(dim=-1).float()
    return top, victim_slots, fetch


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
        scores_ptr, slot_page_ptr, counters_ptr, tokens_ptr, pages_out, slots_out, fetch_out,
        groups, N, S, K, width, n_sink, n_window, page_size, capacity, cap,
        CAPPED: tl.constexpr, HEADS: tl.constexpr, BITS: tl.constexpr, C_PAD: tl.constexpr, S_PAD: tl.constexpr,
        K_PAD: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        b = row // groups
        tokens = tl.load(tokens_ptr + b)
        # tokens >= 1 after prefill: no negative division. The last page bounds the window (module doc, 0.).
        newest = tl.minimum((tokens - 1) // page_size, N - 1) - n_window + 1
        active = tokens > capacity

        # 0. Each candidate page's score: the sum of its group's heads, which ranks pages as the reference's mean
        # does. Candidates lie in [n_sink, N - n_window) (newest <= N - n_window), so the row is that range
        # alone: at 1,026 pages, 1,024 keys to rank instead of 2,048. The heads are unrolled so that their loads
        # are in flight together (a loop waits for each in turn).
        offset = tl.arange(0, C_PAD)
        page = n_sink + offset
        in_row = offset < N - n_sink - n_window
        first_head = scores_ptr + row * HEADS * N
        score = tl.zeros([C_PAD], tl.float32)
        for head in tl.static_range(HEADS):
            score += tl.load(first_head + head * N + page, mask=in_row, other=0.0)

        # 1. The k best candidate pages: keys packed with their offset, bitonic top-k. Rows with fewer than k
        # positions get padding back, which names no page (-1).
        candidate = in_row & (page < newest)
        key = _float_key(tl.where(candidate, score, float("-inf")))
        # Padding packs below every real packed value (those lie within +-2^(31 + BITS)): int64's minimum.
        lowest: tl.constexpr = -(2**63)
        top = tl.topk(tl.where(in_row, key * (1 << BITS) + offset, tl.full([C_PAD], lowest, tl.int64)), K_PAD)
        j = tl.arange(0, K_PAD)
        in_k = j < K
        real = in_k & (top != lowest)
        top_page = tl.where(real, n_sink + (top & ((1 << BITS) - 1)), -1)  # -1: matches no slot

        # 2. Resident or not: each top page against every slot (empty slots read as page 0).
        slot = tl.arange(0, S_PAD)
        in_slots = slot < S
        held = tl.maximum(tl.load(slot_page_ptr + row * S + slot, mask=in_slots, other=0), 0)
        held = tl.where(in_slots, held, -2)  # padding slots hold no page
        resident = tl.max((top_page[:, None] == held[None, :]).to(tl.int32), axis=1) > 0
        top_candidate = (top_page >= n_sink) & (top_page < newest)
        missing = real & ~resident & top_candidate & active

        # 3. Victims: a resident slot's page score, gathered from the row's sums (a page outside the candidates
        # is kept whatever it reads), +inf for pages to keep; the k lowest, lowest first.
        # Both bounds are needed: sinks and empty slots would index below 0 (undefined on a GPU; the interpreter
        # wraps negative indices, so the tests cannot see the lower bound go).
        held_score = tl.gather(score, tl.minimum(tl.maximum(held - n_sink, 0), C_PAD - 1), axis=0)
        in_top = tl.max((held[:, None] == top_page[None, :]).to(tl.int32), axis=1) > 0
        keep = in_top | (held < n_sink) | (held >= newest)
        # x * -1, not -x: Triton's negation is 0 - x, which turns +0.0 into +0.0 (torch.neg gives -0.0).
        victim_key = _float_key(tl.where(keep, float("inf"), held_score) * -1.0)
        packed = tl.where(in_slots, victim_key * (1 << BITS) + slot, tl.full([S_PAD], -(2**63), tl.int64))
        victim_slot = tl.topk(packed, K_PAD) & ((1 << BITS) - 1)
        tl.store(slots_out + row * width + j, victim_slot, mask=j < width)

        # 4. Missing pages first, each group in its own order: a stable partition by running counts.
        missing_i = missing.to(tl.int32)
        n_missing = tl.sum(missing_i, axis=0)
        before = tl.cumsum(missing_i, axis=0) - missing_i
        kept_before = j - before
        position = tl.where(missing, before, n_missing + kept_before)

        # 5. The recall cap: the first `allowed` pairs of this selection step (allowed <= ceil(cap): within width).
        steps = tl.load(counters_ptr + row * 2)  # counters [.., 2]: selection steps, pages recalled
        if CAPPED:
            allowed = tl.floor((steps + 1) * cap) - tl.floor(steps * cap)
            fetched = missing & (position < allowed)
        else:
            fetched = missing
        tl.store(pages_out + row * width + position, top_page, mask=in_k & (position < width))
        tl.store(fetch_out + row * width + position, fetched.to(tl.int8), mask=in_k & (position < width))

        # 6. Bookkeeping: each fetched page goes into the victim slot at its position (gathered in registers).
        slot_of = tl.gather(victim_slot, position, axis=0)  # position < K_PAD: a permutation of j
        tl.store(slot_page_ptr + row * S + slot_of, top_page, mask=fetched)
        tl.store(counters_ptr + row * 2, steps + active.to(tl.float32))
        recalled = tl.load(counters_ptr + row * 2 + 1)
        tl.store(counters_ptr + row * 2 + 1, recalled + tl.sum(fetched.to(tl.float32), axis=0))

    def _select_pages_triton(
        head_scores: torch.Tensor,
        slot_page: torch.Tensor,
        counters: torch.Tensor,
        tokens: torch.Tensor,
        schedule: PageSchedule,
        k: int,
        cap: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, h, n = head_scores.shape
        g, s = slot_page.shape[1:]
        width = recall_width(k, cap)
        pages = torch.empty(b, g, width, dtype=torch.int64, device=head_scores.device)
        slots = torch.empty_like(pages)
        fetch = torch.empty(b, g, width, dtype=torch.int8, device=head_scores.device)
        k_pad = max(2, triton.next_power_of_2(k))
        positions = n - schedule.n_sink - schedule.n_window  # where candidates can be
        c_pad, s_pad = max(k_pad, triton.next_power_of_2(max(positions, 1))), max(2, triton.next_power_of_2(s))
        wrap_triton(_select_pages_kernel)[(b * g,)](
            head_scores, slot_page, counters, tokens, pages, slots, fetch,
            g, n, s, k, width, schedule.n_sink, schedule.n_window, schedule.page_size, schedule.capacity,
            0.0 if cap is None else cap, CAPPED=cap is not None, HEADS=h // g,
            BITS=max(c_pad, s_pad).bit_length() - 1, C_PAD=c_pad, S_PAD=s_pad, K_PAD=k_pad,
            num_warps=8 if c_pad >= 1024 else 4,  # at 1,024 keys on an H100: 6.9 us against 7.8 with 4 warps
        )  # fmt: skip
        return pages, slots, fetch


# `fetch` stays int8 0/1: Inductor could not lower a view of the kernel's int8 output as bool inside the operator
# ("torch.bool is not supported by torch.iinfo", on the H200), and a bool copy outside it is a kernel of its own.
# Its scalars travel one by one (an operator's schema has no dataclasses); a negative cap is none.
@kernels._make_op("kvbench::select_pages", mutates_args=("slot_page", "counters"))
def _select_pages_op(
    head_scores: torch.Tensor,
    slot_page: torch.Tensor,
    counters: torch.Tensor,
    tokens: torch.Tensor,
    n_sink: int,
    n_window: int,
    page_size: int,
    capacity: int,
    k: int,
    cap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    schedule, limit = PageSchedule(n_sink, n_window, page_size, capacity), None if cap < 0 else cap
    fits = max(head_scores.shape[-1], slot_page.shape[-1]) <= MAX_KERNEL_PAGES
    if kernels._use_triton(head_scores) and fits:
        return _select_pages_triton(head_scores, slot_page, counters, tokens, schedule, k, limit)
    pages, slots, fetch = select_pages_reference(head_scores, slot_page, counters, tokens, schedule, k, limit)
    return pages, slots, fetch.to(torch.int8)


def select_pages(
    head_scores: torch.Tensor,
    slot_page: torch.Tensor,
    counters: torch.Tensor,
    tokens: torch.Tensor,
    schedule: PageSchedule,
    k: int,
    cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pages, slots, fetch) [B, G, width] for one step, fetch int8 0/1; `slot_page` and `counters` updated
    (module doc)."""
    b, h, n = head_scores.shape
    groups, s = slot_page.shape[1:]
    if not 1 <= k <= min(n, s):
        raise ValueError(f"select_pages: 1 <= k <= pages and slots: got k={k}, {n} pages, {s} slots")
    if h % groups or slot_page.shape[0] != b or counters.shape != (b, groups, 2) or tokens.shape != (b,):
        raise ValueError(
            f"select_pages: head scores [B, H, N] with H a multiple of slot_page's groups [B, G, S], counters "
            f"[B, G, 2], tokens [B]: got {tuple(head_scores.shape)}, {tuple(slot_page.shape)}, "
            f"{tuple(counters.shape)}, {tuple(tokens.shape)}"
        )
    dtypes = (head_scores.dtype, slot_page.dtype, counters.dtype, tokens.dtype)
    if dtypes != (torch.float32, torch.int64, torch.float32, torch.int64):
        raise ValueError(f"select_pages: float32 scores, int64 slot_page, float32 counters, int64 tokens: got {dtypes}")
    if cap is not None and cap < 0:
        raise ValueError(f"select_pages: cap is None or >= 0, got {cap}")
    if any(not t.is_contiguous() for t in (head_scores, slot_page, counters, tokens)):
        raise ValueError("select_pages: head scores, slot_page, counters and tokens must be contiguous")
    pages, slots, fetch = torch.ops.kvbench.select_pages(
        head_scores, slot_page, counters, tokens, schedule.n_sink, schedule.n_window, schedule.page_size,
        schedule.capacity, k, -1.0 if cap is None else float(cap),
    )  # fmt: skip
    return pages, slots, fetch

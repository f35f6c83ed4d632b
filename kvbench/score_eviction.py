"""Accumulate per-slot scores and evict each row's lowest-scoring unprotected slot, in one pass a row.

Why: H2O's decode step (`methods.h2o.H2OLayer.observe`) adds the attention each slot received to its score,
then empties the lowest-scoring slot outside the recent window once every slot is live. Written in PyTorch
(`accumulate_and_evict_reference`), Inductor fuses it into one reduction kernel that took 272 us a layer on
an H100 (`benchmarks/profile_step.py`, Llama-3.1-8B shape, 8k context, batch 64, budget 2,048: 512 rows of
2,112 slots), more than the decode attention kernel that reads 554 MB (188 us), while the operation moves
about 22 MB (per slot: the float32 score read and written, the float32 received read, the int64 position
read). Its generated code could not be read (no GPU), so this is a kernel whose cost is bounded by
construction: one program per (sequence, KV head) row streams the row once, tile by tile, with a constant
number of registers whatever the row's length, and reduces across its lanes once at the end.

What it computes, in place, for scores float32 [B, H, S], received float32 [B, H, R] (R <= S), positions
[B, H, P] (int32 or int64, -1 = empty; P >= capacity), seen [B] (tokens written per sequence, on the device):

- scores[..., :R] += received;
- among the first `capacity` slots, a slot is protected if empty or recent (position >= seen - recent);
  the victim is the first slot of the lowest score among the unprotected ones (torch.argmin's first
  occurrence of the minimum; slot 0 where every slot is protected, the argmin of a row of +inf);
- where every slot below `capacity` is live, the victim's position becomes -1 (emptied: the next token goes
  there). Slots past `capacity` (the buffer's padding to a multiple of 64) are never victims and never
  counted.

The kernel runs on CUDA and under Triton's interpreter; elsewhere the reference runs. The kernel's scores and
positions equal the reference's bit for bit: the sums are the same float32 additions, and the minimum is an
exact comparison whose ties go to the lower slot. One difference, outside what callers pass: a NaN score is
never the kernel's victim, while torch.argmin would pick it.

The operator (`kvbench::accumulate_and_evict`) mutates scores and positions and is opaque to torch.compile, so
the compiled step calls it without a graph break and launches the kernel as written (reads `seen` on the
device: no host sync, capturable in a CUDA graph).
"""

from __future__ import annotations

import torch

from kvbench import kernels
from kvbench.cache import batch_head_index

# Slots a program takes per tile, and its warps: 8 slots a thread, so the lane state and a tile's loads stay
# in registers whatever the row's length (offline sm_90 compile, Triton 3.7: 72 registers with int64
# positions, 64 with int32, no spills; tests/test_score_eviction.py). Not yet timed.
BLOCK_SLOTS = 1024
NUM_WARPS = 4


def accumulate_and_evict_reference(
    scores: torch.Tensor,
    received: torch.Tensor,
    positions: torch.Tensor,
    seen: torch.Tensor,
    recent: int,
    capacity: int,
) -> None:
    """The operation as PyTorch ops (the module doc gives the contract): H2O's decode step as it was written."""
    scores[:, :, : received.shape[-1]] += received
    held = positions[:, :, :capacity]
    live = held >= 0
    protected = ~live | (held >= seen.view(-1, 1, 1) - recent)
    victim = scores[:, :, :capacity].masked_fill(protected, float("inf")).argmin(dim=-1)
    rows, heads = batch_head_index(victim)
    positions[rows, heads, victim] = torch.where(live.all(dim=-1), -1, positions[rows, heads, victim])


def _kernel_takes(scores: torch.Tensor, received: torch.Tensor, positions: torch.Tensor) -> bool:
    """Whether the kernel's layout fits: float32 scores, int32 or int64 positions, each row's slots adjacent."""
    return (
        scores.dtype == received.dtype == torch.float32
        and positions.dtype in (torch.int32, torch.int64)
        and all(t.stride(-1) == 1 for t in (scores, received, positions))
    )


@torch.library.custom_op("kvbench::accumulate_and_evict", mutates_args=("scores", "positions"))
def _accumulate_and_evict_op(
    scores: torch.Tensor,
    received: torch.Tensor,
    positions: torch.Tensor,
    seen: torch.Tensor,
    recent: int,
    capacity: int,
) -> None:
    if kernels._use_triton(scores):
        _launch(scores, received, positions, seen, recent, capacity)
        return
    accumulate_and_evict_reference(scores, received, positions, seen, recent, capacity)


@_accumulate_and_evict_op.register_fake
def _(
    scores: torch.Tensor,
    received: torch.Tensor,
    positions: torch.Tensor,
    seen: torch.Tensor,
    recent: int,
    capacity: int,
) -> None:
    return None


def accumulate_and_evict(
    scores: torch.Tensor,
    received: torch.Tensor,
    positions: torch.Tensor,
    seen: torch.Tensor,
    recent: int,
    capacity: int,
) -> None:
    """`accumulate_and_evict_reference`'s result, written into scores and positions in place: through the
    operator (one kernel launch on CUDA) where the layout fits, else as the reference's PyTorch ops."""
    b, h, s = scores.shape
    if (
        received.shape[:2] != (b, h)
        or positions.shape[:2] != (b, h)
        or seen.shape != (b,)
        or received.shape[-1] > s
        or not 1 <= capacity <= min(s, positions.shape[-1])
    ):
        raise ValueError(
            f"accumulate_and_evict takes scores [B, H, S], received [B, H, R <= S], positions [B, H, P], seen [B]"
            f" and 1 <= capacity <= min(S, P): got {tuple(scores.shape)}, {tuple(received.shape)},"
            f" {tuple(positions.shape)}, {tuple(seen.shape)}, capacity={capacity}"
        )
    if not _kernel_takes(scores, received, positions):
        accumulate_and_evict_reference(scores, received, positions, seen, recent, capacity)
        return
    torch.ops.kvbench.accumulate_and_evict(scores, received, positions, seen, recent, capacity)


if kernels.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _accumulate_and_evict_kernel(
        scores_ptr,
        received_ptr,
        positions_ptr,
        seen_ptr,
        heads,
        scores_len,
        received_len,
        positions_len,
        capacity,
        recent,
        scores_sb,
        scores_sh,
        received_sb,
        received_sh,
        positions_sb,
        positions_sh,
        seen_stride,
        BLOCK: tl.constexpr,
    ):
        """Program r takes row r: sequence r // heads, head r % heads. Each lane keeps the lowest masked score
        it has seen and its first slot (its slots come in increasing order, and only a strictly lower score
        replaces the kept one); one reduction over the lanes at the end gives the row's first minimum."""
        row = tl.program_id(0)
        # int64 offsets: sequence * stride passes 2^31 elements in large batches.
        sequence = (row // heads).to(tl.int64)
        head = (row % heads).to(tl.int64)
        scores_row = scores_ptr + sequence * scores_sb + head * scores_sh
        received_row = received_ptr + sequence * received_sb + head * received_sh
        positions_row = positions_ptr + sequence * positions_sb + head * positions_sh
        # Positions from seen - recent on are the recent window: never evicted.
        window_start = tl.load(seen_ptr + sequence * seen_stride).to(tl.int64) - recent
        lane = tl.arange(0, BLOCK)
        lowest = tl.full([BLOCK], float("inf"), tl.float32)
        # A lane that keeps +inf keeps its first slot: where every lane does, the row's argmin is slot 0.
        lowest_slot = lane
        empty_seen = tl.zeros([BLOCK], tl.int32)
        for start in range(0, tl.maximum(received_len, capacity), BLOCK):
            slot = start + lane
            accumulated = slot < received_len
            candidate = slot < capacity
            # Loads masked by the buffers' lengths (multiples of 16, which the launcher marks), not by
            # capacity: a mask at an odd slot would split the loads into one element each.
            score = tl.load(scores_row + slot, mask=slot < scores_len, other=0.0)
            # A select, not `+ 0.0` on the other slots: -0.0 + 0.0 is +0.0.
            score = tl.where(accumulated, score + tl.load(received_row + slot, mask=accumulated, other=0.0), score)
            tl.store(scores_row + slot, score, mask=accumulated)
            position = tl.load(positions_row + slot, mask=slot < positions_len, other=-1).to(tl.int64)
            # Slots past capacity count as empty, which protects them; they are not counted as empty below.
            position = tl.where(candidate, position, -1)
            live = position >= 0
            empty_seen |= (candidate & ~live).to(tl.int32)
            masked = tl.where(~live | (position >= window_start), float("inf"), score)
            lower = masked < lowest
            lowest = tl.where(lower, masked, lowest)
            lowest_slot = tl.where(lower, slot, lowest_slot)
        minimum = tl.min(lowest, axis=0)
        # Each lane at the minimum offers its first slot there; the lowest of those is the row's first.
        victim = tl.min(tl.where(lowest == minimum, lowest_slot, 2**31 - 1), axis=0)
        every_slot_live = tl.max(empty_seen, axis=0) == 0
        tl.store(positions_row + victim, tl.full([], -1, tl.int64), mask=every_slot_live)

    def _launch(
        scores: torch.Tensor,
        received: torch.Tensor,
        positions: torch.Tensor,
        seen: torch.Tensor,
        recent: int,
        capacity: int,
    ) -> None:
        """The kernel over every (sequence, head) row: launched by Triton itself (the operator is opaque)."""
        b, h, _ = scores.shape
        _accumulate_and_evict_kernel[(b * h,)](
            scores, received, positions, seen,
            h, scores.shape[-1], received.shape[-1], positions.shape[-1], capacity, recent,
            *scores.stride()[:2], *received.stride()[:2], *positions.stride()[:2], seen.stride(0),
            BLOCK=BLOCK_SLOTS,
            num_warps=NUM_WARPS,
        )  # fmt: skip

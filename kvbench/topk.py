"""The k largest int64 keys of each row, in one small Triton program per row on CUDA.

Why: `torch.topk` on CUDA runs a radix select (2 bits a pass, so 32 passes over int64 keys) and then a
radix sort of what it selected, one thread block per row. A method that picks victims per (sequence, KV
head) row every decode step (Scissorhands: 512 of 2,048 slots per row, 8 rows at batch 1) pays that in
every layer: on the H200 the two kernels took 34.5 + 26.2 us a layer, about 1.9 ms of a 7.7 ms step
(`benchmarks/profile_step.py`, commit 6cf246b). Here one program holds its row in registers, packs each
key with its slot index into one int64 (key * 2^b + slot, b = the bits of the padded row length) and runs
Triton's bitonic top-k (`tl.topk`) on the packed values, so the slot travels with its key.

`largest_keys(keys, k)` -> (values [..., k], slots [..., k]): descending; among equal keys the kernel
returns the higher slot first and the reference (`torch.topk`) any of them. The kernel path needs every
key within +-2^(62 - b) (checked by the callers' key layouts, not at run time: the step has no host sync)
and rows of at most MAX_KERNEL_SLOTS; longer rows and other devices take the reference.
"""

from __future__ import annotations

import torch

from kvbench import kernels

MAX_KERNEL_SLOTS = 16384  # 2^14: keys within +-2^48 pack without overflow; a row's registers stay small


def float_order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the float32 `scores` (no NaN): the bits as int32, the magnitude bits of
    negative values flipped so that a more negative value gets a smaller key; within +-2^31."""
    bits = scores.float().contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()


def largest_keys_reference(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return keys.topk(k, dim=-1)


if kernels.triton is not None:
    import triton
    import triton.language as tl

    from kvbench.kernels import wrap_triton

    @triton.jit
    def _largest_keys_kernel(
        keys_ptr,
        values_ptr,
        slots_ptr,
        S,
        K,
        BITS: tl.constexpr,
        S_PAD: tl.constexpr,
        K_PAD: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, S_PAD)
        keys = tl.load(keys_ptr + row * S + offs, mask=offs < S, other=0)
        # Padding packs below every real packed value (those lie within +-2^62): int64's minimum.
        lowest = tl.full([S_PAD], -(2**63), tl.int64)
        packed = tl.where(offs < S, keys * (1 << BITS) + offs, lowest)
        top = tl.topk(packed, K_PAD)
        out = tl.arange(0, K_PAD)
        # key * 2^b + slot with 0 <= slot < 2^b: an arithmetic shift gives the key back, the mask the slot.
        tl.store(values_ptr + row * K + out, top >> BITS, mask=out < K)
        tl.store(slots_ptr + row * K + out, top & ((1 << BITS) - 1), mask=out < K)

    def _largest_keys_triton(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = keys.shape[-1]
        rows = keys.reshape(-1, s).contiguous()
        values = torch.empty(rows.shape[0], k, dtype=torch.int64, device=keys.device)
        slots = torch.empty_like(values)
        # At least 2 each: Triton's top-k of one element reduces the row away and does not compile.
        s_pad = max(2, triton.next_power_of_2(s))
        wrap_triton(_largest_keys_kernel)[(rows.shape[0],)](
            rows,
            values,
            slots,
            s,
            k,
            BITS=s_pad.bit_length() - 1,
            S_PAD=s_pad,
            K_PAD=max(2, triton.next_power_of_2(k)),
            # Chosen by code length, not yet timed: 2,048 slots take 12,352 PTX lines at 4 warps, 7,324 at 8.
            num_warps=4 if s_pad <= 1024 else 8,
        )
        return values.view(*keys.shape[:-1], k), slots.view(*keys.shape[:-1], k)


@kernels._make_op("kvbench::largest_keys")
def _largest_keys_op(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kernels._use_triton(keys) and keys.shape[-1] <= MAX_KERNEL_SLOTS:
        return _largest_keys_triton(keys, k)
    return largest_keys_reference(keys, k)


def largest_keys(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of int64 `keys` [..., S] and their slots, in descending order (the
    module doc gives the kernel's range of keys)."""
    if keys.dtype != torch.int64 or not 1 <= k <= keys.shape[-1]:
        raise ValueError(f"largest_keys takes int64 keys and 1 <= k <= {keys.shape[-1]}: got {keys.dtype}, k={k}")
    return torch.ops.kvbench.largest_keys(keys, k)

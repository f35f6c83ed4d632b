"""A decode step's new keys and values, rotated (QuaRot) and quantized per token, in one kernel launch.

Why: in the compiled decode step, `kvbench.quant.quantize` of one token per KV head is a few small
Inductor kernels per tensor, and QuaRot's fast Hadamard transform (`kvbench.hadamard.hadamard_transform`)
adds about seven more per tensor (one per butterfly stage). At batch 1 each is a launch-bound couple of
microseconds: QuaRot's K and V took 16.5 us a layer more than RTN's, about 0.5 ms of a 32-layer step
(H200, `benchmarks/profile_step.py`). `quantize_tokens` does both tensors in one Triton launch on CUDA:
the rotation as one tensor-core product with the +-1 Sylvester matrix (exact products, float32 sums),
scaled by 1 / sqrt(D) and rounded to the model's dtype as the transform's output is, then
`kvbench.quant.quantize`'s per-token arithmetic and the planar packing. It covers the layouts that
QuaRot and its RTN ablation store (per-token groups, 4 or 2 bits; 2 since session 59, not yet timed);
`fits` says when. Elsewhere (CPU, other layouts) the reference runs: the fast transform, then `quantize`.
Measured (H200, profile_step.py, batch 1, 32k): 4.6 us a layer with the rotation (the matrix held as int8),
2.9 without; QuaRot-4's step 6.43 -> 6.19 ms at batch 1 and 9.08 -> 8.18 ms at batch 4 (benchmarks/README.md,
"One launch for the new token"). Before session 59 QuaRot-2's and RTN-2's decode tokens took the reference in
the step (the butterfly's kernels and `quantize`'s).

The decode path writes the codes and parameters straight into the stores (`quantize_tokens_into`: each
sequence's token at its own slot). Before, the kernel returned six tensors and six indexed writes put them
in the stores: in the H200 profile of RTN-4 at batch 1 those were 6 of the 24 kernels of a layer (1 us
each, plus their gaps); now none (not yet timed). The operator is opaque to torch.compile: Triton launches
its kernel itself.

Exactness against the reference: without a rotation the kernel does `quantize`'s float32 operations in
the same order (minimum and maximum, clip, float16 parameters rounded outward, division rounded to
nearest, round half to even), so codes and parameters are equal bit for bit. With one, its float32 sums
of +-x come in another order than the butterfly's, so a rotated value can differ from the transform's in
its last bit (then rarely a code by one step); the tests bound that. (Measured: none did, on the GPU
check of 4 x 8 bf16 tokens and in every interpreted case.)
"""

from __future__ import annotations

import torch

from kvbench import kernels
from kvbench.hadamard import hadamard_transform, is_power_of_two
from kvbench.quant import MIN_SCALE, Quantized, is_planar, packed_width, quantize

BLOCK_ROWS = 16  # (sequence, KV head) rows a program quantizes: the smallest tensor-core tile's height


def fits(bits: int, axis: str, group: int, dim: int) -> bool:
    """Whether the kernel takes this layout: per-token groups of 4- or 2-bit planar codes, head_dim a power
    of two (a Triton block) with groups that tile it."""
    return is_planar(bits) and axis == "token" and is_power_of_two(dim) and dim >= 16 and dim % group == 0


def quantize_tokens_reference(
    keys: torch.Tensor, values: torch.Tensor, rotation: torch.Tensor | None, bits: int, group: int, clip: float
) -> tuple[Quantized, Quantized]:
    """keys and values [..., T, D] rotated by `rotation` where given (the +-1 Sylvester matrix, as
    `hadamard_matrix(D, normalized=False)`; applied as the fast transform, which equals x R / sqrt(D)), then
    quantized per token in groups of `group` channels."""
    if rotation is not None:
        keys, values = hadamard_transform(keys), hadamard_transform(values)
    return quantize(keys, bits, "token", group, clip), quantize(values, bits, "token", group, clip)


STORES = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")


@torch.library.custom_op("kvbench::quantize_tokens_into", mutates_args=STORES)
def _quantize_tokens_into_op(
    keys: torch.Tensor,
    values: torch.Tensor,
    rotation: torch.Tensor | None,
    slots: torch.Tensor,
    bits: int,
    group: int,
    clip: float,
    key_codes: torch.Tensor,
    key_scale: torch.Tensor,
    key_zero: torch.Tensor,
    value_codes: torch.Tensor,
    value_scale: torch.Tensor,
    value_zero: torch.Tensor,
) -> None:
    stores = (key_codes, key_scale, key_zero, value_codes, value_scale, value_zero)
    if kernels._use_triton(keys):
        _launch_quantize(keys, values, rotation, slots, bits, clip, *stores)
        return
    _write_reference(keys, values, rotation, bits, group, clip, stores, slots)


@_quantize_tokens_into_op.register_fake
def _(keys, values, rotation, slots, bits, group, clip, *stores) -> None:
    return None


def quantize_tokens_into(
    keys: torch.Tensor,
    values: torch.Tensor,
    rotation: torch.Tensor | None,
    bits: int,
    group: int,
    clip: float,
    key_store: Quantized,
    value_store: Quantized,
    slots: torch.Tensor,
) -> None:
    """`quantize_tokens_reference` of one token per head, keys and values [B, H, 1, D], written straight into
    slot slots[b] of each sequence's rows of the stores (codes [B, H, S, D bits / 8], and scale and zero-point rows
    [B, H, S, D/group]: per-token parameters, a slot's at its own row), slots clamped to the stores' (a
    finished sequence's extra steps rewrite the last), in one launch where the layout `fits` and Triton runs: no
    separate writes of the six tensors after it (six small kernels a layer in the compiled step). The stores
    are modified in place; keys' and values' must share one layout."""
    tokens, dim = keys.shape[2:]
    stores = (*key_store, *value_store)
    layouts = {(t.shape, t.stride()) for t in (key_store.codes, value_store.codes)}
    params = {(t.shape, t.stride()) for t in stores[1:3] + stores[4:]}
    codes, scale = key_store.codes, key_store.scale
    one_launch = (
        fits(bits, "token", group, dim)  # 4- or 2-bit planar codes: the kernel packs nothing else
        and keys.shape == values.shape
        and keys.dtype == values.dtype
        and tokens == 1
        and len(layouts) == 1
        and len(params) == 1
        and all(t.stride(-1) == 1 for t in stores)
        and codes.shape[:2] == keys.shape[:2]
        and codes.shape[-1] == packed_width(dim, bits)
        and scale.shape[:3] == codes.shape[:3]
        and scale.shape[-1] * group == dim
    )
    if rotation is not None and (rotation.shape != (dim, dim) or not rotation.is_contiguous()):
        raise ValueError(f"rotation {tuple(rotation.shape)} for head_dim {dim}: a contiguous [D, D] matrix")
    if not one_launch:
        _write_reference(keys, values, rotation, bits, group, clip, stores, slots)
        return
    torch.ops.kvbench.quantize_tokens_into(keys, values, rotation, slots, bits, group, float(clip), *stores)


def _write_reference(keys, values, rotation, bits, group, clip, stores, slots) -> None:
    """`quantize_tokens_reference`, then its six tensors indexed into the stores at slots [slots[b], + T)."""
    b, h, tokens = keys.shape[:3]
    key_q, value_q = quantize_tokens_reference(keys, values, rotation, bits, group, clip)
    positions = (slots.view(b, 1, 1) + torch.arange(tokens, device=keys.device)).clamp(0, stores[0].shape[2] - 1)
    index = (torch.arange(b, device=keys.device).view(b, 1, 1), torch.arange(h, device=keys.device).view(1, h, 1))
    for store, new in zip(stores, (*key_q, *value_q), strict=True):
        store[(*index, positions)] = new


def quantize_tokens(
    keys: torch.Tensor, values: torch.Tensor, rotation: torch.Tensor | None, bits: int, group: int, clip: float
) -> tuple[Quantized, Quantized]:
    """`quantize_tokens_reference`'s result, in one launch where the layout `fits` and Triton runs (through
    `quantize_tokens_into`, each token a store of one slot). keys and values [..., T, D] share a shape and
    dtype; rotation: None or a contiguous [D, D] matrix."""
    *lead, dim = keys.shape
    if keys.shape != values.shape or keys.dtype != values.dtype or not fits(bits, "token", group, dim):
        return quantize_tokens_reference(keys, values, rotation, bits, group, clip)
    rows = keys.numel() // dim
    device = keys.device
    codes = [torch.empty(rows, 1, 1, packed_width(dim, bits), dtype=torch.uint8, device=device) for _ in range(2)]
    params = [torch.empty(rows, 1, 1, dim // group, dtype=torch.float16, device=device) for _ in range(4)]
    key_q, value_q = Quantized(codes[0], *params[:2]), Quantized(codes[1], *params[2:])
    flat = [x.reshape(rows, 1, 1, dim) for x in (keys, values)]
    quantize_tokens_into(
        *flat, rotation, bits, group, clip, key_q, value_q, torch.zeros(rows, dtype=torch.long, device=device)
    )
    return tuple(Quantized(*(t.view(*lead, t.shape[-1]) for t in q)) for q in (key_q, value_q))


if kernels.triton is not None:
    import triton
    import triton.language as tl

    _SMALLEST_STEP = tl.constexpr(MIN_SCALE)

    @triton.jit
    def _to_param(x, DOWN: tl.constexpr):
        """float32 -> float16 rounded toward -inf (DOWN) or +inf: `kvbench.quant._round_to_param`. The
        nearest float16, stepped once outward (its bit pattern moved by one) where it lies on the wrong side."""
        rounded = x.to(tl.float16)
        wrong = rounded.to(tl.float32) > x if DOWN else rounded.to(tl.float32) < x
        bits = rounded.to(tl.int16, bitcast=True).to(tl.int32)
        # One float16 step toward -inf (DOWN) or +inf: a positive value's pattern moves down (up), a negative
        # one's up (down); zero goes to the smallest subnormal of the outward sign (0x8001 or 0x0001).
        if DOWN:
            stepped = tl.where(rounded > 0, bits - 1, tl.where(rounded < 0, bits + 1, -32767))
        else:
            stepped = tl.where(rounded > 0, bits + 1, tl.where(rounded < 0, bits - 1, 1))
        return tl.where(wrong, stepped, bits).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        """float32 x rounded to the nearest `dtype` number (ties to even), returned as float32. For bfloat16
        by the bits (add half a bfloat16 step less one, plus the kept last bit, then cut): Triton's
        interpreter, which the tests run, truncates or misrounds float32 -> bfloat16 casts."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _quantize_rows(
        x_ptr,
        codes_ptr,
        scale_ptr,
        zero_ptr,
        rotation_ptr,
        r,
        live,
        code_rows,
        param_rows,
        rotation_scale,
        clip,
        DIM: tl.constexpr,
        GROUP: tl.constexpr,
        BITS: tl.constexpr,
        ROTATE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """Rows r of x (live ones) quantized to BITS (4 or 2) and packed, written at code_rows and param_rows
        of the stores."""
        groups: tl.constexpr = DIM // GROUP
        width: tl.constexpr = DIM // 4  # channels per plane
        levels: tl.constexpr = (1 << BITS) - 1
        d = tl.arange(0, DIM)
        x = tl.load(x_ptr + r[:, None] * DIM + d[None, :], mask=live[:, None], other=0.0)
        if ROTATE:
            rotation = tl.load(rotation_ptr + d[:, None] * DIM + d[None, :])
            if UPCAST:  # float32 inputs, and bfloat16 under the interpreter (whose bfloat16 dots are wrong)
                rotated = tl.dot(x.to(tl.float32), rotation.to(tl.float32), input_precision="ieee")
            else:  # +-1 is exact in 16 bits: exact products, float32 sums on the tensor cores
                rotated = tl.dot(x, rotation.to(x.dtype))
            # The transform's output is in the model's dtype (QuaRot rotates in float32 and casts back).
            y = _round_to(rotated * rotation_scale, x.dtype)
        else:
            y = x.to(tl.float32)
        grouped = tl.reshape(y, [BLOCK_R, groups, GROUP])
        zero = _to_param(tl.min(grouped, axis=2) * clip, True)
        high = tl.max(grouped, axis=2) * clip
        step = tl.maximum(tl.math.div_rn(high - zero.to(tl.float32), levels * 1.0), _SMALLEST_STEP)
        scale = _to_param(step, False)
        ratio = tl.math.div_rn(grouped - zero.to(tl.float32)[:, :, None], scale.to(tl.float32)[:, :, None])
        # Round half to even, as torch.round: adding and subtracting 1.5 * 2^23 leaves the nearest integer
        # (exact for |ratio| < 2^22, which the clamp to [-1, levels + 1] keeps).
        ratio = tl.minimum(tl.maximum(ratio, -1.0), levels + 1.0)
        nearest = (ratio + 12582912.0) - 12582912.0
        codes = tl.reshape(tl.minimum(tl.maximum(nearest, 0.0), levels * 1.0).to(tl.int32), [BLOCK_R, DIM])
        # Planar packing (`kvbench.quant.pack`), planes 2a + c of element e (channel (2a + c) * width + e) as
        # [BLOCK_R, width, a, c]. 4 bits: byte 2e + a holds planes 2a (low nibble) and 2a + 1. 2 bits: byte e
        # holds plane p at bits 2p.
        by_plane = tl.permute(tl.reshape(codes, [BLOCK_R, 2, 2, width]), (0, 3, 1, 2))
        even, odd = tl.split(by_plane)  # planes 2a and 2a + 1, [BLOCK_R, width, a]
        if BITS == 4:
            packed = tl.reshape(even | (odd << 4), [BLOCK_R, DIM // 2]).to(tl.uint8)
        else:
            low, high = tl.split(even | (odd << 2))  # planes 0 | 1 << 2 and 2 | 3 << 2, [BLOCK_R, width]
            packed = (low | (high << 4)).to(tl.uint8)
        b = tl.arange(0, DIM * BITS // 8)
        tl.store(codes_ptr + code_rows[:, None] + b[None, :], packed, mask=live[:, None])
        g = tl.arange(0, groups)
        tl.store(scale_ptr + param_rows[:, None] + g[None, :], scale, mask=live[:, None])
        tl.store(zero_ptr + param_rows[:, None] + g[None, :], zero, mask=live[:, None])

    @triton.jit
    def _quantize_tokens_kernel(
        k_ptr,
        v_ptr,
        rotation_ptr,
        kc_ptr,
        ks_ptr,
        kz_ptr,
        vc_ptr,
        vs_ptr,
        vz_ptr,
        rows,
        rotation_scale,
        clip,
        heads,
        slot_ptr,
        last_slot,
        code_sb,
        code_sh,
        code_ss,
        param_sb,
        param_sh,
        param_ss,
        DIM: tl.constexpr,
        GROUP: tl.constexpr,
        BITS: tl.constexpr,
        ROTATE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """Program (i, 0) quantizes key rows [i * BLOCK_R, (i + 1) * BLOCK_R), program (i, 1) those values;
        row r is sequence r // heads and head r % heads, written into the stores [B, heads, S, ...] (keys'
        and values' of one layout, these strides) at slot slot_ptr[b], clamped to [0, last_slot], of its
        sequence b."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = r < rows
        sequence = (r // heads).to(tl.int64)
        head = (r % heads).to(tl.int64)
        slot = tl.minimum(tl.maximum(tl.load(slot_ptr + sequence, mask=live, other=0), 0), last_slot)
        code_rows = sequence * code_sb + head * code_sh + slot * code_ss
        param_rows = sequence * param_sb + head * param_sh + slot * param_ss
        # Python floats arrive as float64 under torch.compile: the reference multiplies in float32.
        rotation_scale = tl.cast(rotation_scale, tl.float32)
        clip = tl.cast(clip, tl.float32)
        if tl.program_id(1) == 0:
            _quantize_rows(k_ptr, kc_ptr, ks_ptr, kz_ptr, rotation_ptr, r, live, code_rows, param_rows,
                           rotation_scale, clip, DIM, GROUP, BITS, ROTATE, UPCAST, BLOCK_R)  # fmt: skip
        else:
            _quantize_rows(v_ptr, vc_ptr, vs_ptr, vz_ptr, rotation_ptr, r, live, code_rows, param_rows,
                           rotation_scale, clip, DIM, GROUP, BITS, ROTATE, UPCAST, BLOCK_R)  # fmt: skip

    def _launch_quantize(keys, values, rotation, slots, bits, clip, kc, ks, kz, vc, vs, vz) -> None:
        """The kernel over keys and values [B, H, 1, D] into the stores at slots [B]: launched by Triton itself
        (the operator is opaque)."""
        b, h, _, dim = keys.shape
        grid = (triton.cdiv(b * h, BLOCK_ROWS), 2)
        _quantize_tokens_kernel[grid](
            keys.contiguous(), values.contiguous(),  # no-ops for one token per head
            keys if rotation is None else rotation,  # never read without ROTATE
            kc, ks, kz, vc, vs, vz,
            b * h, dim**-0.5, clip, h, slots.contiguous(), kc.shape[2] - 1,
            *kc.stride()[:3], *ks.stride()[:3],
            DIM=dim,
            GROUP=dim // ks.shape[-1],
            BITS=bits,
            ROTATE=rotation is not None,
            UPCAST=keys.dtype == torch.float32 or kernels._upcast_and_precision(keys.dtype)[0],
            BLOCK_R=BLOCK_ROWS,
            num_warps=4,
        )  # fmt: skip

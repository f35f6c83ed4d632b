"""A decode step's new keys and values, rotated (QuaRot) and quantized per token, in one kernel launch.

Why: in the compiled decode step, `kvbench.quant.quantize` of one token per KV head is a few small
Inductor kernels per tensor, and QuaRot's fast Hadamard transform (`kvbench.hadamard.hadamard_transform`)
adds about seven more per tensor (one per butterfly stage). At batch 1 each is a launch-bound couple of
microseconds: QuaRot's K and V took 16.5 us a layer more than RTN's, about 0.5 ms of a 32-layer step
(H200, `benchmarks/profile_step.py`). `quantize_tokens` does both tensors in one Triton launch on CUDA:
the rotation as one tensor-core product with the +-1 Sylvester matrix (exact products, float32 sums),
scaled by 1 / sqrt(D) and rounded to the model's dtype as the transform's output is, then
`kvbench.quant.quantize`'s per-token arithmetic and the planar 4-bit packing. It covers the layout that
QuaRot and its RTN ablation store (per-token groups, 4 bits); `fits` says when. Elsewhere (CPU, other
layouts) the reference runs: the fast transform, then `quantize`. Measured (H200, profile_step.py, batch 1,
32k): 4.6 us a layer with the rotation (the matrix held as int8), 2.9 without; QuaRot-4's step 6.43 ->
6.19 ms at batch 1 and 9.08 -> 8.18 ms at batch 4 (benchmarks/README.md, "One launch for the new token").

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
from kvbench.quant import MIN_SCALE, Quantized, is_planar, quantize

BLOCK_ROWS = 16  # (sequence, KV head) rows a program quantizes: the smallest tensor-core tile's height


def fits(bits: int, axis: str, group: int, dim: int) -> bool:
    """Whether the kernel takes this layout: per-token groups of 4-bit planar codes, head_dim a power of
    two (a Triton block) with groups that tile it."""
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


@kernels._make_op("kvbench::quantize_tokens", dependent=True)
def _quantize_tokens_op(
    keys: torch.Tensor, values: torch.Tensor, rotation: torch.Tensor | None, bits: int, group: int, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernels._use_triton(keys):
        return _quantize_tokens_triton(keys, values, rotation, group, clip)
    key_q, value_q = quantize_tokens_reference(keys, values, rotation, bits, group, clip)
    return (*key_q, *value_q)


def quantize_tokens(
    keys: torch.Tensor, values: torch.Tensor, rotation: torch.Tensor | None, bits: int, group: int, clip: float
) -> tuple[Quantized, Quantized]:
    """`quantize_tokens_reference`'s result, in one launch where the layout `fits` and Triton runs.
    keys and values [..., T, D] share a shape and dtype; rotation: None or a contiguous [D, D] matrix."""
    dim = keys.shape[-1]
    if keys.shape != values.shape or keys.dtype != values.dtype or not fits(bits, "token", group, dim):
        return quantize_tokens_reference(keys, values, rotation, bits, group, clip)
    if rotation is not None and (rotation.shape != (dim, dim) or not rotation.is_contiguous()):
        raise ValueError(f"rotation {tuple(rotation.shape)} for head_dim {dim}: a contiguous [D, D] matrix")
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = kernels.operator("quantize_tokens")(
        keys, values, rotation, bits, group, float(clip)
    )
    return Quantized(key_codes, key_scale, key_zero), Quantized(value_codes, value_scale, value_zero)


if kernels.triton is not None:
    import triton
    import triton.language as tl

    _await_previous_kernel = kernels.await_previous_kernel  # a plain global: jit code calls it by name
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
        first_row,
        rows,
        rotation_scale,
        clip,
        DIM: tl.constexpr,
        GROUP: tl.constexpr,
        ROTATE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        groups: tl.constexpr = DIM // GROUP
        width: tl.constexpr = DIM // 4  # channels per plane
        levels: tl.constexpr = 15
        r = first_row + tl.arange(0, BLOCK_R)
        d = tl.arange(0, DIM)
        live = r < rows
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
        # Planar packing (`kvbench.quant.pack`): byte 2e holds planes 0 (low nibble) and 1 of channel e of a
        # plane, byte 2e + 1 planes 2 and 3. Channel (2p + h) * width + e goes to byte 2e + p, nibble h.
        by_byte = tl.permute(tl.reshape(codes, [BLOCK_R, 2, 2, width]), (0, 3, 1, 2))
        low, high_nibble = tl.split(by_byte)
        packed = tl.reshape(low | (high_nibble << 4), [BLOCK_R, DIM // 2]).to(tl.uint8)
        b = tl.arange(0, DIM // 2)
        tl.store(codes_ptr + r[:, None] * (DIM // 2) + b[None, :], packed, mask=live[:, None])
        g = tl.arange(0, groups)
        tl.store(scale_ptr + r[:, None] * groups + g[None, :], scale, mask=live[:, None])
        tl.store(zero_ptr + r[:, None] * groups + g[None, :], zero, mask=live[:, None])

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
        DIM: tl.constexpr,
        GROUP: tl.constexpr,
        ROTATE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_R: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (i, 0) quantizes key rows [i * BLOCK_R, (i + 1) * BLOCK_R), program (i, 1) those values."""
        _await_previous_kernel(PDL)
        first_row = tl.program_id(0) * BLOCK_R
        # Python floats arrive as float64 under torch.compile: the reference multiplies in float32.
        rotation_scale = tl.cast(rotation_scale, tl.float32)
        clip = tl.cast(clip, tl.float32)
        if tl.program_id(1) == 0:
            _quantize_rows(k_ptr, kc_ptr, ks_ptr, kz_ptr, rotation_ptr, first_row, rows, rotation_scale, clip,
                           DIM, GROUP, ROTATE, UPCAST, BLOCK_R)  # fmt: skip
        else:
            _quantize_rows(v_ptr, vc_ptr, vs_ptr, vz_ptr, rotation_ptr, first_row, rows, rotation_scale, clip,
                           DIM, GROUP, ROTATE, UPCAST, BLOCK_R)  # fmt: skip

    def _quantize_tokens_triton(
        keys: torch.Tensor, values: torch.Tensor, rotation: torch.Tensor | None, group: int, clip: float
    ) -> tuple[torch.Tensor, ...]:
        *lead, dim = keys.shape
        keys, values = keys.contiguous(), values.contiguous()  # a no-op for one token per head
        rows = keys.numel() // dim
        codes = [torch.empty(*lead, dim // 2, dtype=torch.uint8, device=keys.device) for _ in range(2)]
        params = [torch.empty(*lead, dim // group, dtype=torch.float16, device=keys.device) for _ in range(4)]
        grid = (triton.cdiv(rows, BLOCK_ROWS), 2)
        kernels.launch(_quantize_tokens_kernel, grid, keys.device)(
            keys,
            values,
            keys if rotation is None else rotation,  # never read without ROTATE
            codes[0],
            params[0],
            params[1],
            codes[1],
            params[2],
            params[3],
            rows,
            dim**-0.5,
            clip,
            DIM=dim,
            GROUP=group,
            ROTATE=rotation is not None,
            UPCAST=keys.dtype == torch.float32 or kernels._upcast_and_precision(keys.dtype)[0],
            BLOCK_R=BLOCK_ROWS,
            num_warps=4,
        )
        return codes[0], params[0], params[1], codes[1], params[2], params[3]

"""Integer quantization of KV tensors: asymmetric round-to-nearest with per-group scales and zero-points, and
codes packed into bytes.

A tensor `x` [..., T, D] (T tokens, D channels) is cut into groups that share one scale and one zero-point:
- `axis="token"`: `group` consecutive channels of one token (KIVI's values; QuaRot's K and V with
  group = head_dim). Parameters have shape [..., T, D / group].
- `axis="channel"`: `group` consecutive tokens of one channel (KIVI's keys; ZipCache's keys, one group per
  set of tokens). Parameters have shape [..., T / group, D].
A value is stored as `code = round((x - zero) / scale)`, clamped to [0, 2^bits - 1], and read back as
`code * scale + zero`. `zero` is the group's minimum and `scale` its range over 2^bits - 1 levels (times
`clip_ratio`, QuaRot's range shrink, when < 1). Both are stored in float16, as KIVI and QuaRot store them;
they are rounded outward (zero down, scale up), so every value of the group stays inside the representable
range and, without clipping, the round trip is off by at most half a step (scale / 2).

Codes are packed along the last dimension, little-endian. 3- and 8-bit rows are one bit stream: code i
occupies bits [i * bits, (i + 1) * bits) of the row (eight 3-bit codes per 3 bytes, some straddling a byte
boundary; 8-bit codes are whole bytes). 2- and 4-bit rows are planar, for the decode kernel
(`kvbench.plane_kernel`): the D channels are 4 planes of W = D / 4, and element e of the row (a 16-bit word
of four 4-bit codes, or a byte of four 2-bit codes) holds channel g * W + e in bits [g * bits, (g + 1) *
bits), g = 0..3. The kernel then turns a 32-bit register of elements into 16-bit floats per plane with one
shift and one mask-or per pair, and each plane is a contiguous block of channels that it multiplies on the
tensor cores as it is. Either way a row of D codes takes D * bits / 8 bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BITS = (2, 3, 4, 8)
AXES = ("token", "channel")
PARAM_DTYPE = torch.float16
# The smallest step: a group whose values are all equal still gets a finite, positive scale.
MIN_SCALE = 2.0**-24


class Quantized(NamedTuple):
    """Packed codes [..., T, D * bits / 8] (uint8) and the float16 `scale` and `zero` of every group."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def packed_width(channels: int, bits: int) -> int:
    """Bytes one row of `channels` codes takes; rows are whole 8-code chunks (`bits` bytes each)."""
    if channels % 8:
        raise ValueError(f"rows of {channels} codes: packing needs a multiple of 8")
    return channels * bits // 8


PLANES = 4  # planes of a planar row (2- and 4-bit codes)


def is_planar(bits: int) -> bool:
    return bits in (2, 4)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (each < 2^bits) to packed bytes [..., n * bits / 8] (the module doc's layout)."""
    if bits == 8:
        return codes.to(torch.uint8)
    packed_width(codes.shape[-1], bits)
    if is_planar(bits):  # element e's codes are channels e, W + e, 2W + e, 3W + e: a stream in that order
        codes = codes.unflatten(-1, (PLANES, -1)).transpose(-1, -2).flatten(-2)
    chunks = codes.to(torch.int64).unflatten(-1, (-1, 8))  # 8 codes = `bits` whole bytes
    shifts = torch.arange(8, device=codes.device) * bits
    words = (chunks << shifts).sum(dim=-1, keepdim=True)  # at most 32 bits for bits <= 4
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 bytes [..., n * bits / 8] to uint8 codes [..., n]."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # whole codes per byte: shift the bytes themselves (cheaper than 64-bit words)
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        stream = ((packed.unsqueeze(-1) >> shifts) & mask).flatten(-2)
        if not is_planar(bits):
            return stream
        return stream.unflatten(-1, (-1, PLANES)).transpose(-1, -2).flatten(-2)
    chunks = packed.to(torch.int64).unflatten(-1, (-1, bits))
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (chunks << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device) * bits
    return ((words >> shifts) & mask).to(torch.uint8).flatten(-2)


def _round_to_param(x: torch.Tensor, toward: float) -> torch.Tensor:
    """float32 -> float16, rounded toward `toward` (-inf: down, +inf: up) instead of to nearest."""
    rounded = x.to(PARAM_DTYPE)
    wrong_side = rounded.float() > x if toward < 0 else rounded.float() < x
    return torch.where(wrong_side, torch.nextafter(rounded, torch.full_like(rounded, toward)), rounded)


def _grouped(x: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """x [..., T, D] viewed with each group on its own dimension: [..., T, D/g, g] or [..., T/g, g, D]."""
    if axis == "token":
        return x.unflatten(-1, (-1, group))
    return x.unflatten(-2, (-1, group))


def _reduce_dim(axis: str) -> int:
    return -1 if axis == "token" else -2


def expand_params(param: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """Per-group parameters repeated to one per element: [..., T, D/g] or [..., T/g, D] -> [..., T, D]."""
    return param.repeat_interleave(group, dim=-1 if axis == "token" else -2)


def quantize(x: torch.Tensor, bits: int, axis: str, group: int, clip_ratio: float = 1.0) -> Quantized:
    """Asymmetric round-to-nearest of x [..., T, D] in groups of `group` along `axis` (see the module doc)."""
    levels = (1 << bits) - 1
    grouped = _grouped(x.float(), axis, group)
    dim = _reduce_dim(axis)
    low = grouped.amin(dim=dim) * clip_ratio
    high = grouped.amax(dim=dim) * clip_ratio
    zero = _round_to_param(low, float("-inf"))
    scale = _round_to_param(((high - zero.float()) / levels).clamp_min(MIN_SCALE), float("inf"))
    step = expand_params(scale.float(), axis, group)
    offset = expand_params(zero.float(), axis, group)
    codes = ((x.float() - offset) / step).round_().clamp_(0, levels).to(torch.uint8)
    return Quantized(pack(codes, bits), scale, zero)


def dequantize(q: Quantized, bits: int, axis: str, group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Quantized codes back to values [..., T, D] in `dtype` (float32 math)."""
    codes = unpack(q.codes, bits).float()
    values = codes * expand_params(q.scale.float(), axis, group) + expand_params(q.zero.float(), axis, group)
    return values.to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, axis: str, group: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """Quantize and dequantize (simulated storage): x's shape and dtype, the values a packed store reads back."""
    return dequantize(quantize(x, bits, axis, group, clip_ratio), bits, axis, group, x.dtype)

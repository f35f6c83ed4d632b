"""kvbench.quant: packing layout, round-trip error bounds for every bit width and axis, group semantics."""

from __future__ import annotations

import pytest
import torch

from kvbench.quant import BITS, PARAM_DTYPE, dequantize, expand_params, fake_quantize, pack, quantize, unpack

# (axis, group) on x [2, 3, 96, 64]: channel groups of a token, token groups of a channel, whole rows/columns.
GROUPINGS = [("token", 32), ("token", 64), ("token", 8), ("channel", 32), ("channel", 96), ("channel", 1)]


@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trips_and_takes_bits_over_8_bytes_per_code(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_layouts_are_what_the_kernel_reads() -> None:
    """3 bits: one little-endian bit stream per row. 2 and 4 bits: planar; with 8 channels, planes of W = 2,
    element e (a byte of 2-bit codes, a 16-bit word of 4-bit ones) holds channels e, 2 + e, 4 + e, 6 + e."""
    codes = torch.tensor([1, 2, 3, 0, 15, 7, 9, 4], dtype=torch.uint8)
    # element 0: channels 0, 2, 4, 6 = 1, 3, 15, 9 -> 0x9F31; element 1: channels 1, 3, 5, 7 = 2, 0, 7, 4 -> 0x4702
    assert pack(codes, 4).tolist() == [0x31, 0x9F, 0x02, 0x47]
    # byte 0: channels 0, 2, 4, 6 = 1, 3, 3, 1; byte 1: channels 1, 3, 5, 7 = 2, 0, 3, 0 (codes % 4)
    assert pack(codes % 4, 2).tolist() == [1 | 3 << 2 | 3 << 4 | 1 << 6, 2 | 3 << 4]
    # 3 bits: codes 0..7 as one 24-bit stream; code 2 straddles bytes 0 and 1, code 5 bytes 1 and 2.
    stream = sum(c << (3 * i) for i, c in enumerate(range(8)))
    assert pack(torch.arange(8, dtype=torch.uint8), 3).tolist() == [stream & 255, stream >> 8 & 255, stream >> 16]
    assert torch.equal(pack(codes, 8), codes)


def _inputs(seed: int, offset: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 96, 64, generator=gen) * torch.rand(1, 1, 1, 64, generator=gen) * 4 + offset
    x[0, 0, 5] = 7.0  # a constant token row
    x[1, 2, :, 9] = -3.0  # a constant channel
    return x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("axis", "group"), GROUPINGS)
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_round_trip_error_is_at_most_half_a_step(bits: int, axis: str, group: int, offset: float) -> None:
    """Without clipping every value is within half a step of its reconstruction, with the float16 scale and
    zero-point actually stored. The offset makes float16 rounding of the zero-point larger than a step at
    8 bits: rounding it to nearest (not down) breaks the bound there."""
    x = _inputs(bits, offset)
    q = quantize(x, bits, axis, group)
    assert q.scale.dtype == PARAM_DTYPE and q.zero.dtype == PARAM_DTYPE
    expected_params = (2, 3, 96, 64 // group) if axis == "token" else (2, 3, 96 // group, 64)
    assert q.scale.shape == q.zero.shape == expected_params
    step = expand_params(q.scale.float(), axis, group)
    error = (dequantize(q, bits, axis, group) - x).abs()
    float32_rounding = x.abs() * 2.0**-21  # code * scale + zero is float32 arithmetic on values near |x|
    assert (error <= step * 0.5 + float32_rounding).all(), (error / step).max()
    # The step is the group's range over 2^bits - 1 levels, widened only by float16 rounding (zero-point
    # rounded down by at most one float16 ulp of the group's magnitude, the scale up by one ulp of itself).
    grouped = x.unflatten(-1, (-1, group)) if axis == "token" else x.unflatten(-2, (-1, group))
    dim = -1 if axis == "token" else -2
    span = grouped.amax(dim) - grouped.amin(dim)
    widened = (span + grouped.abs().amax(dim) * 2.0**-10) * (1 + 2.0**-10)
    assert (q.scale.float() * ((1 << bits) - 1) <= widened + 2.0**-14).all()


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_an_outlier_widens_only_its_own_group(axis: str) -> None:
    """Per-channel groups keep a channel outlier (KIVI's keys) out of the other channels' steps; per-token
    groups keep it out of the other tokens'."""
    x = torch.randn(1, 1, 32, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0, 3, 7] = 100.0
    q = quantize(x, 4, axis, 32)
    wide = q.scale.float() > 1.0
    if axis == "token":  # groups: 32 channels of one token
        assert wide.nonzero().tolist() == [[0, 0, 3, 0]]
    else:  # groups: 32 tokens of one channel
        assert wide.nonzero().tolist() == [[0, 0, 0, 7]]


def test_clip_ratio_shrinks_the_range_and_saturates_the_extremes() -> None:
    x = torch.linspace(-1, 1, 64).view(1, 1, 1, 64)
    clipped = fake_quantize(x, 8, "token", 64, clip_ratio=0.5)
    assert clipped.max() <= 0.5 + 1e-3 and clipped.min() >= -0.5 - 1e-3
    inside = x.abs() <= 0.5
    assert ((clipped - x).abs()[inside] <= 1.0 / 255 / 2 + 1e-4).all()


@pytest.mark.parametrize("bits", BITS)
def test_more_bits_less_error(bits: int) -> None:
    x = _inputs(0)
    errors = {b: (fake_quantize(x, b, "token", 64) - x).pow(2).mean().item() for b in BITS}
    finer = [b for b in BITS if b > bits]
    assert all(errors[b] < errors[bits] / 3 for b in finer)

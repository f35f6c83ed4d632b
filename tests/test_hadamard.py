"""Walsh-Hadamard rotations: the matrix is orthonormal, the fast transform is that matrix, dot products survive."""

from __future__ import annotations

import pytest
import torch

from kvbench.hadamard import hadamard_matrix, hadamard_transform, is_power_of_two
from kvbench.quant_kernels import rotate

SIZES = [1, 2, 4, 8, 64, 128, 256]


@pytest.mark.parametrize("n", SIZES)
def test_matrix_is_sylvester_hadamard_and_orthonormal(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    # Sylvester's matrix entry by entry: (-1)^popcount(i & j) / sqrt(n).
    parity = torch.zeros(n, n, dtype=torch.long)
    bits = i & j
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    assert torch.equal(h, (1 - 2 * parity).double() / n**0.5)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_equals_the_matrix_product(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    expected = x @ hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), expected, atol=1e-12)


def test_transform_is_its_own_inverse_and_keeps_dot_products():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 9, 64, generator=g), torch.randn(2, 9, 64, generator=g)
    assert torch.allclose(hadamard_transform(hadamard_transform(k)), k, atol=1e-5)
    rotated = (hadamard_transform(q) * hadamard_transform(k)).sum(-1)
    assert torch.allclose(rotated, (q * k).sum(-1), atol=1e-4)


def test_an_outlier_coordinate_is_spread_evenly():
    """Why QuaRot rotates before quantizing: one large coordinate becomes n coordinates of equal size."""
    outlier = torch.zeros(64)
    outlier[17] = 8.0
    assert torch.allclose(hadamard_transform(outlier).abs(), torch.full((64,), 1.0))


def test_low_precision_input_is_rotated_in_float32_and_returned_in_its_dtype():
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = hadamard_transform(x)
    assert got.dtype == torch.bfloat16
    # Only the final cast rounds: within half a bfloat16 step (2^-8 relative) of the exact rotation. Seven
    # butterfly stages in bfloat16 would round seven times.
    exact = x.double() @ hadamard_matrix(128, dtype=torch.float64)
    assert bool(((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all())


def test_the_layers_product_with_the_sign_matrix_is_the_rotation():
    """Decode attention rotates QuaRot's query and output by `quant_kernels.rotate` with the unnormalized
    (+-1) matrix where the plane kernel does not take the store: the same rotation as the transform, one
    float32 product, one rounding to the input's dtype."""
    x = torch.randn(2, 3, 7, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    signs = hadamard_matrix(128, normalized=False)
    assert torch.equal(signs.abs(), torch.ones(128, 128)) and torch.equal(signs, signs.T)
    got = rotate(x, signs)
    assert got.dtype == torch.bfloat16
    exact = x.double() @ hadamard_matrix(128, dtype=torch.float64)
    assert bool(((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all())


@pytest.mark.parametrize("n", [0, 3, 48, 96])
def test_non_power_of_two_sizes_are_refused(n):
    assert not is_power_of_two(n)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.zeros(2, n))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(n)


def test_transform_traces_into_one_graph():
    compiled = torch.compile(hadamard_transform, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 1, 64)
    assert torch.allclose(compiled(x), hadamard_transform(x))

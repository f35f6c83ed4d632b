"""Orthonormal Walsh-Hadamard rotations over the last dimension (sizes that are powers of two).

`H_n / sqrt(n)` with Sylvester's `H_2n = [[H_n, H_n], [H_n, -H_n]]` is symmetric and orthogonal, so it is
its own inverse: rotating twice gives the input back, and rotating both sides of a dot product leaves it
unchanged (`(Hq)·(Hk) = q·k`). Rotating a vector spreads an outlier coordinate over all coordinates, which
is why QuaRot (Ashkboos et al., arXiv 2404.00456, §4) rotates keys and values before quantizing them.

`hadamard_transform` is the fast transform (log2(n) butterfly stages, O(n log n) per vector, no n x n
matrix held on the device), the form QuaRot applies online to queries and keys; `hadamard_matrix` is the
explicit matrix, the reference the transform is tested against.
"""

from __future__ import annotations

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", normalized: bool = True
) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix `H_n / sqrt(n)` (n a power of two), built by Kronecker
    products; with `normalized=False`, `H_n` itself, whose +-1 entries every float type holds exactly (the
    form decode kernels take, scaling by 1 / sqrt(n) in float32)."""
    if not is_power_of_two(n):
        raise ValueError(f"a Walsh-Hadamard matrix needs a power-of-two size, got {n}")
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.kron(base, matrix)
    return (matrix / n**0.5 if normalized else matrix).to(dtype=dtype, device=device)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """`x @ hadamard_matrix(n)` over the last dimension (n a power of two), by the fast butterfly.

    Computed in at least float32 and returned in x's dtype (QuaRot rotates in float32 and casts back).
    The loop runs over log2(n) stages whose shapes depend only on n, so it traces into a static graph.
    """
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two size, got {n}")
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, n)
    half = 1
    while half < n:
        # Stage `half`: in each block of 2*half coordinates, (a, b) -> (a + b, a - b). Doubling the block
        # each stage applies the Kronecker factors of H_n one at a time.
        blocks = y.view(-1, n // (2 * half), 2, half)
        first, second = blocks[:, :, 0], blocks[:, :, 1]
        y = torch.stack((first + second, first - second), dim=2).view(-1, n)
        half *= 2
    return (y * n**-0.5).view(x.shape).to(x.dtype)

"""Products of a single decode row with a weight matrix: a Triton kernel on CUDA, `F.linear` elsewhere.

At batch 1 a decode step's projections are matrix-vector products bound by reading their weights. On an
H200 cuBLAS reads the large ones near the floor (gate/up 1.04x, the LM head 1.01x) but the small ones at
1.18-1.72x (q/k/v, o, down of Llama-3.1-8B; `benchmarks/README.md`, "decode_parts.py"), where a kernel's
ramp-up and tail weigh more. A plain GEMV (one program per BLOCK_N weight rows, all of K in BLOCK_K steps,
float32 sums) measured o at 1.46x and down at 1.10x with 16 x 1024 tiles and 8 warps, q/k/v at 1.27x with
8 x 512 and 4 warps. The MLP's SiLU(gate) * up can also be the kernel's epilogue: a program reads its gate
rows and the matching up rows and writes the product, so the elementwise kernel between the two MLP
products (one more launch a layer) goes.

`one_row_linear(x, weight)`: x [..., K] holding one row, weight [N, K] -> [..., N].
`one_row_silu_mul(x, gate_up)`: gate_up [2I, K], gate rows first -> SiLU(x gate^T) * (x up^T), [..., I].
Both are opaque `torch.library` operators (capturable; `torch.compile` sees their references' shapes, and
Triton's own launcher runs the kernel, so it can launch it with programmatic dependent launch while
`kvbench.pdl.dependent_launches` is active); off the GPU, and without Triton, they run the references.
Sums are float32 and rounded once, so results differ from cuBLAS's (and from the eager MLP, which rounds
gate and up before the SiLU) by float rounding. `kvbench.fused_projections` routes a model's one-row
products here when asked (`Engine(one_row_kernels=True)`); off by default until timed in the compiled step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvbench import kernels, pdl

# (BLOCK_N, BLOCK_K, warps, stages) by product, from decode_parts.py's sweep on an H200 (one row).
SMALL_OUTPUT = (16, 1024, 8, 3)  # N <= 4096: o and down (256 programs)
WIDE_OUTPUT = (8, 512, 4, 3)  # q/k/v and other wider products
GATED = (16, 512, 4, 3)  # gate/up with the SiLU product: 16 gate and 16 up rows a program
SMALL_OUTPUT_ROWS = 4096


def one_row_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def one_row_silu_mul_reference(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


if kernels.triton is not None:
    import triton
    import triton.language as tl

    await_previous_kernel = kernels.await_previous_kernel  # its own name: see `kernels.launch`

    @triton.jit
    def _one_row_gemv_kernel(
        x, w, y, n_out, k, stride_w, up_offset,
        GATED_SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        await_previous_kernel(PDL)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_out
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, k, BLOCK_K):
            col = start + cols
            col_ok = col < k
            xs = tl.load(x + col, mask=col_ok, other=0.0).to(tl.float32)
            both = row_ok[:, None] & col_ok[None, :]
            tile = tl.load(w + rows[:, None] * stride_w + col[None, :], mask=both, other=0.0)
            acc += tl.sum(tile.to(tl.float32) * xs[None, :], axis=1)
            if GATED_SILU:
                tile = tl.load(w + (rows + up_offset)[:, None] * stride_w + col[None, :], mask=both, other=0.0)
                up += tl.sum(tile.to(tl.float32) * xs[None, :], axis=1)
        if GATED_SILU:
            acc = acc / (1.0 + tl.exp(-acc)) * up
        tl.store(y + rows, acc.to(y.dtype.element_ty), mask=row_ok)

    def _one_row_triton(x: torch.Tensor, weight: torch.Tensor, gated: bool) -> torch.Tensor:
        n_rows, k = weight.shape
        n_out = n_rows // 2 if gated else n_rows
        plan = GATED if gated else SMALL_OUTPUT if n_out <= SMALL_OUTPUT_ROWS else WIDE_OUTPUT
        block_n, block_k, warps, stages = plan
        row = x.reshape(k).contiguous()
        if weight.stride(-1) != 1:
            weight = weight.contiguous()
        out = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)  # one row: contiguous
        _one_row_gemv_kernel[(triton.cdiv(n_out, block_n),)](
            row, weight, out, n_out, k, weight.stride(0), n_out,
            GATED_SILU=gated, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
            **pdl.launch_options(x.device),
        )  # fmt: skip
        return out


def _opaque_op(name: str, reference: Callable[..., torch.Tensor]):
    """A custom operator whose fake implementation is its reference (on fake tensors, only shapes count)."""

    def register(fn: Callable[..., torch.Tensor]):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(reference)
        return op

    return register


@_opaque_op("kvbench::one_row_linear", one_row_linear_reference)
def _one_row_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if kernels._use_triton(x):
        return _one_row_triton(x, weight, gated=False)
    return one_row_linear_reference(x, weight)


@_opaque_op("kvbench::one_row_silu_mul", one_row_silu_mul_reference)
def _one_row_silu_mul_op(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    if kernels._use_triton(x):
        return _one_row_triton(x, gate_up, gated=True)
    return one_row_silu_mul_reference(x, gate_up)


def _check(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    if not is_one_row(x) or x.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"{name}: one row [..., K] and a weight [N, K]: got {tuple(x.shape)}, {tuple(weight.shape)}")


def one_row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for an x of one row (see the module doc)."""
    _check(x, weight, "one_row_linear")
    return torch.ops.kvbench.one_row_linear(x, weight)


def one_row_silu_mul(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(x @ gate.T) * (x @ up.T) for an x of one row, gate_up = [gate; up] (see the module doc)."""
    _check(x, gate_up, "one_row_silu_mul")
    if gate_up.shape[0] % 2:
        raise ValueError(f"one_row_silu_mul: gate and up rows of one size: got {gate_up.shape[0]} rows")
    return torch.ops.kvbench.one_row_silu_mul(x, gate_up)


def is_one_row(x: torch.Tensor) -> bool:
    return x.shape[:-1].numel() == 1

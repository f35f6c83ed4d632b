"""The parts of a dense decode step in isolation, against the read bandwidth: where its time above the floor goes.

    PYTHONPATH=<copy> python benchmarks/decode_parts.py --commit <sha> --out decode_parts.jsonl

Two parts, each timed by `quant_attention.py`'s helpers: a CUDA graph of 20 calls whose inputs rotate past
twice the L2 (so every call reads from HBM), median of 5 replays:
- the projections of one layer (q/k/v fused, o, gate/up fused, down) and the LM head, for 1 and 4 rows,
  through cuBLAS (`F.linear`, what the compiled step calls), through cuBLASLt (the same call with
  `torch.backends.cuda.preferred_blas_library("cublaslt")`, which `TORCH_BLAS_PREFER_CUBLASLT=1` sets for a
  whole run) and through a plain Triton GEMV (`_gemv_kernel` below, a few tile shapes): if cuBLAS is far
  from the read bandwidth at these shapes, another library or a hand kernel has room; if not, the dense
  step's excess is elsewhere (small kernels, launch gaps);
- `kvbench.kernels.decode_attention` (the split kernel and its combine) at 32k over each sequence's length,
  the form a dense cache passes, under launch variants (tile size, programs per SM, stages, warps), GQA
  and MHA, batch 1 and 4.

Imports only torch, triton and kvbench. One JSON line per timing to `--out`; a table at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from quant_attention import copies_past_l2, read_bandwidth, time_us  # beside this file

from kvbench import kernels

CUDA = torch.device("cuda")
# (rows, columns) of each weight a decode step reads, with q/k/v and gate/up fused as the engine fuses them.
PROJECTIONS = {
    "llama-3.1-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                     "lm_head": (128256, 4096)},
    "llama-2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
                   "lm_head": (32000, 4096)},
}  # fmt: skip
ATTENTION_VARIANTS = {  # changes to kvbench.kernels' launch constants (the default first)
    "default": {},
    "pps2": {"PROGRAMS_PER_SM": 2},
    "pps3": {"PROGRAMS_PER_SM": 3},
    "pps6": {"PROGRAMS_PER_SM": 6},
    "pps8": {"PROGRAMS_PER_SM": 8},
    "stages3": {"NUM_STAGES": 3},
    "n128": {"BLOCK_N": 128},
    "n128_pps8": {"BLOCK_N": 128, "PROGRAMS_PER_SM": 8},
    "w8_stages3": {"NUM_WARPS": 8, "NUM_STAGES": 3},
}


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [ROWS, N] = x [ROWS, K] @ w [N, K].T for a few rows: one program per BLOCK_N output columns, the
    whole K per program, float32 accumulation (the weights are read once; x is tiny and stays in L1/L2)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    for row in tl.static_range(ROWS):
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            w = tl.load(w_ptr + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
            x = tl.load(x_ptr + row * K + k, mask=k < K, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(y_ptr + row * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_rows_kernel(x_ptr, w_ptr, y_ptr, M, N, K, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """As `_gemv_kernel` for up to 16 rows: each weight tile is loaded once for all rows and multiplied on
    the tensor cores (rows padded to 16, one MMA's row count)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, 16)
    n_ok = offs_n < N
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        w = tl.load(w_ptr + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
        x = tl.load(x_ptr + offs_r[:, None] * K + k[None, :], mask=(offs_r < M)[:, None] & (k < K)[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    out = y_ptr + offs_r[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(offs_r < M)[:, None] & n_ok[None, :])


def triton_gemv(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, warps: int, stages: int) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    kernel = _gemv_kernel if m == 1 else _gemv_rows_kernel
    kernel[(triton.cdiv(n, block_n),)](
        x, w, y, m, n, k, ROWS=1, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages
    )
    return y


GEMV_CONFIGS = [  # (block_n, block_k, warps, stages)
    (8, 512, 4, 3),
    (16, 256, 4, 4),
    (16, 512, 4, 3),
    (32, 256, 4, 3),
    (16, 1024, 8, 3),
]


Product = Callable[[torch.Tensor], torch.Tensor]  # weights -> x @ weights.T for the timed rows x


def with_blas_library(library: str, fn: Product) -> Product:
    """`fn` with `library` ("cublas" or "cublaslt") as PyTorch's choice for its products, the previous one after."""

    def run(w: torch.Tensor) -> torch.Tensor:
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(library)
        try:
            return fn(w)
        finally:
            torch.backends.cuda.preferred_blas_library(previous)

    return run


def matmul_rows(shape: str, bandwidth: float) -> list[dict]:
    rows = []
    for name, (n, k) in PROJECTIONS[shape].items():
        weights = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_past_l2(2 * n * k, CUDA))
        ]
        floor_us = 2 * n * k / bandwidth * 1e6
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reference = F.linear(x, weights[0]).float()
            variants: dict[str, Product] = {
                "cublas": with_blas_library("cublas", lambda w, x=x: F.linear(x, w)),
                "cublaslt": with_blas_library("cublaslt", lambda w, x=x: F.linear(x, w)),
            }
            for config in GEMV_CONFIGS:
                variants["triton_n{}_k{}_w{}_s{}".format(*config)] = lambda w, x=x, c=config: triton_gemv(x, w, *c)
            for variant, fn in variants.items():
                error = (fn(weights[0]).float() - reference).abs().max().item()
                us = time_us([lambda w=w, fn=fn: fn(w) for w in weights], CUDA)
                rows.append(
                    {"part": "matmul", "shape": shape, "name": name, "rows": m, "variant": variant, "us": us,
                     "floor_us": floor_us, "x_floor": us / floor_us, "max_abs_error": error}
                )  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
        del weights
        torch.cuda.empty_cache()
    return rows


def attention_rows(bandwidth: float, context: int) -> list[dict]:
    rows, saved = (
        [],
        {name: getattr(kernels, name) for name in ("BLOCK_N", "PROGRAMS_PER_SM", "NUM_STAGES", "NUM_WARPS")},
    )
    for heads, hkv in (("gqa", 8), ("mha", 32)):
        for batch in (1, 4):
            kv_bytes = 2 * batch * hkv * context * 128 * 2
            inputs = []
            for _ in range(copies_past_l2(kv_bytes, CUDA)):
                keys = torch.randn(batch, hkv, context, 128, device="cuda", dtype=torch.bfloat16)
                lengths = torch.full((batch,), context, device="cuda")  # a dense cache's form (FullLayer's)
                inputs.append(
                    (torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16), keys, torch.randn_like(keys),
                     lengths)
                )  # fmt: skip
            floor_us = kv_bytes / bandwidth * 1e6
            reference = kernels.decode_attention_reference(*inputs[0], 128**-0.5)[0].float()
            for variant, settings in ATTENTION_VARIANTS.items():
                for name, value in {**saved, **settings}.items():
                    setattr(kernels, name, value)
                out = kernels.decode_attention(*inputs[0], 128**-0.5)[0].float()
                us = time_us([lambda i=i: kernels.decode_attention(*i, 128**-0.5) for i in inputs], CUDA)
                rows.append(
                    {"part": "attention", "heads": heads, "batch": batch, "context": context, "variant": variant,
                     "us": us, "floor_us": floor_us, "x_floor": us / floor_us,
                     "max_abs_error": (out - reference).abs().max().item()}
                )  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
            del inputs
            torch.cuda.empty_cache()
    for name, value in saved.items():
        setattr(kernels, name, value)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(PROJECTIONS))
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--parts", nargs="+", default=["matmul", "attention"], choices=["matmul", "attention"])
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", default="benchmarks/results/decode_parts.jsonl")
    args = parser.parse_args()
    began = time.perf_counter()
    bandwidth = read_bandwidth(CUDA)
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "commit": args.commit or None, "read_bandwidth_Bps": bandwidth}  # fmt: skip
    print(json.dumps(env), flush=True)
    rows = [row for shape in args.shapes for row in matmul_rows(shape, bandwidth)] if "matmul" in args.parts else []
    rows += attention_rows(bandwidth, args.context) if "attention" in args.parts else []
    with open(args.out, "a") as out:
        for row in rows:
            out.write(json.dumps({**row, "environment": env}) + "\n")
    print(f"{'part':<10}{'what':<34}{'rows/batch':>10}{'us':>9}{'x floor':>9}")
    for row in rows:
        what = f"{row.get('shape', row.get('heads'))} {row.get('name', '')} {row['variant']}"
        print(
            f"{row['part']:<10}{what:<34}{row.get('rows', row.get('batch')):>10}{row['us']:>9.1f}{row['x_floor']:>9.2f}"
        )
    print(f"{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

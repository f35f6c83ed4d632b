"""Decode attention over packed quantized K/V against the bf16 kernel, Llama-3.1-8B shape, one GPU.

    PYTHONPATH=. python benchmarks/quant_attention.py --out benchmarks/results/quant_attention_h100.jsonl
    PYTHONPATH=. python benchmarks/quant_attention.py --device cpu   # a smoke run of the same code, small shapes

One query per sequence, Hq = 32, Hkv = 8, D = 128, every slot live, batch 1 and 4 at 8k, 32k and 128k
tokens. Rows: `bf16` (kvbench.kernels.decode_attention over bf16 K/V), and kvbench.quant_kernels'
packed kernel for `int4_token` (K and V per token, one group per head: QuaRot's layout), `kivi4` and
`kivi2` (keys per channel in groups of 32 tokens, values per token in groups of 32 channels). Each row
gives the bytes the kernel must read (codes + float16 scales/zero-points, or bf16 K/V), the floor (those
bytes over 3.0e12 B/s), the median time (triton.testing.do_bench, L2 flushed), and the speed-up over bf16.

Before timing: each packed layout against the float32 reference on an 8k shape (GPU: the Triton kernel;
CPU: the reference itself), and the operator under CUDA-graph capture and torch.compile(fullgraph=True).
Imports only torch, triton and kvbench. Appends one JSON line per row to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from functools import partial
from pathlib import Path

import torch

from kvbench import kernels
from kvbench.quant import PARAM_DTYPE, packed_width
from kvbench.quant_kernels import PackedSlots, packed_decode_attention, packed_decode_attention_reference

NOMINAL_BANDWIDTH = 3.0e12  # B/s
HQ, HKV, D = 32, 8, 128
# name: (key bits, key axis, value bits, value axis); groups of 32 (channel axis: tokens; token axis: channels)
# except int4_token, one group per token and head (128 channels).
LAYOUTS = {
    "int4_token": (4, "token", 4, "token", 128),
    "kivi4": (4, "channel", 4, "token", 32),
    "kivi2": (2, "channel", 2, "token", 32),
}


def packed_inputs(batch: int, slots: int, layout: str, device: torch.device, seed: int) -> tuple[PackedSlots, ...]:
    """Random codes and parameters in the layout (the kernel's cost does not depend on their values)."""
    k_bits, k_axis, v_bits, v_axis, group = LAYOUTS[layout]
    gen = torch.Generator(device=device).manual_seed(seed)

    def store(bits: int, axis: str) -> PackedSlots:
        codes = torch.randint(
            0, 256, (batch, HKV, slots, packed_width(D, bits)), dtype=torch.uint8, device=device, generator=gen
        )
        rows, cols, row_tokens, col_channels = (
            (slots, D // group, 1, group) if axis == "token" else (-(-slots // 32), D, 32, 1)
        )
        scale = (torch.rand(batch, HKV, rows, cols, device=device, generator=gen) * 0.1 + 0.01).to(PARAM_DTYPE)
        zero = (torch.randn(batch, HKV, rows, cols, device=device, generator=gen) * 0.5).to(PARAM_DTYPE)
        lead = torch.full((batch,), row_tokens, device=device)
        return PackedSlots(codes, scale, zero, lead, bits, row_tokens, col_channels)

    return store(k_bits, k_axis), store(v_bits, v_axis)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def timer(device: torch.device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3

    def host_us(fn) -> float:
        fn()
        began = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - began) / 3 * 1e6

    return host_us


def checks(device: torch.device, slots: int) -> list[dict]:
    rows = []
    query = torch.randn(2, HQ, D, device=device, dtype=torch.bfloat16)
    lengths = torch.tensor([slots, slots // 3], device=device)
    for layout in LAYOUTS:
        keys, values = packed_inputs(2, slots, layout, device, seed=1)
        out, lse = packed_decode_attention(query, keys, values, lengths, D**-0.5)
        ref_out, ref_lse = packed_decode_attention_reference(query, keys, values, lengths, D**-0.5)
        err = ((out.double() - ref_out.double()).norm() / ref_out.double().norm()).item()
        lse_err = (lse - ref_lse).abs().max().item()
        rows.append(
            {"check": f"reference_{layout}", "out_rel": err, "lse_abs": lse_err, "ok": err < 2e-2 and lse_err < 1e-2}
        )
    keys, values = packed_inputs(2, slots, "kivi2", device, seed=2)

    def step(q):
        return packed_decode_attention(q, keys, values, lengths, D**-0.5)

    want = step(query)
    try:
        got = torch.compile(step, fullgraph=True)(query)
        same = all(torch.allclose(g.float(), w.float(), atol=1e-2) for g, w in zip(got, want, strict=True))
        rows.append({"check": "torch_compile_fullgraph", "ok": same})
    except Exception as err:  # report, keep benchmarking
        rows.append({"check": "torch_compile_fullgraph", "ok": False, "error": repr(err)[:500]})
    if device.type == "cuda":
        try:
            static = query.clone()
            step(static)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = step(static)
            graph.replay()
            torch.cuda.synchronize()
            rows.append({"check": "cuda_graph", "ok": all(torch.equal(g, w) for g, w in zip(got, want, strict=True))})
        except Exception as err:
            rows.append({"check": "cuda_graph", "ok": False, "error": repr(err)[:500]})
    return rows


def sweep(device: torch.device, contexts: list[int], batches: list[int]) -> list[dict]:
    measure = timer(device)
    rows = []
    for slots in contexts:
        for batch in batches:
            query = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
            keys = torch.randn(batch, HKV, slots, D, device=device, dtype=torch.bfloat16)
            values = torch.randn_like(keys)
            positions = torch.arange(slots, device=device).expand(batch, HKV, slots)
            dense_us = measure(partial(kernels.decode_attention, query, keys, values, positions, D**-0.5))
            dense_bytes = nbytes(keys, values)
            rows.append({"kernel": "bf16", "batch": batch, "context": slots, "us": dense_us, "bytes": dense_bytes})
            del keys, values
            lengths = torch.full((batch,), slots, device=device)
            for layout in LAYOUTS:
                k, v = packed_inputs(batch, slots, layout, device, seed=3)
                us = measure(partial(packed_decode_attention, query, k, v, lengths, D**-0.5))
                read = nbytes(k.codes, k.scale, k.zero, v.codes, v.scale, v.zero)
                rows.append(
                    {
                        "kernel": layout,
                        "batch": batch,
                        "context": slots,
                        "us": us,
                        "bytes": read,
                        "speedup_vs_bf16": dense_us / us,
                    }
                )
                del k, v
    for row in rows:
        row["floor_us"] = row["bytes"] / NOMINAL_BANDWIDTH * 1e6
        row["x_floor"] = row["us"] / row["floor_us"]
    return rows


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    small = device.type != "cuda"  # the reference path on a CPU: small shapes, to check the script runs
    contexts, batches = ([512, 2048], [1, 2]) if small else ([8192, 32768, 131072], [1, 4])
    env = environment(device)
    rows = [env | row for row in checks(device, 1024 if small else 8192)]
    rows += [env | row for row in sweep(device, contexts, batches)]
    if args.out:
        with Path(args.out).open("a") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
    for row in rows:
        if "check" in row:
            print(f"check {row['check']}: {'ok' if row['ok'] else 'FAILED'} {row.get('error', '')}")
    print(f"{'kernel':<11} {'batch':>5} {'context':>7} {'MB read':>8} {'us':>9} {'x floor':>8} {'vs bf16':>8}")
    for row in rows:
        if "kernel" in row:
            speedup = row.get("speedup_vs_bf16")
            print(
                f"{row['kernel']:<11} {row['batch']:>5} {row['context']:>7} {row['bytes'] / 1e6:>8.1f} "
                f"{row['us']:>9.1f} {row['x_floor']:>8.2f} {f'{speedup:.2f}x' if speedup else '':>8}"
            )


if __name__ == "__main__":
    main()

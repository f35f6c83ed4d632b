"""Decode attention on one GPU: kvbench's Triton flash-decoding kernel against SDPA, as multiples of the floor.

    PYTHONPATH=. python benchmarks/attention_kernel.py --out benchmarks/results/attention_kernel.jsonl

One query per sequence over S cached slots, bf16, D = 128, Hq = 32 with Hkv = 8 (GQA) or 32 (MHA), almost
all slots live (1% empty, so the mask matters but the unmasked SDPA does nearly the same work). Methods:
`triton` (kvbench.kernels.decode_attention); `sdpa_gqa` (SDPA, enable_gqa, no mask: not a correct decode
over a slot buffer, the speed the mask costs against); `sdpa_gqa_mask` (SDPA, enable_gqa, boolean mask
[B, Hq, 1, S]); `repeat_kv_sdpa_mask` (transformers' repeat_kv, then SDPA with the mask); `received`
(kvbench.kernels.received_attention, reads K only). The floor is the K+V bytes read once (K only for
`received`) over 3.0e12 B/s; the measured device-to-device copy bandwidth is reported beside it.

Before timing: the kernels against the float32 reference on hard masks (random empty slots, empty splits,
a sequence with no live slot) in bf16/fp16/fp32 and on every timed shape; CUDA-graph capture and
torch.compile(fullgraph=True) of the operators. Then a sweep of the kernel's tile/warp/stage/split
constants on three shapes. Timings are triton.testing.do_bench medians (L2 flushed before each call).
Appends one JSON line per row to --out; prints the tables last.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kvbench import kernels
from kvbench.records import git_commit

NOMINAL_BANDWIDTH = 3.0e12  # B/s
HEAD_DIM = 128
HEADS = {"gqa": (32, 8), "mha": (32, 32)}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SWEEP_SHAPES = [("gqa", 1, 32768), ("gqa", 4, 32768), ("mha", 1, 32768)]  # the dense targets: 32k, batch 1 and 4
# (BLOCK_N, NUM_WARPS, NUM_STAGES, PROGRAMS_PER_SM); the first is the module's default (up to FEW_HEADS
# pairs, which every sweep shape is). Two warps: what made the 4-bit kernels faster (quant_attention.py).
SWEEP = [
    (64, 4, 2, 4),
    (64, 4, 2, 2),
    (32, 4, 2, 2),
    (64, 4, 3, 2),
    (64, 8, 2, 2),
    (128, 4, 2, 2),
    (128, 8, 3, 2),
    (64, 2, 2, 4),
    (64, 2, 2, 8),
    (64, 2, 3, 4),
]


def bench_us(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting the read and the write."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_us(lambda: dst.copy_(src)) * 1e-6)


def make_inputs(
    batch: int, hq: int, hkv: int, slots: int, dtype: torch.dtype, empty: float, device: torch.device, seed: int
) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    query = torch.randn(batch, hq, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    keys = torch.randn(batch, hkv, slots, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    values = torch.randn(batch, hkv, slots, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    positions = torch.arange(slots, device=device).repeat(batch, hkv, 1)
    positions.masked_fill_(torch.rand(positions.shape, device=device, generator=gen) < empty, -1)
    return {"query": query, "keys": keys, "values": values, "positions": positions, "scale": HEAD_DIM**-0.5}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(x: dict) -> dict:
    """Relative errors of out, lse (finite entries) and received against the references, and NaN/inf
    bookkeeping; `ok` is all of them within tolerance."""
    args = (x["query"], x["keys"], x["values"], x["positions"], x["scale"])
    out, lse = kernels.decode_attention(*args)
    ref_out, ref_lse = kernels.decode_attention_reference(*args)
    received = kernels.received_attention(x["query"], x["keys"], x["positions"], x["scale"], lse)
    ref_received = kernels.received_attention_reference(x["query"], x["keys"], x["positions"], x["scale"], ref_lse)
    finite = torch.isfinite(ref_lse)
    errors = {
        "out_rel": rel(out, ref_out),
        "lse_rel": rel(lse[finite], ref_lse[finite]),
        "received_rel": rel(received, ref_received),
    }
    tol = TOLERANCE[x["query"].dtype]
    ok = (
        errors["out_rel"] < tol
        and errors["lse_rel"] < 1e-4
        and errors["received_rel"] < tol
        and torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        and not (out.isnan().any() or lse.isnan().any() or received.isnan().any())
    )
    return errors | {"ok": bool(ok)}


def hard_masks(device: torch.device) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, (hq, hkv) in HEADS.items():
            x = make_inputs(3, hq, hkv, 5000, dtype, 0.3, device, seed=7)
            _, split_len = kernels._split_plan(3 * hkv, 5000, kernels._num_sms(device))
            x["positions"][0, :, split_len : 2 * split_len] = -1  # a whole split empty
            x["positions"][2] = -1  # a sequence with no live slot
            rows.append({"check": f"hard_masks_{name}_{str(dtype).removeprefix('torch.')}"} | check(x))
    return rows


def step(query, keys, values, positions, scale: float):
    out, lse = kernels.decode_attention(query, keys, values, positions, scale)
    return out, kernels.received_attention(query, keys, positions, scale, lse)


def capture_inputs(device: torch.device) -> tuple[tuple, float, tuple]:
    x = make_inputs(2, 32, 8, 3000, torch.bfloat16, 0.3, device, seed=11)
    args = (x["query"], x["keys"], x["values"], x["positions"])
    return args, x["scale"], step(*args, x["scale"])


def cuda_graph_check(device: torch.device) -> dict:
    """The operators captured in a CUDA graph and replayed on new buffer contents, against eager."""
    args, scale, want = capture_inputs(device)
    try:
        static = [a.clone() for a in args]
        step(*static, scale)  # compile the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = step(*static, scale)
        for s in static:
            s.zero_()
        for s, a in zip(static, args, strict=True):
            s.copy_(a)
        graph.replay()
        torch.cuda.synchronize()
        return {"check": "cuda_graph", "ok": all(torch.equal(g, w) for g, w in zip(got, want, strict=True))}
    except Exception as err:  # report, keep benchmarking
        return {"check": "cuda_graph", "ok": False, "error": repr(err)[:500]}


def compile_check(device: torch.device) -> dict:
    """The operators under torch.compile(fullgraph=True) with Inductor, against eager."""
    args, scale, want = capture_inputs(device)
    try:
        started = time.perf_counter()
        got = torch.compile(step, fullgraph=True)(*args, scale)
        torch.cuda.synchronize()
        errors = [rel(g, w) for g, w in zip(got, want, strict=True)]
        seconds = round(time.perf_counter() - started, 1)
        return {"check": "torch_compile_fullgraph", "ok": max(errors) < 1e-6, "rel_errors": errors, "s": seconds}
    except Exception as err:
        return {"check": "torch_compile_fullgraph", "ok": False, "error": repr(err)[:500]}


def repeat_kv(hidden: torch.Tensor, group: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, S, D] -> [B, Hkv * G, S, D], a copy."""
    b, hkv, s, d = hidden.shape
    return hidden[:, :, None].expand(b, hkv, group, s, d).reshape(b, hkv * group, s, d)


def methods(x: dict) -> dict[str, Callable[[], object]]:
    q, k, v, pos, scale = x["query"], x["keys"], x["values"], x["positions"], x["scale"]
    group = q.shape[1] // k.shape[1]
    q4 = q.unsqueeze(2)
    mask = (pos >= 0).repeat_interleave(group, dim=1).unsqueeze(2)  # [B, Hq, 1, S], built once per step
    lse = kernels.decode_attention(q, k, v, pos, scale)[1]
    return {
        "triton": lambda: kernels.decode_attention(q, k, v, pos, scale),
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True),
        "sdpa_gqa_mask": lambda: F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
        "repeat_kv_sdpa_mask": lambda: F.scaled_dot_product_attention(
            q4, repeat_kv(k, group), repeat_kv(v, group), attn_mask=mask, scale=scale
        ),
        "received": lambda: kernels.received_attention(q, k, pos, scale, lse),
    }


def timings(batches: list[int], slot_counts: list[int], device: torch.device, bandwidth: float) -> list[dict]:
    rows = []
    for heads, (hq, hkv) in HEADS.items():
        for batch in batches:
            for slots in slot_counts:
                x = make_inputs(batch, hq, hkv, slots, torch.bfloat16, 0.01, device, seed=slots + batch)
                shape = {"heads": heads, "hq": hq, "hkv": hkv, "batch": batch, "slots": slots}
                correct = check(x)
                kv_bytes = x["keys"].nbytes + x["values"].nbytes
                for method, fn in methods(x).items():
                    floor_bytes = x["keys"].nbytes if method == "received" else kv_bytes
                    us = bench_us(fn)
                    rows.append(
                        shape
                        | {"method": method, "us": us, "bytes": floor_bytes}
                        | {"x_floor": us * 1e-6 * NOMINAL_BANDWIDTH / floor_bytes}
                        | {"x_measured_floor": us * 1e-6 * bandwidth / floor_bytes}
                        | ({"kernel_ok": correct["ok"], "out_rel": correct["out_rel"]} if method == "triton" else {})
                    )
                del x
                torch.cuda.empty_cache()
    return rows


def sweep(device: torch.device) -> list[dict]:
    """The kernel's constants on a few shapes (module attributes, read at each launch)."""
    defaults = (kernels.BLOCK_N, kernels.NUM_WARPS, kernels.NUM_STAGES, kernels.PROGRAMS_PER_SM)
    rows = []
    try:
        for heads, batch, slots in SWEEP_SHAPES:
            hq, hkv = HEADS[heads]
            x = make_inputs(batch, hq, hkv, slots, torch.bfloat16, 0.01, device, seed=3)
            kv_bytes = x["keys"].nbytes + x["values"].nbytes
            args = (x["query"], x["keys"], x["values"], x["positions"], x["scale"])
            for config in SWEEP:
                kernels.BLOCK_N, kernels.NUM_WARPS, kernels.NUM_STAGES, kernels.PROGRAMS_PER_SM = config
                splits = kernels._split_plan(batch * hkv, slots, kernels._num_sms(device))[0]
                us = bench_us(lambda args=args: kernels.decode_attention(*args))
                rows.append(
                    {"heads": heads, "batch": batch, "slots": slots, "method": "triton_sweep"}
                    | dict(zip(("block_n", "num_warps", "num_stages", "programs_per_sm"), config, strict=True))
                    | {"splits": splits, "us": us, "x_floor": us * 1e-6 * NOMINAL_BANDWIDTH / kv_bytes}
                    | {"ok": check(x)["ok"]}
                )
    finally:
        kernels.BLOCK_N, kernels.NUM_WARPS, kernels.NUM_STAGES, kernels.PROGRAMS_PER_SM = defaults
    return rows


def environment(device: torch.device, commit: str) -> dict:
    return {
        "device_name": torch.cuda.get_device_name(device),
        "sms": kernels._num_sms(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # kvbench's checkout (`+dirty` with uncommitted changes), or what --commit names for a copy
        # without .git: git run in the working directory once stamped rows with another tree's commit.
        "git_commit": commit or git_commit(),
    }


def print_tables(env: dict, bandwidth: float, checks: list[dict], rows: list[dict], swept: list[dict]) -> None:
    print(f"\n{env['device_name']}  torch {env['torch']}  triton {env['triton']}  SMs {env['sms']}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (floor uses {NOMINAL_BANDWIDTH / 1e12:.1f})")
    for row in checks:
        extra = {k: v for k, v in row.items() if k not in ("check", "ok")}
        print(f"check {row['check']:<28} {'ok' if row['ok'] else 'FAILED'}  {json.dumps(extra)[:160]}")
    if swept:
        print("\nsweep: block_n warps stages programs/SM")
        for row in swept:
            print(
                f"{row['heads']} B={row['batch']} S={row['slots']:<6} {row['block_n']:>4} {row['num_warps']:>2}"
                f" {row['num_stages']:>2} {row['programs_per_sm']:>2}  splits {row['splits']:>3}"
                f"  {row['us']:8.1f} us  {row['x_floor']:5.2f}x  {'ok' if row['ok'] else 'WRONG'}"
            )
    names = list(dict.fromkeys(row["method"] for row in rows))
    print("\nus (x floor at 3.0 TB/s); floor = K+V bytes read once (K only for received)")
    print(f"{'heads':<5} {'B':>2} {'S':>6} {'floor us':>9} " + " ".join(f"{n:>21}" for n in names))
    for key in dict.fromkeys((r["heads"], r["batch"], r["slots"]) for r in rows):
        cells = {r["method"]: r for r in rows if (r["heads"], r["batch"], r["slots"]) == key}
        floor_us = cells["triton"]["bytes"] / NOMINAL_BANDWIDTH * 1e6
        line = " ".join(f"{cells[n]['us']:>12.1f} ({cells[n]['x_floor']:5.2f}x)" for n in names)
        wrong = "" if cells["triton"]["kernel_ok"] else "  TRITON DISAGREES WITH THE REFERENCE"
        print(f"{key[0]:<5} {key[1]:>2} {key[2]:>6} {floor_us:>9.1f} {line}{wrong}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/attention_kernel.jsonl")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--slots", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile check (~20 s)")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--commit", default="", help="the commit to record (default: git's, where there is one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    started = time.perf_counter()
    env = environment(device, args.commit) | {"run": time.strftime("%Y-%m-%dT%H:%M:%S")}

    checks = hard_masks(device)
    if not all(row["ok"] for row in checks):
        print(json.dumps(checks, indent=1))
        raise SystemExit("the kernels disagree with the reference; not timing them")
    checks.append(cuda_graph_check(device))
    if not args.no_compile:
        checks.append(compile_check(device))
    bandwidth = copy_bandwidth(device)
    rows = timings(args.batches, args.slots, device, bandwidth)
    swept = [] if args.no_sweep else sweep(device)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(env | {"check": "copy_bandwidth", "bytes_per_s": bandwidth}) + "\n")
        for row in checks + rows + swept:
            f.write(json.dumps(env | row) + "\n")

    print_tables(env, bandwidth, checks, rows, swept)
    print(f"\nrows appended to {out}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

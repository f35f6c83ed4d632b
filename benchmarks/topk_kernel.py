"""`kvbench.topk.largest_keys` against `torch.topk`, at the shapes the decode steps select at, one GPU.

    PYTHONPATH=. python benchmarks/topk_kernel.py --commit <sha> --out topk_kernel.jsonl   # seconds
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/topk_kernel.py --device cpu          # a smoke run

Rows (Llama-3.1-8B: 8 KV heads): Scissorhands' victims (its drop keys over 2,048 slots, the 512 highest,
at batch 1 and 4) and ArkVale's pages (float scores of 1,026 pages at 32k and 48 new tokens, the 30 best
besides sink and window pages, at batch 1 and 4; one ranking per layer and sequence, `n_groups` = 1).
Each is timed as the step runs it (CUDA-graph replays, `quant_attention.py`'s `time_us`): `torch` is
`torch.topk` (what the steps called before), `kernel` the Triton program per row; `ok` says the kernel
returned torch's values and, on distinct keys, its slots. Appends one JSON line per row to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_attention import environment, read_bandwidth, time_us

from kvbench import topk
from kvbench.methods.scissorhands import NOT_A_CANDIDATE, drop_key

KV_HEADS = 8


def scissorhands_keys(batch: int, slots: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    counts = torch.randint(0, 401, (batch, KV_HEADS, slots), generator=gen)
    positions = torch.stack([torch.randperm(32768, generator=gen)[:slots] for _ in range(batch * KV_HEADS)])
    keys = drop_key(counts, positions.view(batch, KV_HEADS, slots))
    return keys.masked_fill(torch.rand(keys.shape, generator=gen) < 0.05, NOT_A_CANDIDATE).to(device)


def arkvale_keys(batch: int, pages: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    scores = torch.randn(batch, 1, pages, generator=gen)
    scores[..., :1] = float("-inf")  # sink and window pages are no candidates
    scores[..., -2:] = float("-inf")
    return topk.float_order_keys(scores).to(device)


CASES = {  # name: (keys builder, row length, k)
    "scissorhands_2048": (scissorhands_keys, 2048, 512),
    "arkvale_32k_pages": (arkvale_keys, 1026, 30),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", default="benchmarks/results/topk_kernel.jsonl")
    args = parser.parse_args()
    device = torch.device(args.device)
    env = environment(device, read_bandwidth(device), args.commit)
    rows, failed = [], False
    for name, (build, length, k) in CASES.items():
        for batch in args.batches:
            keys = build(batch, length, device, torch.Generator().manual_seed(batch))
            values, slots = topk.largest_keys(keys, k)
            ref_values, ref_slots = keys.topk(k, dim=-1)
            distinct = values > NOT_A_CANDIDATE if name.startswith("scissorhands") else values > values.min()
            ok = torch.equal(values, ref_values) and torch.equal(slots[distinct], ref_slots[distinct])
            failed |= not ok
            calls = {
                "torch": lambda keys=keys, k=k: keys.topk(k, dim=-1),
                "kernel": lambda keys=keys, k=k: topk.largest_keys(keys, k),
            }
            for variant, call in calls.items():
                row = {"case": name, "batch": batch, "row": length, "k": k, "variant": variant, "ok": ok}
                rows.append({**env, **row, "us": time_us([call], device)})
    print(f"{'case':20} {'batch':>5} {'variant':>8} {'us':>8}  ok")
    for row in rows:
        print(f"{row['case']:20} {row['batch']:5d} {row['variant']:>8} {row['us']:8.1f}  {row['ok']}")
    with open(args.out, "a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

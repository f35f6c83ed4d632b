"""Runs one packed layout's decode attention a few times, for Nsight Compute (`ncu`) to profile its kernels.

    ncu --clock-control none -k regex:_plane --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \\
        python benchmarks/kernel_profile.py --layout kivi2 --batch 4 --context 32768 [--config store_waves]

The inputs are `quant_attention.py`'s (random codes and parameters, Llama-3.1-8B shape), so a profile here
is of the same call that script times; the calls run eagerly (no CUDA graph), which changes nothing inside
a kernel. Imports only torch, triton and kvbench.
"""

from __future__ import annotations

import argparse

import torch
from quant_attention import CONFIGS, HQ, SCALE, TIMED_LAYOUTS, D, timed_parts  # this script's folder is on sys.path

from kvbench import plane_kernel, quant_kernels
from kvbench.quant_kernels import packed_sets_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=TIMED_LAYOUTS, default="kivi2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--config", choices=CONFIGS, default="default", help="the launch, of quant_attention.py's")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (the reference, or Triton's interpreter)")
    args = parser.parse_args()
    device = torch.device(args.device)
    quant_kernels.LAUNCH = CONFIGS[args.config]
    parts = timed_parts(args.layout, args.batch, args.context, device, seed=3)
    query = torch.randn(args.batch, HQ, D, device=device, dtype=torch.bfloat16)
    for _ in range(args.calls):
        packed_sets_attention(query, parts, SCALE)
    # what ran, so a profile names it: the plane kernel's key mode per store (None: the split kernel's path)
    modes = [(plane_kernel.store_launch(keys, values, quant_kernels.LAUNCH) or (None,))[0] for keys, values, _ in parts]
    calls = f"batch {args.batch}, {args.context} slots, {args.calls} calls"
    print(f"{args.layout} ({args.config}): {calls}, key modes {modes}")
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Measured KV bytes and peak memory of each method on a real-shape model, through the eager engine.

    python benchmarks/memory_eager.py --shape llama-3.1-8b --contexts 8192 32768 --budget 2048

Random weights (the cost does not depend on them), random prompt token ids, batch 1, greedy decode of
`--new-tokens` tokens. Timings are the *eager* path (HF forward per token, launch-bound on a GPU): they
show overheads, not achievable speed. Appends one JSON line per (method, context) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict

import torch

from kvbench.engine import Engine
from kvbench.methods.full import Full
from kvbench.methods.h2o import H2O
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.models import ModelConfig, load_model, model_spec
from kvbench.records import environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/memory_eager.jsonl")
    args = parser.parse_args()

    cfg = ModelConfig(name=args.shape, source="shape", shape=args.shape, device=args.device)
    spec = model_spec(cfg)
    model, _ = load_model(cfg, with_tokenizer=False)  # prompts are token ids
    methods = {
        "full": Full(),
        "streamingllm": StreamingLLM(budget=args.budget),
        "snapkv": SnapKV(budget=args.budget),
        "h2o": H2O(budget=args.budget),
    }
    env = environment(next(model.parameters()).device)
    generator = torch.Generator().manual_seed(0)
    with open(args.out, "a") as out:
        for context in args.contexts:
            prompt = torch.randint(0, 32000, (context,), generator=generator).tolist()
            for name, method in methods.items():
                engine = Engine(model, None, method, spec, prefill_chunk=args.prefill_chunk)
                engine.generate(prompt[:256], max_new_tokens=4)  # warm-up
                m = engine.generate(prompt, max_new_tokens=args.new_tokens).measurement
                row = {"shape": args.shape, "method": name, "budget": args.budget, "context": context, **asdict(m)}
                row["decode_ms_per_token"] = 1000 * m.decode_s / max(m.decode_steps, 1)
                row["environment"] = env
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(
                    f"{name:>13} ctx {context:>6}: kv {m.kv_bytes_device / 2**20:9.1f} MiB "
                    f"(dense {m.dense_kv_bytes / 2**20:9.1f}, "
                    f"peak during prefill {m.kv_bytes_device_peak / 2**20:9.1f}) "
                    f"peak mem {m.peak_memory_bytes / 2**30:6.2f} GiB  prefill {m.prefill_s:6.2f} s  "
                    f"decode {row['decode_ms_per_token']:6.1f} ms/token (eager)",
                    flush=True,
                )
    print(f"python {platform.python_version()}, torch {torch.__version__}, commit {env['git_commit']}")


if __name__ == "__main__":
    main()

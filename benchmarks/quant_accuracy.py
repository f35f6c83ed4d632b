"""Quantized KV caches on the embedded model: WikiText-2 perplexity, passkey retrieval, and measured bytes.

    nice -n 10 python benchmarks/quant_accuracy.py                 # CPU, the defaults below (~20 min)
    nice -n 10 python benchmarks/quant_accuracy.py --windows 4 --methods full,zipcache \\
        --out benchmarks/results/quant_accuracy_zipcache.json        # ZipCache's claim on more text

Methods: the full cache; KIVI 2- and 4-bit (paper defaults: group 32, window 128); ZipCache at the paper's
4/2 bits with 40% low (3.2 bits on average), 4/2 bits with 50% low (3.0 bits), uniform 3 bits (the same
quantizer without saliency: low_ratio 0) at the same 3.0 average, and 4/2 bits with the 50% low chosen at
random (does the saliency ranking matter?); QuaRot 4-bit and its un-rotated round-to-nearest ablation
(RTN, same quantizer), when `kvbench.methods.quarot` is there. Every method uses its packed storage.

Perplexity: the WikiText-2 task's `stream` protocol (`tasks/wikitext2.py`): windows of `--prefix` tokens,
prefilled (full-precision attention, then quantized), followed by `--continuation` tokens predicted and fed
one at a time through the quantized cache. All methods score the same tokens, so their differences are
paired. Bytes: what the cache holds after the window (`KVCache.kv_bytes`: codes, scales, zero-points,
full-precision windows; float32 on CPU), per token held (prefix + continuation), beside the dense cache's.
Passkey: the passkey task, plain prompts at `--passkey-length` tokens, three depths.

Writes benchmarks/results/quant_accuracy.json (rows, settings, environment, commit) and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from kvbench.engine import Engine, perplexity
from kvbench.method import Method
from kvbench.methods.full import Full
from kvbench.methods.kivi import KIVI
from kvbench.methods.zipcache import ZipCache
from kvbench.models import ModelConfig, load_model, model_spec
from kvbench.records import environment, git_commit, write_json_atomic
from kvbench.tasks.passkey import Passkey
from kvbench.tasks.wikitext2 import WikiText2

OUT = Path(__file__).resolve().parent / "results" / "quant_accuracy.json"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def methods() -> list[tuple[str, Method]]:
    runs: list[tuple[str, Method]] = [
        ("full", Full()),
        ("kivi-2", KIVI(bits=2)),
        ("kivi-4", KIVI(bits=4)),
        ("zipcache-4/2 (40% low, 3.2 bits)", ZipCache()),
        ("zipcache-4/2 (50% low, 3.0 bits)", ZipCache(low_ratio=0.5)),
        ("zipcache-uniform-3 (3.0 bits)", ZipCache(high_bits=3, low_ratio=0.0)),
        ("zipcache-4/2 random (50% low, 3.0 bits)", ZipCache(low_ratio=0.5, saliency="random")),
    ]
    try:
        from kvbench.methods.quarot import QuaRot
    except ImportError:
        return runs
    return [*runs, ("rtn-4", QuaRot(bits=4, rotate=False)), ("quarot-4", QuaRot(bits=4))]


def window_bytes(engine: Engine, prompt: int, decode: int) -> int:
    """Bytes of the full-precision windows a cache for this generation holds (each layer's `ring` slots of
    keys and values in the model's dtype; 0 for caches without one)."""
    layers = engine.new_cache(prompt, decode).layers
    element = next(engine.model.parameters()).element_size()
    per_slot = 2 * engine.spec.num_kv_heads * engine.spec.head_dim * element
    return sum(getattr(layer, "ring", 0) for layer in layers) * per_slot


def wikitext(engine: Engine, task: WikiText2, tokenizer) -> dict[str, Any]:
    nll, tokens, held, windows, dense, seconds = 0.0, 0, [], [], [], 0.0
    for sample in task.samples(tokenizer):
        began = time.perf_counter()
        scored = task.evaluate(engine, sample)
        seconds += time.perf_counter() - began
        nll += scored.nll_sum
        tokens += scored.tokens
        window = len(sample.prompt_ids) + len(sample.continuation_ids)
        held.append(scored.measurement.kv_bytes_device / window)
        windows.append(window_bytes(engine, len(sample.prompt_ids), len(sample.continuation_ids)) / window)
        dense.append(scored.measurement.dense_kv_bytes / window)
    return {
        "perplexity": perplexity(nll, tokens),
        "nll_per_token": nll / tokens,
        "scored_tokens": tokens,
        "kv_bytes_per_token": sum(held) / len(held),
        # of which full-precision windows (float32 here: half as many bytes on a bf16 model)
        "window_bytes_per_token": sum(windows) / len(windows),
        "dense_kv_bytes_per_token": sum(dense) / len(dense),
        "wikitext_seconds": seconds,
    }


def passkey(engine: Engine, task: Passkey, tokenizer) -> dict[str, Any]:
    scores = [task.score(sample, task.evaluate(engine, sample)) for sample in task.samples(tokenizer)]
    return {"passkey_accuracy": task.aggregate(scores)["accuracy"], "passkey_samples": len(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--passkey-length", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--methods", default="", help="only the methods whose names contain one of these (comma-separated)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_cfg = ModelConfig(device="cpu")
    model, tokenizer = load_model(model_cfg)
    spec = model_spec(model_cfg)
    text_task = WikiText2(
        data_dir=str(DATA), prefix_tokens=args.prefix, continuation_tokens=args.continuation, limit=args.windows
    )
    key_task = Passkey(context_lengths=[args.passkey_length], depths=[0.1, 0.5, 0.9])
    rows = []
    chosen = [m for m in methods() if not args.methods or any(part in m[0] for part in args.methods.split(","))]
    for name, method in chosen:
        method.check(spec)
        engine = Engine(model, tokenizer, method, spec)
        row = {"method": name, "config": method.describe()}
        row |= wikitext(engine, text_task, tokenizer)
        row |= passkey(engine, key_task, tokenizer)
        rows.append(row)
        print(f"{name}: ppl {row['perplexity']:.3f}, {row['kv_bytes_per_token']:.0f} B/token, "
              f"passkey {row['passkey_accuracy']:.2f} ({row['wikitext_seconds']:.0f} s)", flush=True)  # fmt: skip
    settings = vars(args) | {"out": str(args.out), "model": model_cfg.name, "text": "wikitext2 test, stream protocol"}
    payload = {"settings": settings, "rows": rows, "environment": environment(torch.device("cpu"))}
    payload["commit"] = git_commit()
    write_json_atomic(args.out, payload)
    print("\n| method | perplexity | Δ vs first row | KV bytes/token | of which fp window | codes+params | passkey |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        delta = row["perplexity"] - rows[0]["perplexity"]
        packed = row["kv_bytes_per_token"] - row["window_bytes_per_token"]
        print(f"| {row['method']} | {row['perplexity']:.3f} | {delta:+.3f} | {row['kv_bytes_per_token']:.0f} | "
              f"{row['window_bytes_per_token']:.0f} | {packed:.0f} | {row['passkey_accuracy']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()

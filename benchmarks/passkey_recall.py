"""Passkey retrieval near the embedded model's 8k limit: ArkVale against eviction at equal device budget.

The setting of ArkVale's Table 1 (LongChat-7B at 10k-30k tokens, budgets 512-4096) scaled to the embedded
SmolLM2-135M (8192 positions): one context length near the limit, the passkey at several depths, and
StreamingLLM, H2O, SnapKV and ArkVale at the same device budget per layer (tokens), with the full cache
as the reference. Every compressing method exempts the first `--exempt-layers` layers, as the paper
does for ArkVale and its baselines. Two protocols: `one-phase` prefills the question with the context;
`two-phase` prefills the context alone and feeds the question through the decode path
(`Sample.question_ids`, the paper's "3-stage" generation), so the question meets an already-compressed
cache. Records accuracy, the bytes each cache holds on the device and in host memory, and ArkVale's
per-step estimate/select/recall counters.

    nice -n 10 python benchmarks/passkey_recall.py                      # CPU, the defaults below
    python benchmarks/passkey_recall.py --device cuda --depths 20       # the run in passkey_recall.md
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from kvbench.engine import Engine
from kvbench.method import Method
from kvbench.methods.arkvale import ArkVale, ArkValeLayer
from kvbench.methods.full import Full
from kvbench.methods.h2o import H2O
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.models import ModelConfig, load_model, model_spec
from kvbench.records import environment, git_commit, write_json_atomic
from kvbench.task import Sample
from kvbench.tasks.passkey import QUESTION, Passkey

PROTOCOLS = ("one-phase", "two-phase")
OUT = Path(__file__).resolve().parent / "results" / "passkey_recall.json"


def methods(budgets: list[int], exempt_layers: int) -> list[tuple[str, int | None, Method]]:
    """(name, budget, method) for every compared configuration; each yaml's defaults otherwise."""
    runs: list[tuple[str, int | None, Method]] = [("full", None, Full())]
    for budget in budgets:
        runs += [
            ("streamingllm", budget, StreamingLLM(budget=budget, exempt_layers=exempt_layers)),
            ("h2o", budget, H2O(budget=budget, exempt_layers=exempt_layers)),
            ("snapkv", budget, SnapKV(budget=budget, exempt_layers=exempt_layers)),
            ("arkvale", budget, ArkVale(budget=budget, exempt_layers=exempt_layers)),
        ]
    return runs


def two_phase(sample: Sample, tokenizer) -> Sample:
    """The same prompt with its question tokens moved to `question_ids` (fed through decode)."""
    for n in range(1, len(sample.prompt_ids)):
        if tokenizer.decode(sample.prompt_ids[-n:]) == QUESTION:
            return replace(sample, prompt_ids=sample.prompt_ids[:-n], question_ids=sample.prompt_ids[-n:])
    raise ValueError(f"sample {sample.id}: the prompt does not end with the passkey question")


def evaluate(engine: Engine, task: Passkey, samples: list[Sample]) -> dict[str, Any]:
    rows, measurements = [], []
    for sample in samples:
        output = task.evaluate(engine, sample)
        rows.append(task.score(sample, output))
        measurements.append(output.measurement)
    count = len(measurements)
    steps = sum(m.decode_steps for m in measurements)
    # Forwards through the decode path: generated tokens after the first, and question tokens.
    decode_path_steps = steps + sum(len(sample.question_ids) for sample in samples)
    stats: dict[str, float] = {}
    for m in measurements:
        for key, value in m.method_stats.items():
            stats[key] = stats.get(key, 0.0) + value
    result = {
        "metrics": task.aggregate(rows),
        "kv_bytes_device": sum(m.kv_bytes_device for m in measurements) / count,
        "kv_bytes_device_peak": max(m.kv_bytes_device_peak for m in measurements),
        "kv_bytes_host": sum(m.kv_bytes_host for m in measurements) / count,
        "dense_kv_bytes": sum(m.dense_kv_bytes for m in measurements) / count,
        "prompt_tokens_mean": sum(m.prompt_tokens for m in measurements) / count,
        "prefill_s_mean": sum(m.prefill_s for m in measurements) / count,
        "decode_ms_per_step": 1000 * sum(m.decode_s for m in measurements) / steps if steps else None,
        "decode_steps": steps,
        "method_stats": stats,
        "rows": rows,
    }
    if stats.get("selection_steps"):
        # Per forward through the decode path (all ArkVale layers together); recalls per layer and step.
        result["arkvale_per_step"] = {
            "decode_path_steps": decode_path_steps,
            "selection_steps": stats["selection_steps"] / decode_path_steps,
            "pages_recalled_per_layer_step": stats["pages_recalled"] / stats["selection_steps"],
        }
    return result


def arkvale_bytes_split(engine: Engine, prompt_len: int, decode_len: int) -> dict[str, int]:
    """ArkVale's device bytes split into resident pages and digests (the digests grow with context)."""
    cache = engine.new_cache(prompt_len, decode_len)
    with torch.inference_mode():
        engine._prefill(cache, list(range(100, 100 + prompt_len)))
        cache.finish_prefill()
    split = {"resident_kv": 0, "digests": 0, "page_table": 0, "exempt_layers_kv": 0, "host_backup": 0}
    for layer in cache.layers:
        for name, tensor in layer.tensors().items():
            size = tensor.numel() * tensor.element_size()
            if not isinstance(layer, ArkValeLayer):
                split["exempt_layers_kv"] += size
            elif name.startswith("digest"):
                split["digests"] += size
            elif name == "slot_page":
                split["page_table"] += size
            else:
                split["resident_kv"] += size
        split["host_backup"] += sum(t.numel() * t.element_size() for t in layer.host_tensors().values())
    return split


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| protocol | method | budget | accuracy | device KV MiB | host KV MiB | pages recalled / layer-step |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        per_step = run.get("arkvale_per_step", {})
        recalls = f"{per_step['pages_recalled_per_layer_step']:.2f}" if per_step else ""
        lines.append(
            f"| {run['protocol']} | {run['method']} | {run['budget'] or 'all'} | {run['metrics']['accuracy']:.2f} "
            f"| {run['kv_bytes_device'] / 2**20:.1f} | {run['kv_bytes_host'] / 2**20:.1f} | {recalls} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=7000, help="prompt tokens (the model has 8192 positions)")
    parser.add_argument("--depths", type=int, default=5, help="evenly spread passkey depths in [0, 1)")
    parser.add_argument("--samples-per-depth", type=int, default=1)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--exempt-layers", type=int, default=2)
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--git-commit", default="", help="recorded commit (default: git rev-parse HEAD here)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    began = time.perf_counter()
    config = ModelConfig(device=args.device, dtype=args.dtype)
    spec = model_spec(config)
    # Depths at the centres of equal bins (0.1, 0.3, ... for 5): never exactly at the prompt's edges.
    depths = [round((i + 0.5) / args.depths, 4) for i in range(args.depths)]
    task = Passkey(context_lengths=[args.context], depths=depths, samples_per_cell=args.samples_per_depth)
    model, tokenizer = load_model(config)
    one_phase = list(task.samples(tokenizer))
    samples = {"one-phase": one_phase, "two-phase": [two_phase(s, tokenizer) for s in one_phase]}

    env = environment(torch.device(config.device))
    env["git_commit"] = args.git_commit or git_commit()
    record: dict[str, Any] = {
        "benchmark": "passkey_recall",
        "complete": False,
        "environment": env,
        "model": {**asdict(config), **asdict(spec)},
        "task": task.describe(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [],
    }
    for name, budget, method in methods(args.budgets, args.exempt_layers):
        method.check(spec)
        task.check(spec, method)
        engine = Engine(model, tokenizer, method, spec, prefill_chunk=args.prefill_chunk)
        engine.warmup()
        for protocol in args.protocols:
            run_began = time.perf_counter()
            result = evaluate(engine, task, samples[protocol])
            if name == "arkvale":
                first = samples[protocol][0]
                decode_len = len(first.question_ids) + task.max_new_tokens
                split = arkvale_bytes_split(engine, len(first.prompt_ids), decode_len)
                result["arkvale_device_bytes_split"] = split
            run = {"protocol": protocol, "method": name, "budget": budget, "describe": method.describe()}
            record["runs"].append({**run, **result, "wall_s": time.perf_counter() - run_began})
            record["wall_s"] = time.perf_counter() - began
            write_json_atomic(args.out, record)  # after every run: an interrupted benchmark keeps its results
            print(f"{protocol} {name:>12} budget={budget}: {result['metrics']['accuracy']:.2f}", flush=True)

    record["complete"] = True
    write_json_atomic(args.out, record)
    print(table(record["runs"]))
    print(f"wrote {args.out} in {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

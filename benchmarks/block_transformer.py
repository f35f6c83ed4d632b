"""Block Transformer vs a vanilla decoder of the same depth and width, trained from scratch on the same tokens:
the paper's claim (Ho et al., NeurIPS 2024, arXiv 2406.02657: 10-20x decode throughput at equal perplexity)
checked at our scale, on one GPU, through kvbench's engine.

Two steps, because the GPU machine has no tokenizer files, `datasets` or network:

    python benchmarks/block_transformer.py prepare                  # here, CPU: tokenize into .gpu_data/
    PYTHONPATH=<copy> python benchmarks/block_transformer.py run --quiet --out block_transformer_h200.json
    python benchmarks/block_transformer.py run --device cpu --tiny  # the whole pipeline on CPU, in minutes

`prepare` is cla_training.py's (same corpus, same tokenizer, WikiText-2 test never trained on), written to
`.gpu_data/block_transformer/`.

`run` trains `vanilla` (kvbench.train's llama: 8 layers, hidden 512, 8 heads, MHA as the paper's Pythia
baselines) and `block` (kvbench/block_model.py: the same 8 layers split 4 block-decoder + 4 token-decoder,
L_B = 4, prefix of 2 vectors) with the same seed (same batches in the same order) and the same number of
steps, then for each, in the same process:
- WikiText-2 test perplexity, teacher-forced, non-overlapping windows of `seq_len` (each scores its tokens
  2..seq_len), and the loss on the corpus's held-out pieces;
- decode throughput through `kvbench.engine` (method=full, bf16, greedy, no early stop) at batch 1, 16, 64,
  prompts of 2048 WikiText-2 tokens and 128 decoded tokens (the paper's prefix 2048 / decode 128 setting),
  with `engine=graph` (the eager step captured in CUDA graphs; the block model: one graph per step shape)
  and `engine=eager`; tokens/s = tokens generated in the timed steps / their CUDA-event time;
- KV bytes per token, measured from the cache's tensors at batch 1 (prompt + decoded tokens held), next to
  the formula (block: `block_model.kv_bytes_formula`).

Time budget: `--train-seconds` (default 270) covers both trainings. A few steps of each model are timed
first and the step count is cut, equally for both, to what fits; each training also stops at its share
(`stopped_early`). Evaluation comes after and is timed apart (`eval_s`).

Deviations from the paper, at this scale: ~50M-parameter models on ~10-50M tokens (the paper: 85M-1.4B
parameters on 300B tokens); equal depth and width, so non-embedding parameters are equal up to the prefix
projection, while the block model has one more embedding table (vocab x hidden / L_B); the paper compares
at equal perplexity, which needs a larger block model: here both the perplexity gap and the throughput
ratio are reported, and a 50M model with a 49k vocabulary spends much of its decode time in the output
head and in kernel launches, which the block structure does not shrink.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cla_training's data steps, when run from elsewhere

from cla_training import load_data, seconds_per_step, sync
from cla_training import prepare as prepare_tokens

from kvbench.block_model import kv_bytes_formula
from kvbench.train.config import DataSettings, ModelShape, TrainConfig, TrainSettings
from kvbench.train.data import Pieces
from kvbench.train.loop import Trainer, autocast_dtype, evaluate
from kvbench.train.model import build_model, kv_bytes_per_token, parameter_counts

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GPU_DATA = REPO / ".gpu_data" / "block_transformer"
OUT = REPO / "benchmarks" / "results" / "block_transformer.json"

DESIGNS = {"vanilla": dict(arch="llama"), "block": dict(arch="block", block_len=4, block_layers=0, prefix_tokens=2)}
GPU_SHAPE = dict(layers=8, hidden=512, heads=8, kv_heads=8, max_positions=4096)
GPU_TRAIN = dict(steps=1500, batch=32, seq_len=512, lr=2e-3, warmup_steps=100, eval_every=1_000_000)
GPU_DECODE = dict(batches=(1, 16, 64), prompt_tokens=2048, decode_tokens=128)
TINY_SHAPE = dict(layers=4, hidden=64, heads=4, kv_heads=4, max_positions=512)
TINY_TRAIN = dict(steps=40, batch=4, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=1_000_000)
TINY_DECODE = dict(batches=(1, 4), prompt_tokens=48, decode_tokens=16)  # 64 tokens held: whole 64-slot blocks


def config_for(name: str, args: argparse.Namespace, steps: int) -> TrainConfig:
    shape = ModelShape(name=name, **(TINY_SHAPE if args.tiny else GPU_SHAPE), **DESIGNS[name])
    train = {**(TINY_TRAIN if args.tiny else GPU_TRAIN), "steps": steps}
    settings = TrainSettings(**train, device=args.device, out_dir=str(Path(args.work_dir) / name), save_every=steps,
                             resume=False, progress=not args.quiet)  # fmt: skip
    return TrainConfig(shape, DataSettings(paths=[str(args.gpu_data)]), settings)


def model_spec_of(model: torch.nn.Module, name: str):
    from kvbench.cache import ModelSpec

    c = model.config
    return ModelSpec(name=name, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                     num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                     max_positions=c.max_position_embeddings)  # fmt: skip


def decode_point(model, name: str, prompts: list[list[int]], batch: int, decode_tokens: int, engine: str) -> dict:
    """One generation of `batch` sequences through kvbench's engine: decode throughput and cache bytes."""
    from kvbench.engine import Engine, Request
    from kvbench.methods.full import Full

    point: dict[str, Any] = {"model": name, "engine": engine, "batch": batch}
    try:
        runner = Engine(model, None, Full(), model_spec_of(model, name), engine=engine)
        runner.generate(prompts[0][:64], max_new_tokens=4)  # first-call costs (kernel selection, Triton JIT)
        requests = [
            Request(prompts[i % len(prompts)], decode_tokens, min_new_tokens=decode_tokens) for i in range(batch)
        ]
        generations = runner.generate_batch(requests)
    except Exception as error:  # recorded, and the other points go on: one failure must not cost the run
        oom = isinstance(error, torch.OutOfMemoryError)
        return {**point, "status": "oom" if oom else "error", "error": f"{type(error).__name__}: {error}"[:500]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    m = generations[0].measurement
    tokens = sum(g.measurement.decode_tokens for g in generations)
    held = len(prompts[0]) + decode_tokens
    return {
        **point,
        "status": "ok",
        "prompt_tokens": len(prompts[0]),
        "decode_tokens_per_sequence": decode_tokens,
        "timed_steps": m.decode_steps,
        "decode_s": m.decode_s,
        "decode_tokens_per_s": tokens / m.decode_s if m.decode_s else None,
        "decode_ms_per_step": 1000 * m.decode_s / m.decode_steps if m.decode_steps else None,
        "prefill_s_per_sequence": m.prefill_s,
        "compile_s": m.compile_s,
        "kv_bytes_per_sequence": m.kv_bytes_device,
        "kv_bytes_per_token": m.kv_bytes_device / held,
        "peak_memory_bytes": m.peak_memory_bytes,
    }


@torch.no_grad()
def engine_vs_teacher_forced(model, name: str, windows: torch.Tensor, count: int, continuation: int) -> dict:
    """The harness's stream perplexity (prefix prefilled, each continuation token fed through the cache by
    `Engine.score_continuation`) next to teacher-forced scoring of the same tokens, on the first `count`
    WikiText-2 windows: the two paths of one model must agree."""
    from kvbench.engine import Engine
    from kvbench.methods.full import Full

    engine = Engine(model, None, Full(), model_spec_of(model, name))
    device = next(model.parameters()).device
    nll_engine = nll_teacher_forced = 0.0
    for window in windows[:count]:
        ids, split = window.tolist(), window.shape[0] - continuation
        nll_engine += engine.score_continuation(ids[:split], ids[split:]).nll_sum
        logits = model(input_ids=window[None].to(device)).logits[0, split - 1 : -1].float()
        nll_teacher_forced += float(F.cross_entropy(logits, window[split:].to(device), reduction="sum"))
    tokens = count * continuation
    return {
        "stream_windows": count,
        "stream_continuation_tokens": continuation,
        "engine_stream_perplexity": math.exp(nll_engine / tokens),
        "teacher_forced_same_tokens_perplexity": math.exp(nll_teacher_forced / tokens),
    }


def kv_formula_per_token(model, tokens: int, bytes_per_element: int) -> float:
    if hasattr(model, "make_kvbench_cache"):
        return kv_bytes_formula(model.config, tokens, bytes_per_element) / tokens
    return kv_bytes_per_token(model, bytes_per_element)


def decode_grid(model, name: str, args, prompts: list[list[int]]) -> list[dict]:
    decode = TINY_DECODE if args.tiny else GPU_DECODE
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    inference = copy.deepcopy(model).to(dtype).eval()
    engines = ("graph", "eager") if args.device.startswith("cuda") else ("eager",)
    points = []
    for engine in engines:
        for batch in decode["batches"]:
            points.append(decode_point(inference, name, prompts, batch, decode["decode_tokens"], engine))
            print(json.dumps(points[-1]), flush=True)
    del inference
    return points


def train_and_measure(name: str, args, steps: int, pieces: Pieces, windows: torch.Tensor, meta: dict,
                      prompts: list[list[int]], train_seconds: float) -> tuple[dict, list[dict]]:  # fmt: skip
    config = config_for(name, args, steps)
    shutil.rmtree(config.train.out_dir, ignore_errors=True)
    trainer = Trainer(config, pieces, meta["vocab_size"])
    result = trainer.run(max_seconds=train_seconds)
    started = time.perf_counter()
    dtype = autocast_dtype(config.train.precision, trainer.device)
    model = trainer.model.eval()
    ppl = math.exp(evaluate(model, windows, config.train.batch, dtype))
    heldout = evaluate(model, pieces.val, config.train.batch, dtype)
    agreement = engine_vs_teacher_forced(model, name, windows, count=4, continuation=min(64, windows.shape[1] // 2))
    points = decode_grid(model, name, args, prompts)
    element = 2 if args.device.startswith("cuda") else 4
    held = len(prompts[0]) + (TINY_DECODE if args.tiny else GPU_DECODE)["decode_tokens"]
    row = {
        "model": name,
        "shape": asdict(config.model),
        **parameter_counts(model),
        "steps": result.step,
        "tokens": result.tokens,
        "train_s": round(result.elapsed_s, 2),
        "stopped_early": result.stopped_early,
        "final_train_loss": result.loss,
        "heldout_perplexity": math.exp(heldout),
        "wikitext2_perplexity": ppl,
        "wikitext2_tokens_scored": windows.shape[0] * (windows.shape[1] - 1),
        **agreement,
        "kv_bytes_per_token_formula": kv_formula_per_token(model, held, element),
        "kv_bytes_tokens_held": held,
        "eval_s": round(time.perf_counter() - started, 2),
    }
    measured = [p for p in points if p["status"] == "ok" and p["batch"] == 1]
    row["kv_bytes_per_token"] = measured[0]["kv_bytes_per_token"] if measured else None
    print(json.dumps(row), flush=True)
    return row, points


def preflight(args, windows: torch.Tensor, vocab_size: int, prompts: list[list[int]]) -> None:
    """Each design's evaluation path once, untrained and short: a failure shows in seconds."""
    device = torch.device(args.device)
    for name in DESIGNS:
        config = config_for(name, args, steps=1)
        model = build_model(config.model, vocab_size).to(device).eval()
        evaluate(model, windows[:1], 1, autocast_dtype(config.train.precision, device))
        short = [p[:64] for p in prompts]
        for engine in ("graph", "eager") if device.type == "cuda" else ("eager",):
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            point = decode_point(copy.deepcopy(model).to(dtype), name, short, 2, 8, engine)
            print(f"preflight {name} {engine}: {point['status']} {point.get('error', '')}", flush=True)


def ratios(points: list[dict]) -> list[dict]:
    """Block over vanilla decode throughput at each (engine, batch) both measured."""
    by_key = {(p["model"], p["engine"], p["batch"]): p for p in points if p["status"] == "ok"}
    out = []
    for (model, engine, batch), block in by_key.items():
        vanilla = by_key.get(("vanilla", engine, batch))
        if model == "block" and vanilla and vanilla["decode_tokens_per_s"] and block["decode_tokens_per_s"]:
            ratio = block["decode_tokens_per_s"] / vanilla["decode_tokens_per_s"]
            out.append({"engine": engine, "batch": batch, "throughput_block_over_vanilla": ratio})
    return out


def run(args: argparse.Namespace) -> None:
    from kvbench.records import environment, git_commit, write_json_atomic

    wall_started = time.perf_counter()
    torch.manual_seed(0)
    train = TINY_TRAIN if args.tiny else GPU_TRAIN
    decode = TINY_DECODE if args.tiny else GPU_DECODE
    pieces, windows, meta = load_data(Path(args.gpu_data), train["seq_len"], args.tiny)
    # Decode prompts: consecutive WikiText-2 test windows of prompt_tokens (real text, as every task's).
    stream = windows.flatten()
    count = min(max(decode["batches"]), len(stream) // decode["prompt_tokens"])
    prompts = [stream[i * decode["prompt_tokens"] : (i + 1) * decode["prompt_tokens"]].tolist() for i in range(count)]
    preflight(args, windows, meta["vocab_size"], prompts)
    requested = args.steps or train["steps"]
    step_s = {name: seconds_per_step(config_for(name, args, requested), pieces, meta["vocab_size"]) for name in DESIGNS}
    sync(torch.device(args.device))
    fitting = int(0.95 * args.train_seconds / sum(step_s.values()))
    steps = max(1, min(requested, fitting))
    print(f"ms/step { ({k: round(v * 1000, 1) for k, v in step_s.items()}) }; {steps} steps each", flush=True)
    rows, points = [], []
    for name in DESIGNS:
        share = args.train_seconds * step_s[name] / sum(step_s.values())
        row, grid = train_and_measure(name, args, steps, pieces, windows, meta, prompts, share)
        rows.append(row)
        points.extend(grid)
    settings = config_for("block", args, steps)
    report = {
        "benchmark": "block_transformer",
        "claim": "Block Transformer: 10-20x decode throughput of a vanilla transformer at equal perplexity "
        "(Ho et al., NeurIPS 2024, arXiv 2406.02657; prefix 2048 / decode 128)",
        "rows": rows,
        "decode": points,
        "throughput_ratios": ratios(points),
        "budget": {
            "train_seconds": args.train_seconds,
            "steps_requested": requested,
            "steps_fit_budget": fitting,
            "steps": steps,
            "seconds_per_step": step_s,
            "tokens_per_model": steps * settings.train.batch * settings.train.seq_len,
        },
        "settings": {
            "train": asdict(settings.train),
            "decode": decode,
            "tiny": args.tiny,
            "method": "full",
            "dtype": "bf16" if args.device.startswith("cuda") else "fp32",
        },
        "data": meta,
        "environment": {**environment(torch.device(args.device)), "git_commit_run": git_commit()},
        "wall_s": round(time.perf_counter() - wall_started, 2),
    }
    write_json_atomic(Path(args.out), report)
    print(table(rows, points))
    for ratio in report["throughput_ratios"]:
        print(f"block / vanilla decode throughput, {ratio['engine']}, batch {ratio['batch']}: "
              f"{ratio['throughput_block_over_vanilla']:.2f}x")  # fmt: skip
    print(f"wall {report['wall_s']} s; wrote {args.out}")


def table(rows: list[dict], points: list[dict]) -> str:
    lines = ["| model | params (non-emb.) | steps | WikiText-2 ppl | KV B/token (formula) |", "|---|---|---|---|---|"]
    for r in rows:
        kv = f"{r['kv_bytes_per_token']:.0f}" if r["kv_bytes_per_token"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['params']:,} ({r['params_non_embedding']:,}) | {r['steps']} "
            f"| {r['wikitext2_perplexity']:.2f} | {kv} ({r['kv_bytes_per_token_formula']:.0f}) |"
        )
    lines += ["", "| model | engine | batch | decode tokens/s | ms/step |", "|---|---|---|---|---|"]
    for p in points:
        if p["status"] != "ok":
            lines.append(f"| {p['model']} | {p['engine']} | {p['batch']} | {p['status']} | |")
            continue
        lines.append(
            f"| {p['model']} | {p['engine']} | {p['batch']} | {p['decode_tokens_per_s']:.0f} "
            f"| {p['decode_ms_per_step']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("--data-dir", default=str(SHARED), help="prepare: the shared data folder")
    parser.add_argument("--gpu-data", default=str(GPU_DATA), help="token ids written by prepare, read by run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and corpus slice: the pipeline on CPU")
    parser.add_argument("--steps", type=int, default=0, help="0: the preset's (the time budget may cut it)")
    parser.add_argument("--train-seconds", type=float, default=270.0, help="both models' training together")
    parser.add_argument("--work-dir", default="/tmp/kvbench_block_transformer", help="checkpoints (not kept)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare_tokens(args)
    else:
        run(args)


if __name__ == "__main__":
    main()

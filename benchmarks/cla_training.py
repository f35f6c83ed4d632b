"""MQA vs MQA + CLA2 vs GQA trained from scratch on the same tokens: the Cross-Layer Attention paper's
comparison (Brandon et al., NeurIPS 2024, arXiv 2405.12981) at our scale.

Two steps, because the GPU machine has no tokenizer files, `datasets` or network:

    python benchmarks/cla_training.py prepare                       # here, CPU: tokenize into .gpu_data/
    PYTHONPATH=<copy> python benchmarks/cla_training.py run --out benchmarks/results/cla_training_h200.json
    python benchmarks/cla_training.py run --device cpu --tiny       # the whole pipeline on CPU, in minutes

`prepare` tokenizes (the embedded SmolLM2 tokenizer, 49,152 tokens) the training corpus and WikiText-2 test
into `.gpu_data/cla_training/` (uint16 token ids + meta.json). Training corpus, all local (`../shared/data`):
RULER's Paul Graham essays, Pride and Prejudice + a PG-19 excerpt, LongBench's multi_news contexts and
LongBench v2 (short) contexts; WikiText-2 test is never trained on.

`run` trains the three models with `kvbench.train` (same seed, so the same batches in the same order, and
the same steps), then measures for each: perplexity on WikiText-2 test (teacher-forced, non-overlapping
windows of `seq_len`, each scoring its tokens 2..seq_len), the loss on the corpus's held-out pieces, and KV
bytes per token measured from the kvbench cache (`Full` method, the model in bf16, a prompt of `seq_len`
tokens: `KVCache.kv_bytes` / tokens held), next to the formula 2 x KV layers x kv_heads x head_dim x 2 B.

The time budget: `--max-seconds` (default 150) covers all three models, training and evaluation. Before
training, a few steps of the largest model are timed and the step count is cut, equally for all three, to
what fits (`steps_fit_budget` in the output); each training run also stops at its share of the budget
(`stopped_early: true` says it did, and then its tokens are fewer than the others').

Deviations from the paper: ~50M-parameter models (half of them the tied embedding of a 49k vocabulary)
trained on ~10-20M tokens instead of 1B/3B models on 100B tokens; one learning rate for all three (the
paper tunes it per model); parameter counts are not equalised: they are stated (MQA+CLA2 has the consumer
layers' K/V projections fewer, GQA a second K/V head more).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvbench.train.config import DataSettings, ModelShape, TrainConfig, TrainSettings
from kvbench.train.data import Pieces, read_documents, split_pieces
from kvbench.train.loop import Trainer, autocast_dtype, evaluate
from kvbench.train.model import build_model, kv_bytes_per_token, parameter_counts

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GPU_DATA = REPO / ".gpu_data" / "cla_training"
OUT = REPO / "benchmarks" / "results" / "cla_training.json"

# (file, text field) of the training corpus, under ../shared/data.
CORPUS = [
    ("paul_graham_essays/ruler_PaulGrahamEssays.json", "text"),
    ("pg19_style/pride_and_prejudice_gutenberg1342.txt", "text"),
    ("pg19_style/pg19_firstbook_excerpt.txt", "text"),
    ("longbench/data/multi_news.jsonl", "context"),
    ("longbench_v2_short/data_short.jsonl", "context"),
]
EVAL_FILE = "wikitext2/wiki.test.raw"

# The three designs, at hidden 512 with 8 heads of 64: MQA 2 KiB of KV per token (bf16), CLA2 1 KiB, GQA 4 KiB.
DESIGNS = {"mqa": dict(kv_heads=1, kv_sharing=1), "mqa_cla2": dict(kv_heads=1, kv_sharing=2),
           "gqa2": dict(kv_heads=2, kv_sharing=1)}  # fmt: skip
GPU_SHAPE = dict(layers=8, hidden=512, heads=8, max_positions=2048)
GPU_TRAIN = dict(steps=1500, batch=32, seq_len=512, lr=2e-3, warmup_steps=100, eval_every=1_000_000)
TINY_SHAPE = dict(layers=4, hidden=64, heads=4, max_positions=512)
TINY_TRAIN = dict(steps=40, batch=4, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=1_000_000)
TINY_TOKENS = 200_000  # of the corpus, and 8k of WikiText-2, in --tiny


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(args: argparse.Namespace) -> None:
    """Tokenize the corpus and WikiText-2 test into uint16 ids (the vocabulary fits) and meta.json."""
    from kvbench.models import ModelConfig, load_tokenizer
    from kvbench.records import git_commit
    from kvbench.tasks.wikitext2 import join_rows, rows_of_raw_file
    from kvbench.train.data import token_stream

    tokenizer = load_tokenizer(ModelConfig())
    assert len(tokenizer) <= np.iinfo(np.uint16).max
    data_dir, out = Path(args.data_dir), Path(args.gpu_data)
    out.mkdir(parents=True, exist_ok=True)
    sources, docs = [], []
    for name, field in CORPUS:
        path = data_dir / name
        docs.extend(read_documents(path, field))
        sources.append({"file": name, "field": field, "sha256": sha256(path)})
    train_ids = token_stream(docs, tokenizer)
    eval_path = data_dir / EVAL_FILE
    # The harness's WikiText-2 text and tokenization (tasks/wikitext2.py): rows joined by blank lines.
    eval_ids = tokenizer(join_rows(rows_of_raw_file(eval_path.read_text(encoding="utf-8"))), verbose=False)
    np.save(out / "train.npy", train_ids.numpy().astype(np.uint16))
    np.save(out / "wikitext2_test.npy", np.asarray(eval_ids["input_ids"], dtype=np.uint16))
    meta = {
        "tokenizer": "SmolLM2-135M-Instruct (kvbench's embedded model)",
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "train_tokens": len(train_ids),
        "wikitext2_test_tokens": len(eval_ids["input_ids"]),
        "corpus": sources,
        "eval": {"file": EVAL_FILE, "sha256": sha256(eval_path)},
        "prepared_at_commit": git_commit(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: v for k, v in meta.items() if k != "corpus"}, indent=1))


def load_data(gpu_data: Path, seq_len: int, tiny: bool) -> tuple[Pieces, torch.Tensor, dict[str, Any]]:
    meta = json.loads((gpu_data / "meta.json").read_text())
    train = torch.from_numpy(np.load(gpu_data / "train.npy").astype(np.int64))
    wikitext = torch.from_numpy(np.load(gpu_data / "wikitext2_test.npy").astype(np.int64))
    if tiny:
        train, wikitext = train[:TINY_TOKENS], wikitext[: 8 * 1024]
    windows = len(wikitext) // seq_len
    return split_pieces(train, seq_len, val_every=50), wikitext[: windows * seq_len].view(windows, seq_len), meta


def config_for(name: str, args: argparse.Namespace, steps: int) -> TrainConfig:
    shape = ModelShape(name=name, **(TINY_SHAPE if args.tiny else GPU_SHAPE), **DESIGNS[name])
    train = dict(TINY_TRAIN if args.tiny else GPU_TRAIN)
    settings = TrainSettings(**{**train, "steps": steps}, device=args.device, out_dir=str(Path(args.work_dir) / name),
                             save_every=steps, resume=False, progress=not args.quiet)  # fmt: skip
    return TrainConfig(shape, DataSettings(paths=[str(args.gpu_data)]), settings)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(config: TrainConfig, pieces: Pieces, vocab_size: int) -> float:
    """Time a few optimizer steps (after two warm-up steps) of a throwaway model."""
    trainer = Trainer(replace(config, train=replace(config.train, out_dir=config.train.out_dir + "_timing")),
                      pieces, vocab_size)  # fmt: skip
    for _ in range(2):
        trainer.train_step()
    sync(trainer.device)
    started, timed = time.perf_counter(), 5
    for _ in range(timed):
        trainer.train_step()
    sync(trainer.device)
    shutil.rmtree(trainer.out_dir, ignore_errors=True)
    return (time.perf_counter() - started) / timed


@torch.no_grad()
def kv_bytes_measured(model: torch.nn.Module, config: TrainConfig) -> dict[str, Any]:
    """KV bytes per token held, from a kvbench cache of the trained model in bf16 (`Full`, dense)."""
    from kvbench.cache import ModelSpec
    from kvbench.engine import Engine
    from kvbench.methods.full import Full

    shape, tokens = config.model, config.train.seq_len
    spec = ModelSpec(name=shape.name, num_layers=shape.layers, num_heads=shape.heads, num_kv_heads=shape.kv_heads,
                     head_dim=shape.resolved_head_dim, max_positions=shape.max_positions,
                     kv_sharing=shape.kv_sharing)  # fmt: skip
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    # seq_len - 1 prompt tokens + 1 generated: the cache holds seq_len tokens, a multiple of its 64-slot blocks.
    generation = Engine(bf16, None, Full(), spec).generate(list(range(1, tokens)), 1)
    held = generation.measurement.prompt_tokens + 1
    return {
        "kv_bytes_per_token": generation.measurement.kv_bytes_device / held,
        "kv_bytes_per_token_formula": kv_bytes_per_token(model, torch.bfloat16.itemsize),
        "kv_bytes_tokens_held": held,
    }


def wikitext_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int, dtype) -> float:
    """exp of the mean loss over non-overlapping windows (each scores its tokens 2..seq_len, all the same
    count, so the mean of window means is the mean over tokens)."""
    return math.exp(evaluate(model, windows, batch, dtype))


def train_and_measure(name: str, args, steps: int, pieces: Pieces, windows: torch.Tensor, meta: dict,
                      seconds_left: float) -> dict[str, Any]:  # fmt: skip
    config = config_for(name, args, steps)
    shutil.rmtree(config.train.out_dir, ignore_errors=True)
    trainer = Trainer(config, pieces, meta["vocab_size"])
    result = trainer.run(max_seconds=seconds_left)
    started = time.perf_counter()
    dtype = autocast_dtype(config.train.precision, trainer.device)
    ppl = wikitext_perplexity(trainer.model, windows, config.train.batch, dtype)
    heldout = evaluate(trainer.model, pieces.val, config.train.batch, dtype)
    row = {
        "model": name,
        "kv_heads": config.model.kv_heads,
        "kv_sharing": config.model.kv_sharing,
        **parameter_counts(trainer.model),
        "steps": result.step,
        "tokens": result.tokens,
        "train_s": round(result.elapsed_s, 2),
        "stopped_early": result.stopped_early,
        "final_train_loss": result.loss,
        "heldout_loss": heldout,
        "heldout_perplexity": math.exp(heldout),
        "wikitext2_perplexity": ppl,
        "wikitext2_tokens_scored": windows.shape[0] * (windows.shape[1] - 1),
        **kv_bytes_measured(trainer.model, config),
    }
    row["eval_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(row), flush=True)
    return row


def preflight(args: argparse.Namespace, windows: torch.Tensor, vocab_size: int) -> None:
    """Every design's evaluation path once, untrained: a failure shows in seconds, not after the training."""
    for name in DESIGNS:
        config = config_for(name, args, steps=1)
        device = torch.device(args.device)
        model = build_model(config.model, vocab_size).to(device)
        evaluate(model, windows[:1], 1, autocast_dtype(config.train.precision, device))
        kv_bytes_measured(model, config)


def run(args: argparse.Namespace) -> None:
    from kvbench.records import environment, git_commit, write_json_atomic

    wall_started = time.perf_counter()
    torch.manual_seed(0)
    seq_len = (TINY_TRAIN if args.tiny else GPU_TRAIN)["seq_len"]
    pieces, windows, meta = load_data(Path(args.gpu_data), seq_len, args.tiny)
    requested = args.steps or (TINY_TRAIN if args.tiny else GPU_TRAIN)["steps"]
    preflight(args, windows, meta["vocab_size"])
    largest = config_for("gqa2", args, requested)
    step_s = seconds_per_step(largest, pieces, meta["vocab_size"])
    # 85% of what is left goes to training, the rest to evaluation and checkpoints.
    left = args.max_seconds - (time.perf_counter() - wall_started)
    fitting = int(0.85 * left / len(DESIGNS) / step_s)
    steps = max(1, min(requested, fitting))
    print(f"{step_s * 1000:.1f} ms/step (gqa2); {steps} steps each (asked {requested}, {fitting} fit)", flush=True)
    rows, eval_s = [], 0.0
    for index, name in enumerate(DESIGNS):
        # Each model's training may take its share of what is left once the evaluations still to come
        # (estimated by the last one's time) are set aside: the guard against a slower machine than timed.
        remaining = len(DESIGNS) - index
        left = args.max_seconds - (time.perf_counter() - wall_started) - remaining * eval_s
        rows.append(train_and_measure(name, args, steps, pieces, windows, meta, max(left, 0.0) / remaining))
        eval_s = rows[-1]["eval_s"]
    settings = asdict(config_for("mqa", args, steps))
    report = {
        "benchmark": "cla_training",
        "claim": "MQA+CLA2 halves MQA's KV bytes per token at nearly the same perplexity (Brandon et al. 2024)",
        "rows": rows,
        "budget": {
            "max_seconds": args.max_seconds,
            "steps_requested": requested,
            "steps_fit_budget": fitting,
            "steps": steps,
            "seconds_per_step_gqa2": step_s,
            "tokens_per_model": steps * settings["train"]["batch"] * seq_len,
        },
        "settings": {"shape": settings["model"], "train": settings["train"], "tiny": args.tiny},
        "data": meta,
        "environment": {**environment(torch.device(args.device)), "git_commit_run": git_commit()},
        "wall_s": round(time.perf_counter() - wall_started, 2),
    }
    write_json_atomic(Path(args.out), report)
    print(table(rows))
    print(f"wall {report['wall_s']} s; wrote {args.out}")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | params (non-emb.) | steps | tokens | WikiText-2 ppl | held-out ppl | KV B/token |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} ({r['params_non_embedding']:,}) | {r['steps']} | {r['tokens']:,} "
            f"| {r['wikitext2_perplexity']:.2f} | {r['heldout_perplexity']:.2f} | {r['kv_bytes_per_token']:.0f} |"
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
    parser.add_argument("--max-seconds", type=float, default=150.0, help="all three models, training + eval")
    parser.add_argument("--work-dir", default="/tmp/kvbench_cla_training", help="checkpoints (not kept)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args)
    else:
        run(args)


if __name__ == "__main__":
    main()

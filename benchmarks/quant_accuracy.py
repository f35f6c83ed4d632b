"""Quantized KV caches on the embedded model: WikiText-2 perplexity, passkey, LongBench, and measured bytes.

    nice -n 10 python benchmarks/quant_accuracy.py                  # CPU, one thread, the defaults (~60 min)
    nice -n 10 python benchmarks/quant_accuracy.py --summary-only   # tables and JSON from the rows so far
    python benchmarks/quant_accuracy.py --windows 1 --passkey-per-depth 1 --longbench-per-task 1 \\
        --methods full,kivi-4 --rows /tmp/q.jsonl --out /tmp/q.json   # a timing run

Methods (`CONFIGS`): the full cache; round-to-nearest (RTN) and QuaRot at 4 and 2 bits (same quantizer, with
and without the Hadamard rotations); KIVI 4- and 2-bit (paper defaults: group 32, window 128); ZipCache at the
paper's 4/2 bits with 40% low (3.2 bits on average), 4/2 bits with 50% low (3.0 bits), uniform 3 bits (the
same quantizer without saliency: low_ratio 0) at the same 3.0 average, and 4/2 bits with the 50% low chosen
at random (does the saliency ranking matter?). Every method uses its packed storage.

Everything runs through the harness's own tasks and engine (`Task.samples` / `evaluate` / `score`):
- WikiText-2, the `stream` protocol (`tasks/wikitext2.py`): windows of `--prefix` tokens prefilled
  (full-precision attention, then quantized), then `--continuation` tokens predicted and fed one at a time
  through the quantized cache. Windows are consecutive and disjoint; every method scores the same tokens.
- Passkey (`tasks/passkey.py`): plain prompts of `--passkey-length` tokens, `--passkey-depths`, with
  `--passkey-per-depth` keys at each depth.
- LongBench (`tasks/longbench.py`, `../shared/data/longbench`): multi_news, multifieldqa_zh,
  passage_retrieval_zh, the first `--longbench-per-task` records each, middle-truncated to
  `--longbench-max-length` prompt tokens, official templates and metrics, answer budgets as in
  `LONGBENCH_NEW_TOKENS` (official, except multi_news: capped, so ROUGE-L scores a truncated summary).

Bytes: what the cache holds after each sample (`KVCache.kv_bytes`: codes, scales, zero-points,
full-precision windows; float32 on CPU) divided by the tokens it holds, and the dense cache's per token.

Rows (one per method and sample) are appended to `--rows` as they finish; a row already there (same method,
sample and settings) is skipped, so an interrupted run continues where it stopped. Samples run in rounds
(round r: WikiText windows 2r and 2r + 1, the r-th passkey key at each depth, the r-th record of each
LongBench task), each sample for every method before the next, so a stopped run still compares every method
on the same samples.
`--out` gets the summary: per method and task the metrics, paired differences against the full cache (and
between the methods each paper compares) with bootstrap 95% intervals over samples, and counts of answers
that differ from the full cache's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from kvbench.engine import Engine, Generation, Scored
from kvbench.hadamard import hadamard_transform
from kvbench.method import Method
from kvbench.methods.full import Full
from kvbench.methods.kivi import KIVI
from kvbench.methods.quarot import QuaRot
from kvbench.methods.zipcache import ZipCache
from kvbench.models import ModelConfig, load_model, model_spec
from kvbench.quant import fake_quantize
from kvbench.records import environment, git_commit, write_json_atomic
from kvbench.task import Sample, Task
from kvbench.tasks.longbench import LongBench
from kvbench.tasks.passkey import Passkey
from kvbench.tasks.wikitext2 import WikiText2

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LONGBENCH_TASKS = ("multi_news", "multifieldqa_zh", "passage_retrieval_zh")
# Official budgets (dataset2maxlen.json: 512, 64, 32) capped to fit the hour: 512 one-thread CPU decode steps
# per sample and method would take the whole budget. Capped answers are scored as truncated.
LONGBENCH_NEW_TOKENS = {"multi_news": 64, "multifieldqa_zh": 32, "passage_retrieval_zh": 32}
BOOTSTRAP_RESAMPLES = 2000
ATTENTION_ERROR_OUT = RESULTS / "quant_accuracy_attention_error.json"

CONFIGS: list[tuple[str, Callable[[], Method]]] = [
    ("full", Full),
    ("rtn-4", lambda: QuaRot(bits=4, rotate=False)),
    ("quarot-4", lambda: QuaRot(bits=4)),
    ("kivi-4", lambda: KIVI(bits=4)),
    ("kivi-2", lambda: KIVI(bits=2)),
    ("zipcache-4/2 (40% low, 3.2 bits)", ZipCache),
    ("zipcache-4/2 (50% low, 3.0 bits)", lambda: ZipCache(low_ratio=0.5)),
    ("zipcache-uniform-3 (3.0 bits)", lambda: ZipCache(high_bits=3, low_ratio=0.0)),
]
# Run with --extra (after the main set, when time is left): the 2-bit QuaRot/RTN pair and ZipCache's ablation.
EXTRA_CONFIGS: list[tuple[str, Callable[[], Method]]] = [
    ("rtn-2", lambda: QuaRot(bits=2, rotate=False)),
    ("quarot-2", lambda: QuaRot(bits=2)),
    ("zipcache-4/2 random (50% low, 3.0 bits)", lambda: ZipCache(low_ratio=0.5, saliency="random")),
]
# The papers' claims as (claim, method, against): the first must lose less accuracy than the second.
CLAIMS: list[tuple[str, str, str]] = [
    ("QuaRot: rotation lowers the 4-bit loss against RTN", "quarot-4", "rtn-4"),
    ("QuaRot at 2 bits (not a paper claim: the same comparison further out)", "quarot-2", "rtn-2"),
    (
        "ZipCache: saliency mixed precision beats uniform at equal average bits (3.0)",
        "zipcache-4/2 (50% low, 3.0 bits)",
        "zipcache-uniform-3 (3.0 bits)",
    ),
    (
        "ZipCache: the saliency ranking beats a random one (ablation)",
        "zipcache-4/2 (50% low, 3.0 bits)",
        "zipcache-4/2 random (50% low, 3.0 bits)",
    ),
    ("KIVI: 2-bit close to the full cache", "kivi-2", "full"),
    ("KIVI: 2-bit close to 4-bit", "kivi-2", "kivi-4"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=1024, help="WikiText-2 prefix tokens per window")
    parser.add_argument("--continuation", type=int, default=128, help="WikiText-2 scored tokens per window")
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 windows")
    parser.add_argument("--windows-per-round", type=int, default=2, help="WikiText-2 windows in each round")
    parser.add_argument("--passkey-length", type=int, default=1536)
    parser.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    parser.add_argument("--passkey-per-depth", type=int, default=2)
    parser.add_argument("--longbench-per-task", type=int, default=2, help="records of each LongBench task")
    parser.add_argument("--longbench-max-length", type=int, default=2048, help="prompt tokens kept")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", action="store_true", help="also the EXTRA_CONFIGS methods")
    parser.add_argument(
        "--methods", default="", help="only the methods whose names contain one of these (comma-separated)"
    )
    parser.add_argument("--rows", type=Path, default=RESULTS / "quant_accuracy_rows.jsonl")
    parser.add_argument("--out", type=Path, default=RESULTS / "quant_accuracy.json")
    parser.add_argument("--summary-only", action="store_true", help="summarize the rows; run nothing")
    parser.add_argument(
        "--attention-error",
        action="store_true",
        help=f"only the RTN/QuaRot attention-error diagnostic on the WikiText-2 windows, to {ATTENTION_ERROR_OUT.name}",
    )
    args = parser.parse_args()
    depths = [float(part) for part in args.passkey_depths.split(",")]
    if not all(0 <= depth <= 1 for depth in depths):
        parser.error(f"--passkey-depths {args.passkey_depths}: fractions between 0 and 1 allowed")
    if args.windows_per_round < 1:
        parser.error(f"--windows-per-round {args.windows_per_round}: an integer >= 1 allowed")
    for key in ("windows", "passkey_per_depth", "longbench_per_task"):
        if getattr(args, key) < 0:
            parser.error(f"--{key.replace('_', '-')} {getattr(args, key)}: an integer >= 0 allowed")
    names = [name for name, _ in CONFIGS + EXTRA_CONFIGS]
    wanted = [part for part in args.methods.split(",") if part]
    for part in wanted:
        if not any(part in name for name in names):
            parser.error(f"--methods {part}: no method name contains it; names: {', '.join(names)}")
    args.depths = depths
    return args


def chosen_configs(methods: str, extra: bool) -> list[tuple[str, Callable[[], Method]]]:
    wanted = [part for part in methods.split(",") if part]
    pool = CONFIGS + EXTRA_CONFIGS if extra or wanted else CONFIGS
    return [(name, build) for name, build in pool if not wanted or any(part in name for part in wanted)]


def build_tasks(args: argparse.Namespace) -> dict[str, Task]:
    """The harness's tasks, one per LongBench subtask so each keeps its own answer budget; a task with a
    sample count of 0 is left out (the tasks' own `limit=0` would mean every sample)."""
    tasks: dict[str, Task] = {}
    if args.windows:
        tasks["wikitext2"] = WikiText2(
            data_dir=str(SHARED_DATA / "wikitext2"),
            prefix_tokens=args.prefix,
            continuation_tokens=args.continuation,
            limit=args.windows,
        )
    if args.passkey_per_depth:
        tasks["passkey"] = Passkey(
            context_lengths=[args.passkey_length], depths=args.depths, samples_per_cell=args.passkey_per_depth
        )
    for name in LONGBENCH_TASKS if args.longbench_per_task else ():
        tasks[f"longbench/{name}"] = LongBench(
            subtasks=[name],
            data_dir=str(SHARED_DATA / "longbench"),
            max_length=args.longbench_max_length,
            max_new_tokens=LONGBENCH_NEW_TOKENS[name],
            limit=args.longbench_per_task,
        )
    return tasks


def passkey_round(sample: Sample) -> int:
    """The repeat index of a passkey sample (its id ends in `-<repeat>`)."""
    return int(sample.id.rsplit("-", 1)[1])


def rounds(tasks: dict[str, Task], tokenizer, windows_per_round: int) -> Iterator[list[tuple[str, Sample]]]:
    """Samples grouped in rounds: round r holds WikiText-2 windows [r * windows_per_round, (r + 1) *
    windows_per_round), the r-th key at each passkey depth and the r-th record of each LongBench task."""
    per_task: dict[str, list[list[Sample]]] = {}
    for task_name, task in tasks.items():
        groups: list[list[Sample]] = []
        for index, sample in enumerate(task.samples(tokenizer)):
            if task_name == "passkey":
                position = passkey_round(sample)
            elif task_name == "wikitext2":
                position = index // windows_per_round
            else:
                position = index
            while len(groups) <= position:
                groups.append([])
            groups[position].append(sample)
        per_task[task_name] = groups
    for position in range(max((len(groups) for groups in per_task.values()), default=0)):
        yield [(name, s) for name, groups in per_task.items() if position < len(groups) for s in groups[position]]


def settings_key(args: argparse.Namespace, task_name: str) -> dict[str, Any]:
    """The settings a row of this task depends on (a row with other settings is not reused)."""
    if task_name == "wikitext2":
        return {"prefix": args.prefix, "continuation": args.continuation}
    if task_name == "passkey":
        return {"passkey_length": args.passkey_length}
    return {"max_length": args.longbench_max_length, "max_new_tokens": LONGBENCH_NEW_TOKENS[task_name.split("/")[1]]}


def row_key(method: str, task: str, sample_id: str, settings: dict[str, Any]) -> str:
    return json.dumps([method, task, sample_id, settings], sort_keys=True)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def window_bytes(engine: Engine, held_tokens: int) -> int:
    """Bytes of the full-precision windows a cache holding `held_tokens` keeps (each layer's `ring` slots
    of keys and values in the model's dtype; 0 for caches without one)."""
    layers = engine.new_cache(held_tokens, 1).layers
    element = next(engine.model.parameters()).element_size()
    per_slot = 2 * engine.spec.num_kv_heads * engine.spec.head_dim * element
    return sum(min(getattr(layer, "ring", 0), held_tokens) for layer in layers) * per_slot


def evaluate(engine: Engine, task: Task, sample: Sample) -> dict[str, Any]:
    """One sample through the harness: the task's own evaluate and score, plus the bytes the cache held."""
    began = time.perf_counter()
    output = task.evaluate(engine, sample)
    seconds = time.perf_counter() - began
    scored = task.score(sample, output)
    if isinstance(output, Scored):
        # The window the cache is built for (the last target is predicted, never fed: one slot stays empty).
        held = len(sample.prompt_ids) + len(sample.continuation_ids)
    else:
        assert isinstance(output, Generation)
        # Every generated token but the last was fed back (the last one is only chosen).
        held = len(sample.prompt_ids) + len(sample.question_ids) + max(len(output.token_ids) - 1, 0)
    per_token = 2 * engine.spec.num_layers * engine.spec.num_kv_heads * engine.spec.head_dim
    element = next(engine.model.parameters()).element_size()
    return {
        "score": scored,
        "seconds": seconds,
        "held_tokens": held,
        "kv_bytes": output.measurement.kv_bytes_device,
        "kv_bytes_per_token": output.measurement.kv_bytes_device / held,
        "window_bytes_per_token": window_bytes(engine, held) / held,
        "dense_kv_bytes_per_token": per_token * element,
    }


# ----- diagnostic: where the rotation acts -----
def causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Plain causal softmax attention, [1, heads, T, D]; KV heads repeated for their query heads."""
    repeat = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
    scores = query @ keys.transpose(-1, -2) / query.shape[-1] ** 0.5
    tokens = scores.shape[-1]
    scores = scores.masked_fill(torch.ones(tokens, tokens, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


@torch.inference_mode()
def attention_error(model, spec, tokenizer, task: WikiText2, bits_options: tuple[int, ...]) -> list[dict[str, Any]]:
    """Relative squared error of every layer's attention output (summed over layers) when its keys and values
    are quantized per token and head with the `rtn`/`quarot` quantizer (`kvbench.quant.fake_quantize`,
    group head_dim, its clip ratio), without and with the Hadamard rotation of queries, keys and values after
    RoPE. Every query of a WikiText-2 prefix reads the quantized K/V (QuaRot's own perplexity protocol), so
    this isolates the mechanism the paper relies on from the decode-time perplexity the main table measures.
    Queries, keys and values come from hooks on the projections; RoPE is transformers' own."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for part in ("q", "k", "v"):
            projection = getattr(layer.self_attn, f"{part}_proj")
            hook = lambda _m, _i, out, key=(part, index): captured.__setitem__(key, out.detach())  # noqa: E731
            handles.append(projection.register_forward_hook(hook))
    heads, kv_heads, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    clip_ratio = QuaRot().clip_ratio  # the `rtn` / `quarot` default
    results = []
    try:
        for sample in task.samples(tokenizer):
            ids = torch.tensor([sample.prompt_ids])
            model(ids)
            positions = torch.arange(ids.shape[1])[None]
            for bits in bits_options:
                error = {"rtn": 0.0, "quarot": 0.0}
                reference_norm = 0.0
                for index in range(spec.num_layers):
                    query = captured[("q", index)].view(1, -1, heads, head_dim).transpose(1, 2).float()
                    keys = captured[("k", index)].view(1, -1, kv_heads, head_dim).transpose(1, 2).float()
                    values = captured[("v", index)].view(1, -1, kv_heads, head_dim).transpose(1, 2).float()
                    cos, sin = model.model.rotary_emb(keys, positions)
                    query, keys = apply_rotary_pos_emb(query, keys, cos, sin)
                    exact = causal_attention(query, keys, values)
                    reference_norm += exact.square().sum().item()

                    def quantized(x: torch.Tensor, bits: int = bits) -> torch.Tensor:
                        return fake_quantize(x, bits, "token", head_dim, clip_ratio)

                    plain = causal_attention(query, quantized(keys), quantized(values))
                    error["rtn"] += (plain - exact).square().sum().item()
                    rotated_q, rotated_k, rotated_v = (hadamard_transform(x) for x in (query, keys, values))
                    if index == 0:  # unquantized, the rotations must give the exact output back
                        unquantized = hadamard_transform(causal_attention(rotated_q, rotated_k, rotated_v))
                        assert torch.allclose(unquantized, exact, atol=1e-4), "rotation does not cancel"
                    # H is its own inverse: rotating the output back gives the un-rotated attention output.
                    rotated = hadamard_transform(
                        causal_attention(rotated_q, quantized(rotated_k), quantized(rotated_v))
                    )
                    error["quarot"] += (rotated - exact).square().sum().item()
                row = {"window": sample.id, "bits": bits, "tokens": ids.shape[1]}
                row |= {f"{name}_relative_mse": value / reference_norm for name, value in error.items()}
                results.append(row)
                print(f"attention error {sample.id} {bits}-bit: rtn {row['rtn_relative_mse']:.4f}, "
                      f"quarot {row['quarot_relative_mse']:.4f}", flush=True)  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    return results


# ----- summary -----
def wikitext_metric(rows: list[dict[str, Any]]) -> float:
    """Mean NLL per scored token over the rows (the log of the perplexity)."""
    return sum(r["score"]["nll_sum"] for r in rows) / sum(r["score"]["tokens"] for r in rows)


def sample_metric(task: str) -> Callable[[list[dict[str, Any]]], float]:
    if task == "wikitext2":
        return wikitext_metric
    field = "correct" if task == "passkey" else "score"
    return lambda rows: sum(r["score"][field] for r in rows) / len(rows)


def paired_difference(
    task: str, rows_a: dict[str, dict[str, Any]], rows_b: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """metric(a) - metric(b) over the samples both have, with a bootstrap 95% interval (samples resampled
    with replacement, the same draw for both: the difference is paired), and how many samples differ."""
    shared = sorted(set(rows_a) & set(rows_b), key=lambda i: (len(i), i))  # window2 before window10
    if not shared:
        return None
    metric = sample_metric(task)

    def difference(ids: list[str]) -> float:
        return metric([rows_a[i] for i in ids]) - metric([rows_b[i] for i in ids])

    rng = random.Random(0)
    draws = sorted(difference([rng.choice(shared) for _ in shared]) for _ in range(BOOTSTRAP_RESAMPLES))
    low, high = draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]
    if task == "wikitext2":
        # Per window, NLL per scored token: with a handful of windows the bootstrap interval is coarse, and
        # the signs say more.
        per_window = [difference([i]) for i in shared]
        better, worse = sum(d < 0 for d in per_window), sum(d > 0 for d in per_window)
        return {"samples": len(shared), "difference": difference(shared), "ci95": [low, high],
                "a_lower_nll": better, "a_higher_nll": worse,
                "per_window": dict(zip(shared, per_window, strict=True))}  # fmt: skip
    answers = [(rows_a[i]["score"]["prediction"].strip(), rows_b[i]["score"]["prediction"].strip()) for i in shared]
    differing = sum(a != b for a, b in answers)
    field = "correct" if task == "passkey" else "score"
    a_better = sum(rows_a[i]["score"][field] > rows_b[i]["score"][field] for i in shared)
    b_better = sum(rows_a[i]["score"][field] < rows_b[i]["score"][field] for i in shared)
    return {"samples": len(shared), "difference": difference(shared), "ci95": [low, high],
            "answers_differing": differing, "a_better": a_better, "b_better": b_better}  # fmt: skip


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per method and task, on the samples every main-set method finished (a stopped run compares like with
    like; an extra method may have a subset of them, and says how many)."""
    methods = [name for name, _ in CONFIGS + EXTRA_CONFIGS if any(r["method"] == name for r in rows)]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["settings"] == settings_key(args, r["task"]):
            by.setdefault((r["method"], r["task"]), {})[r["sample_id"]] = r
    main_set = [name for name, _ in CONFIGS if name in methods]
    for task in tasks:
        present = [set(by[(m, task)]) for m in main_set if (m, task) in by]
        common = set.intersection(*present) if present else set()
        for method in methods:
            if (method, task) in by:
                by[(method, task)] = {i: r for i, r in by[(method, task)].items() if i in common}
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        entry: dict[str, Any] = {"config": next(r["config"] for r in rows if r["method"] == method)}
        all_rows = [r for task in tasks for r in by.get((method, task), {}).values()]
        held = sum(r["held_tokens"] for r in all_rows)
        entry["kv_bytes_per_token"] = sum(r["kv_bytes"] for r in all_rows) / held if held else None
        entry["dense_kv_bytes_per_token"] = all_rows[0]["dense_kv_bytes_per_token"] if all_rows else None
        entry["seconds"] = sum(r["seconds"] for r in all_rows)
        for task in tasks:
            mine = by.get((method, task), {})
            if not mine:
                continue
            cell: dict[str, Any] = {"samples": len(mine), "metric": sample_metric(task)(list(mine.values()))}
            wiki = task == "wikitext2"
            if wiki:
                cell["perplexity"] = math.exp(cell["metric"])
                cell["scored_tokens"] = sum(r["score"]["tokens"] for r in mine.values())
            cell["kv_bytes_per_token"] = sum(r["kv_bytes"] for r in mine.values()) / sum(
                r["held_tokens"] for r in mine.values()
            )
            cell["window_bytes_per_token"] = sum(
                r["window_bytes_per_token"] * r["held_tokens"] for r in mine.values()
            ) / sum(r["held_tokens"] for r in mine.values())
            if method != "full" and ("full", task) in by:
                cell["vs_full"] = paired_difference(task, mine, by[("full", task)])
            entry[task] = cell
        table[method] = entry
    claims = []
    for claim, a, b in CLAIMS:
        if a in table and b in table:
            pairs = {task: paired_difference(task, by.get((a, task), {}), by.get((b, task), {})) for task in tasks}
            claims.append({"claim": claim, "a": a, "b": b, "per_task": pairs})
    return {"methods": table, "claims": claims, "tasks": tasks}


def fmt_ci(diff: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if diff is None:
        return "n/a"
    low, high = diff["ci95"]
    return f"{diff['difference'] * scale:+.{digits}f} [{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]"


def print_tables(summary: dict[str, Any]) -> None:
    tasks = summary["tasks"]
    lb = [t for t in tasks if t.startswith("longbench/")]
    head = "| method | KV bytes/token (WikiText window) | WikiText-2 ppl | ΔNLL/token vs full [95% CI] | passkey |"
    print("\n" + head + "".join(f" {t.split('/')[1]} (differ) |" for t in lb))
    print("|---" * (5 + len(lb)) + "|")
    for method, entry in summary["methods"].items():
        wiki, key = entry.get("wikitext2"), entry.get("passkey")
        cells = [
            method,
            f"{wiki['kv_bytes_per_token']:,.0f}" if wiki else "n/a",  # per token of a 1152-token window
            f"{wiki['perplexity']:.3f}" if wiki else "n/a",
            fmt_ci(wiki.get("vs_full")) if wiki else "n/a",
            f"{round(key['metric'] * key['samples'])}/{key['samples']}" if key else "n/a",
        ]
        for task in lb:
            cell = entry.get(task)
            differ = cell.get("vs_full") if cell else None
            note = f" ({differ['answers_differing']}/{differ['samples']})" if differ else ""
            cells.append(f"{cell['metric']:.1f}{note}" if cell else "n/a")
        print("| " + " | ".join(cells) + " |")
    print("\n| claim | task | a - b [95% CI] | samples | a better / b better |")
    print("|---|---|---|---|---|")
    for claim in summary["claims"]:
        for task, diff in claim["per_task"].items():
            if diff is None:
                continue
            per_window = ", ".join(f"{d:+.3f}" for d in diff.get("per_window", {}).values())
            wins = (
                f"{diff['a_lower_nll']} / {diff['a_higher_nll']} windows ({per_window})"
                if task == "wikitext2"
                else f"{diff['a_better']} / {diff['b_better']}"
            )
            print(f"| {claim['claim']} | {task} | {fmt_ci(diff)} | {diff['samples']} | {wins} |")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    configs = chosen_configs(args.methods, args.extra)
    tasks = build_tasks(args)
    model_cfg = ModelConfig(device="cpu")
    spec = model_spec(model_cfg)
    methods = {name: build() for name, build in configs}
    for method in methods.values():  # bad settings fail here, before the weights load
        method.check(spec)
    for task in tasks.values():  # these tasks' checks read the model's shape only (no method-specific rule)
        task.check(spec, next(iter(methods.values())))
    if args.attention_error:
        wikitext = tasks.get("wikitext2")
        if not isinstance(wikitext, WikiText2):
            raise SystemExit(f"--attention-error reads WikiText-2 windows: --windows {args.windows}: >= 1 allowed")
        model, tokenizer = load_model(model_cfg)
        results = attention_error(model, spec, tokenizer, wikitext, (4, 2))
        payload = {"settings": {"windows": args.windows, "prefix": args.prefix, "model": model_cfg.name}}
        payload |= {"rows": results, "environment": environment(torch.device("cpu")), "commit": git_commit()}
        write_json_atomic(ATTENTION_ERROR_OUT, payload)
        return
    rows = read_rows(args.rows)
    if not args.summary_only:
        done = {row_key(r["method"], r["task"], r["sample_id"], r["settings"]) for r in rows}
        model, tokenizer = load_model(model_cfg)
        engines = {name: Engine(model, tokenizer, method, spec) for name, method in methods.items()}
        commit = git_commit()
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        # Sample-major: each sample runs for every method before the next, so a stopped run compares every
        # method on the same samples.
        for number, samples in enumerate(rounds(tasks, tokenizer, args.windows_per_round)):
            for task_name, sample in samples:
                settings = settings_key(args, task_name)
                for name, engine in engines.items():
                    if row_key(name, task_name, sample.id, settings) in done:
                        continue
                    row = {"method": name, "task": task_name, "sample_id": sample.id, "settings": settings}
                    row |= evaluate(engine, tasks[task_name], sample)
                    row |= {"config": methods[name].describe(), "commit": commit}
                    with open(args.rows, "a") as handle:  # one line per finished sample: a crash loses one
                        handle.write(json.dumps(row) + "\n")
                    rows.append(row)
                    print(f"round {number} {task_name} {sample.id} {name}: {row['seconds']:.0f} s", flush=True)
    summary = summarize(rows, args)
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("rows", "out")}
        | {"rows": str(args.rows.name), "longbench_new_tokens": LONGBENCH_NEW_TOKENS, "model": model_cfg.name},
        "summary": summary,
        "environment": environment(torch.device("cpu")),
        "commit": git_commit(),
    }
    write_json_atomic(args.out, payload)
    print_tables(summary)


if __name__ == "__main__":
    main()

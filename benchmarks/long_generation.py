"""Compression during long generation: SnapStream, Scissorhands, H2O, StreamingLLM and SnapKV at equal budgets.

On the embedded SmolLM2-135M-Instruct (CPU): chain-of-thought generation on GSM8K and AIME 2024 (short
prompts, a few hundred generated tokens, so the budgets are well below what the model generates and
compression happens while it generates) and passkey retrieval (a long prompt, a short answer), each
method at every budget plus the full cache. Every run goes through the harness's own runner
(`kvbench.run.run`, as `python -m kvbench` does), so each number comes from a real record under
`--results-dir`; a rerun skips complete runs. The summary (accuracy, measured KV bytes, decode time per
step, agreement with the full cache's generation, sample counts) goes to `--out`.

Agreement with the full cache: for each sample, the share of the full cache's generated text that the
method reproduces before its first differing character, averaged over samples; and, over the samples
where the full cache gave an answer (`answers_compared`), the share whose extracted answer equals it
(none to compare, e.g. AIME cut at 128 tokens before any \\boxed{}: null, not a vacuous 1.0). On a model
this small the task accuracies are near zero, so agreement is what shows how much each budget changes
the generation.

The samples of a task decode together in one batch: on this CPU a decode step of 8 sequences costs
about 1.5-2x a step of one, so samples are cheap and decode steps are not.

Threads. torch runs one thread by default here (`--threads`). On a CPU that other jobs share, OpenMP's
spin-waiting workers collapse when a core is taken away: with 2 threads and ~8 runnable processes on 2
cores, a batch-8 decode step of the embedded model took 3.5-5.5 s, against 0.26-0.40 s with 1 thread
(and 0.42 s with 2 threads under OMP_WAIT_POLICY=PASSIVE), which is what made an earlier run report
2.7 s per step. On an idle machine more threads may be faster (not measured here).

    nice -n 10 python benchmarks/long_generation.py                      # the defaults below, ~40 min shared CPU
    python benchmarks/long_generation.py --tasks passkey --budgets 64    # a subset
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from kvbench.records import PREDICTIONS, environment, git_commit, read_record, write_json_atomic
from kvbench.run import run

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
OUT = Path(__file__).resolve().parent / "results" / "long_generation.json"
METHODS = ("snapstream", "scissorhands", "h2o", "streamingllm", "snapkv")
TASKS = ("gsm8k", "aime", "passkey")


def task_overrides(task: str, args: argparse.Namespace) -> tuple[list[str], int]:
    """Hydra overrides of one task, and the decode batch (every sample of the task decodes together)."""
    if task == "gsm8k":
        data = f"task.data_dir={args.data / 'gsm8k'}"
        return ["task=gsm8k", data, f"task.limit={args.gsm8k}", f"task.max_new_tokens={args.new_tokens}"], args.gsm8k
    if task == "aime":
        data = f"task.data_dir={args.data / 'aime'}"
        return ["task=aime24", data, f"task.limit={args.aime}", f"task.max_new_tokens={args.new_tokens}"], args.aime
    depths = [round((i + 0.5) / args.passkey, 4) for i in range(args.passkey)]
    overrides = ["task=passkey", f"task.context_lengths=[{args.passkey_context}]", f"task.depths={depths}"]
    return overrides, args.passkey


def runs(args: argparse.Namespace) -> list[tuple[str, str, int | None, list[str]]]:
    """(task, method, budget, overrides) of every run: the full cache once, each method at each budget."""
    planned = []
    for task in args.tasks:
        overrides, batch = task_overrides(task, args)
        common = [*overrides, f"kvbench.batch_size={batch}", f"kvbench.results_dir={args.results_dir}"]
        planned.append((task, "full", None, ["method=full", *common]))
        for budget in args.budgets:
            for method in METHODS:
                planned.append((task, method, budget, [f"method={method}", f"method.budget={budget}", *common]))
    return planned


def predictions(directory: Path) -> dict[str, dict[str, Any]]:
    with open(directory / PREDICTIONS) as handle:
        return {row["id"]: row for row in map(json.loads, handle)}


def answer_of(row: dict[str, Any]) -> Any:
    """The row's extracted answer; passkey rows have none, so the first number generated (what it scores)."""
    if "answer" in row:
        return row["answer"]
    found = re.search(r"\d+", row["prediction"])
    return found.group(0) if found else None


def agreement(rows: dict[str, dict[str, Any]], full: dict[str, dict[str, Any]]) -> dict[str, float]:
    """How much of the full cache's generation each sample reproduces (see the module's docstring)."""
    prefix_shares, same_answers = [], []
    for sample_id, row in rows.items():
        reference = full[sample_id]
        expected, got = reference["prediction"], row["prediction"]
        differs = (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b)
        common = next(differs, min(len(expected), len(got)))
        prefix_shares.append(common / len(expected) if expected else float(not got))
        if answer_of(reference) is not None:  # two missing answers are no agreement about an answer
            same_answers.append(float(answer_of(row) == answer_of(reference)))
    return {
        "text_prefix_agreement": sum(prefix_shares) / len(prefix_shares),
        "answer_agreement": sum(same_answers) / len(same_answers) if same_answers else None,
        "answers_compared": len(same_answers),
    }


def agreed(row: dict[str, Any]) -> str:
    """ "text / answer" agreement of a summary row ("n/a" where no answer could be compared)."""
    answer = row.get("answer_agreement")
    return f"{row.get('text_prefix_agreement', 1.0):.2f} / " + ("n/a" if answer is None else f"{answer:.2f}")


def summarize(done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run from its record and predictions, with agreement against the same task's full run."""
    full_rows = {entry["task"]: predictions(entry["directory"]) for entry in done if entry["method"] == "full"}
    summary = []
    for entry in done:
        record = read_record(entry["directory"])
        row: dict[str, Any] = {
            "task": entry["task"],
            "method": entry["method"],
            "budget": entry["budget"],
            "status": record["status"],
            "run_directory": str(entry["directory"]),
        }
        if record["status"] == "ok":
            m = record["measurements"]
            row.update(
                samples=m["samples"],
                primary_metric=record["primary_metric"],
                metrics=record["metrics"],
                kv_bytes_device=m["kv_bytes_device"],
                kv_bytes_device_peak=m["kv_bytes_device_peak"],
                dense_kv_bytes=m["dense_kv_bytes"],
                compression_ratio=m["compression_ratio"],
                decode_ms_per_step=m["decode_ms_per_token"],
                decode_batch=m["batch_size_max"],
                prompt_tokens_mean=m["prompt_tokens_mean"],
                prefill_s_mean=m["prefill_s_mean"],
                method_params=record["method_params"],
                commit=record["environment"].get("git_commit"),
                wall_s=record["wall_s"],
            )
            if entry["task"] in full_rows:
                row.update(agreement(predictions(entry["directory"]), full_rows[entry["task"]]))
        summary.append(row)
    return summary


def table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| task | method | budget | samples | metric | agreement (text / answer) | KV MiB (measured) | compression"
        " | decode ms/step (batch) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        if row["status"] != "ok":
            lines.append(f"| {row['task']} | {row['method']} | {row['budget']} | {row['status']} ||||||")
            continue
        metric = f"{row['primary_metric']} {row['metrics'][row['primary_metric']]:.3g}"
        lines.append(
            f"| {row['task']} | {row['method']} | {row['budget'] or '-'} | {row['samples']} | {metric} | {agreed(row)} "
            f"| {row['kv_bytes_device'] / 2**20:.2f} | {row['compression_ratio']:.2f}x "
            f"| {row['decode_ms_per_step']:.0f} ({row['decode_batch']}) |"
        )
    return "\n".join(lines)


def falloff(summary: list[dict[str, Any]]) -> str:
    """Per task, each method's primary metric and agreement with the full cache (text / answer) by budget."""
    budgets = sorted({row["budget"] for row in summary if row["budget"] is not None})
    lines = []
    for task in dict.fromkeys(row["task"] for row in summary):
        lines += [
            f"\n{task}: metric, text agreement, answer agreement with the full cache, by budget\n",
            "| method | " + " | ".join(map(str, budgets)) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        rows = {(row["method"], row["budget"]): row for row in summary if row["task"] == task}
        for method in METHODS:
            cells = []
            for budget in budgets:
                row = rows.get((method, budget), {"status": "not run"})
                if row["status"] != "ok":
                    cells.append(row["status"])
                    continue
                cells.append(f"{row['metrics'][row['primary_metric']]:.3g} · {agreed(row)}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    # Multiples of 64: buffers are allocated in 64-slot steps, so these budgets are also the measured bytes.
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192], help="tokens per layer and KV head")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens at most (GSM8K, AIME)")
    parser.add_argument("--gsm8k", type=int, default=8, help="GSM8K problems (the first N of the test split)")
    parser.add_argument("--aime", type=int, default=4, help="AIME 2024 problems (the first N)")
    parser.add_argument("--passkey", type=int, default=4, help="passkey depths (one prompt each)")
    parser.add_argument("--passkey-context", type=int, default=1024, help="passkey prompt tokens")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument("--results-dir", type=Path, default=REPO / "results" / "long_generation")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see Threads above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # before `environment`, which records it

    began = time.perf_counter()
    done: list[dict[str, Any]] = []
    env = environment(torch.device("cpu"))
    env["git_commit"] = git_commit()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        for task, method, budget, overrides in runs(args):
            directory = run(compose(config_name="config", overrides=overrides))
            done.append({"task": task, "method": method, "budget": budget, "directory": directory})
            summary = summarize(done)
            record = {"benchmark": "long_generation", "complete": False, "environment": env, "settings": settings}
            # The runs' own wall time too: a rerun that skips complete runs keeps it.
            runs_wall_s = sum(row.get("wall_s", 0.0) for row in summary)
            record.update(summary=summary, wall_s=time.perf_counter() - began, runs_wall_s=runs_wall_s)
            write_json_atomic(args.out, record)  # after every run: an interrupted benchmark keeps its results
    record["complete"] = True
    write_json_atomic(args.out, record)
    print(table(record["summary"]))
    print(falloff(record["summary"]))
    print(f"wrote {args.out} in {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

"""Perplexity against KV bytes per token for the models trained with `kvbench.train` (issue #19's plot).

Two panels, one per scale, because their perplexities are not comparable with each other:
- "trained on CPU, evaluated by the harness": WikiText-2 stream-protocol records (`task=wikitext2`,
  `method=full`) of checkpoints loaded with `model=hf`, read from a results folder; KV bytes per token are
  the cache's measured device bytes over the slots a window holds.
- "trained on one H200": the rows of `benchmarks/results/cla_training_h200.json` (WikiText-2 test
  perplexity, KV bytes per token measured from a kvbench cache built for each trained model).

    python benchmarks/cla_pareto.py --results results/train_eval240 --out docs/cla
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from kvbench.cache import aligned_slots
from kvbench.plot import pareto_mask
from kvbench.records import load_table

H200 = Path(__file__).resolve().parent / "results" / "cla_training_h200.json"


def harness_points(results: Path) -> pd.DataFrame:
    """One point per trained checkpoint: its stream perplexity and measured KV bytes per token."""
    table = load_table(results)
    runs = table[(table["task"] == "wikitext2") & (table["task.protocol"] == "stream") & (table["status"] == "ok")]
    window = (runs["task.prefix_tokens"] + runs["task.continuation_tokens"]).astype(int).map(aligned_slots)
    return pd.DataFrame(
        {
            "model": runs["model.name"],
            "kv_bytes_per_token": runs["kv_bytes_device"] / window,
            "perplexity": runs["perplexity"],
        }
    )


def h200_points(path: Path) -> pd.DataFrame:
    rows = json.loads(path.read_text())["rows"]
    return pd.DataFrame(
        {
            "model": [row["model"] for row in rows],
            "kv_bytes_per_token": [row["kv_bytes_per_token"] for row in rows],
            "perplexity": [row["wikitext2_perplexity"] for row in rows],
        }
    )


def draw(ax: plt.Axes, points: pd.DataFrame, title: str) -> None:
    front = pareto_mask(points["kv_bytes_per_token"], points["perplexity"], higher_is_better=False)
    ax.scatter(points["kv_bytes_per_token"], points["perplexity"], color="tab:blue")
    for _, row in points.iterrows():
        ax.annotate(
            row["model"],
            (row["kv_bytes_per_token"], row["perplexity"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    on_front = points[front].sort_values("kv_bytes_per_token")
    ax.plot(on_front["kv_bytes_per_token"], on_front["perplexity"], color="grey", linestyle="--", zorder=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV cache (bytes per token, measured)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.set_title(title, fontsize=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="harness records of the CPU-trained models")
    parser.add_argument("--h200", type=Path, default=H200)
    parser.add_argument("--out", type=Path, default=Path("docs/cla"))
    args = parser.parse_args()
    panels = [
        (harness_points(args.results), "trained on CPU (245k tokens), harness, stream protocol, fp32"),
        (h200_points(args.h200), "trained on one H200 (16.6M tokens), WikiText-2 test, bf16"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (points, title) in zip(axes, panels, strict=True):
        draw(ax, points, title)
    fig.suptitle("Trained MHA / GQA / MQA / MQA+CLA2: perplexity against KV bytes per token")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "svg"):
        fig.savefig(args.out / f"cla-pareto.{suffix}", dpi=150)
    lines = ["| scale | model | KV bytes / token | perplexity |", "|---|---|---|---|"]
    for points, title in panels:
        for _, row in points.sort_values("kv_bytes_per_token").iterrows():
            scale = title.split(",")[0]
            lines.append(f"| {scale} | {row['model']} | {row['kv_bytes_per_token']:.0f} | {row['perplexity']:.1f} |")
    (args.out / "cla-pareto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}/cla-pareto.png, .svg, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

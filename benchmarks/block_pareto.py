"""Block Transformer against the vanilla model trained beside it, on one Pareto figure (issue #20).

Reads what `benchmarks/block_transformer.py run` wrote and draws two panels: WikiText-2 perplexity
against measured KV bytes per token, and against decode throughput (tokens/s through kvbench's engine,
one point per model and batch size, on the captured `graph` engine where it ran, else `eager`; every
engine's numbers are in the table). Lower-left is
better on the first panel, lower-right on the second; the grey line joins the non-dominated points.

    python benchmarks/block_pareto.py benchmarks/results/block_transformer_h200.json --out docs/block
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from kvbench.plot import pareto_mask

STYLE = {"vanilla": ("tab:blue", "o"), "block": ("tab:orange", "s")}


def points(result: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per model: perplexity, KV bytes per token), (one row per model x engine x batch: tokens/s)."""
    models = pd.DataFrame(
        {
            "model": [row["model"] for row in result["rows"]],
            "kv_bytes_per_token": [row["kv_bytes_per_token"] for row in result["rows"]],
            "perplexity": [row["wikitext2_perplexity"] for row in result["rows"]],
        }
    )
    decode = pd.DataFrame([row for row in result["decode"] if row["status"] == "ok"])
    decode = decode.merge(models[["model", "perplexity"]], on="model")
    return models, decode[["model", "engine", "batch", "decode_tokens_per_s", "perplexity"]]


def draw_front(ax: plt.Axes, x: pd.Series, y: pd.Series, x_higher_is_better: bool) -> None:
    front = pareto_mask(x, y, higher_is_better=False, x_lower_is_better=not x_higher_is_better)
    order = x[front].sort_values().index
    ax.plot(x[order], y[order], color="grey", linestyle="--", zorder=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="the JSON block_transformer.py wrote")
    parser.add_argument("--out", type=Path, default=Path("docs/block"))
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    models, decode = points(result)

    fig, (bytes_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for _, row in models.iterrows():
        color, marker = STYLE.get(row["model"], ("black", "x"))
        bytes_ax.scatter(row["kv_bytes_per_token"], row["perplexity"], color=color, marker=marker, label=row["model"])
    draw_front(bytes_ax, models["kv_bytes_per_token"], models["perplexity"], x_higher_is_better=False)
    bytes_ax.set_xscale("log", base=2)
    bytes_ax.set_xlabel("KV cache (bytes per token, measured)")
    bytes_ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    bytes_ax.legend(fontsize=8)

    fastest = "graph" if (decode["engine"] == "graph").any() else "eager"
    shown = decode[decode["engine"] == fastest]
    for _, row in shown.iterrows():
        color, marker = STYLE.get(row["model"], ("black", "x"))
        speed_ax.scatter(row["decode_tokens_per_s"], row["perplexity"], color=color, marker=marker)
        speed_ax.annotate(
            f"batch {row['batch']}",
            (row["decode_tokens_per_s"], row["perplexity"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    draw_front(speed_ax, shown["decode_tokens_per_s"], shown["perplexity"], x_higher_is_better=True)
    speed_ax.set_xscale("log")
    speed_ax.set_xlabel(f"decode throughput (tokens/s, kvbench engine={fastest}, 2048 + 128 tokens)")
    speed_ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    device = result.get("environment", {}).get("device_name", "")
    fig.suptitle(f"Block Transformer vs vanilla, trained on the same tokens ({device})")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "svg"):
        fig.savefig(args.out / f"block-pareto.{suffix}", dpi=150)

    lines = ["| model | engine | batch | tokens/s | KV bytes / token | WikiText-2 ppl |", "|---|---|---|---|---|---|"]
    merged = decode.merge(models[["model", "kv_bytes_per_token"]], on="model")
    for _, row in merged.sort_values(["engine", "batch", "model"]).iterrows():
        lines.append(
            f"| {row['model']} | {row['engine']} | {row['batch']} | {row['decode_tokens_per_s']:.0f} | "
            f"{row['kv_bytes_per_token']:.0f} | {row['perplexity']:.1f} |"
        )
    (args.out / "block-pareto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}/block-pareto.png, .svg, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

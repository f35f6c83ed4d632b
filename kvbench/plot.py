"""Pareto fronts from a results directory: `python -m kvbench.plot RESULTS_DIR [options]`.

One line per method through its non-dominated runs (less memory, better metric); every run is a point.
The table of what was plotted is printed too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import pandas as pd

from kvbench.records import load_table

AXES = {
    "kv_bytes_device": ("KV cache bytes on device (measured, MiB)", 2**20),
    "kv_bytes_device_peak": ("peak KV cache bytes on device (measured, MiB)", 2**20),
    "peak_memory_bytes": ("peak memory (MiB)", 2**20),
    "decode_ms_per_token": ("decode latency (ms/token)", 1),
    "prefill_s_mean": ("prefill time (s)", 1),
}


def pareto_mask(x: pd.Series, y: pd.Series, higher_is_better: bool) -> pd.Series:
    """True where no other point has x <= and y at least as good, with one of them strictly better."""
    better_y = y if higher_is_better else -y
    keep = []
    for xi, yi in zip(x, better_y, strict=True):
        dominated = ((x <= xi) & (better_y >= yi) & ((x < xi) | (better_y > yi))).any()
        keep.append(not dominated)
    return pd.Series(keep, index=x.index)


def front_table(table: pd.DataFrame, metric: str, x: str) -> pd.DataFrame:
    """Complete runs of one task with the chosen axes, and whether each is on its method's front."""
    ok = table[(table["status"] == "ok") & table[metric].notna() & table[x].notna()].copy()
    higher = bool(ok["higher_is_better"].iloc[0]) if len(ok) else True
    ok["on_method_front"] = False
    for _, group in ok.groupby("method"):
        ok.loc[group.index, "on_method_front"] = pareto_mask(group[x], group[metric], higher)
    ok["on_overall_front"] = pareto_mask(ok[x], ok[metric], higher) if len(ok) else []
    columns = ["method", *(c for c in ("method.budget",) if c in ok), x, metric]
    columns += ["on_method_front", "on_overall_front", "run_dir"]
    return ok[columns].sort_values(["method", x]).reset_index(drop=True)


def plot(table: pd.DataFrame, metric: str, x: str, title: str, out: Path) -> None:
    label, scale = AXES.get(x, (x, 1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, group in table.groupby("method"):
        points = ax.scatter(group[x] / scale, group[metric], alpha=0.5, s=24)
        front = group[group["on_method_front"]].sort_values(x)
        ax.plot(front[x] / scale, front[metric], marker="o", color=points.get_facecolor()[0], label=method)
    ax.set_xlabel(label)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(out.with_suffix(suffix), dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.plot", description=__doc__)
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--task", help="which task to plot (default: each task found)")
    parser.add_argument("--metric", help="y axis (default: the task's primary metric)")
    parser.add_argument("--x", default="kv_bytes_device", help=f"x axis, e.g. {', '.join(AXES)}")
    parser.add_argument("--out", type=Path, help="output file stem (default: RESULTS_DIR/pareto-TASK)")
    args = parser.parse_args(argv)

    table = load_table(args.results_dir)
    if table.empty:
        print(f"kvbench.plot: no run records under {args.results_dir}", file=sys.stderr)
        return 1
    tasks = [args.task] if args.task else sorted(table["task"].unique())
    for task in tasks:
        runs = table[table["task"] == task]
        if runs.empty:
            print(f"kvbench.plot: task={task!r} has no runs; found: {sorted(table['task'].unique())}", file=sys.stderr)
            return 1
        metric = args.metric or runs["primary_metric"].dropna().iloc[0]
        if metric not in runs or args.x not in runs:
            missing = metric if metric not in runs else args.x
            print(f"kvbench.plot: no column {missing!r}; columns: {', '.join(runs.columns)}", file=sys.stderr)
            return 1
        fronts = front_table(runs, metric, args.x)
        out = args.out or args.results_dir / f"pareto-{task}"
        models = ", ".join(sorted(runs["model"].unique()))
        plot(fronts, metric, args.x, f"{task} on {models}", out)
        shown = fronts.drop(columns="run_dir")
        scale = AXES.get(args.x, (args.x, 1))[1]
        if scale != 1:
            shown[args.x] = shown[args.x] / scale
            shown = shown.rename(columns={args.x: f"{args.x} (MiB)"})
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
            print(shown.to_string(index=False))
        print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.svg')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pareto fronts from a results directory: `python -m kvbench.plot RESULTS_DIR [options]`.

Only comparable runs share a front: the same task, model and task settings (context lengths, limit, data
...). Each task gets one figure with a panel per such group; in a panel, one line per method through its
non-dominated runs (less memory, better metric), and every run is a point. The tables of what was
plotted are printed too.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from kvbench.records import load_table

AXES = {
    "kv_bytes_device": ("KV cache bytes on device (measured, MiB)", 2**20),
    "kv_bytes_device_peak": ("peak KV cache bytes on device (measured, MiB)", 2**20),
    "peak_memory_bytes": ("peak memory (MiB)", 2**20),
    "decode_ms_per_token": ("decode latency (ms/token)", 1),
    "prefill_s_mean": ("prefill time (s)", 1),
}

# What a run measured of its inputs. Runs with equal settings but different values here did not see the
# same data (e.g. the files under a `data_dir` changed between sweeps), so they must not share a front.
INPUT_MEASURES = ("samples", "prompt_tokens_mean")


def settings_columns(table: pd.DataFrame) -> list[str]:
    """What runs must share to be compared: task, model, and every task setting (`task.*` columns)."""
    return ["task", "model", *sorted(c for c in table.columns if c.startswith("task."))]


def _as_text(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    # Compared as text: a setting may be a list (flattened to "1024,2048"), missing (NaN) in another
    # task's rows, or of another type there; text compares and sorts them all the same way.
    return table[columns].astype(str)


def mixed_settings(runs: pd.DataFrame) -> dict[str, list[str]]:
    """The settings (and measured inputs) that differ among `runs`, with the values found."""
    columns = settings_columns(runs) + [c for c in INPUT_MEASURES if c in runs]
    text = _as_text(runs, columns)
    return {c: sorted(text[c].unique()) for c in columns if text[c].nunique() > 1}


def comparable_groups(table: pd.DataFrame) -> list[tuple[dict[str, str], pd.DataFrame]]:
    """`table` split into groups of runs with the same task, model and task settings.

    Each group comes with its settings as text, `{"task": ..., "model": ..., "task.limit": ...}`.
    """
    if table.empty:
        return []
    keys = settings_columns(table)
    text = _as_text(table, keys)
    groups = []
    for values, runs in table.groupby([text[c] for c in keys], sort=True):
        groups.append((dict(zip(keys, values, strict=True)), runs))
    return groups


def group_labels(groups: list[tuple[dict[str, str], pd.DataFrame]]) -> list[str]:
    """A short label per group: its model, and each setting whose value differs between the groups."""
    if not groups:
        return []
    differing = [k for k in groups[0][0] if k not in ("task", "model") and len({s[k] for s, _ in groups}) > 1]
    labels = []
    for setting, _ in groups:
        shown = [setting["model"], *(f"{k.removeprefix('task.')}={setting[k]}" for k in differing)]
        labels.append(" | ".join(shown))
    return labels


def pareto_mask(x: pd.Series, y: pd.Series, higher_is_better: bool) -> pd.Series:
    """True where no other point has x <= and y at least as good, with one of them strictly better."""
    better_y = y if higher_is_better else -y
    keep = []
    for xi, yi in zip(x, better_y, strict=True):
        dominated = ((x <= xi) & (better_y >= yi) & ((x < xi) | (better_y > yi))).any()
        keep.append(not dominated)
    return pd.Series(keep, index=x.index)


def front_table(table: pd.DataFrame, metric: str, x: str) -> pd.DataFrame:
    """Complete runs with the chosen axes, and whether each is on its method's front and on the overall one.

    `table` should be one comparable group (see `comparable_groups`); a warning says what differs if not.
    """
    ok = table[(table["status"] == "ok") & table[metric].notna() & table[x].notna()].copy()
    mixed = mixed_settings(ok)
    if mixed:
        described = "; ".join(f"{k}: {' | '.join(v)}" for k, v in mixed.items())
        warnings.warn(f"one front mixes runs that are not comparable ({described})", stacklevel=2)
    higher = bool(ok["higher_is_better"].iloc[0]) if len(ok) else True
    ok["on_method_front"] = False
    for _, group in ok.groupby("method"):
        ok.loc[group.index, "on_method_front"] = pareto_mask(group[x], group[metric], higher)
    ok["on_overall_front"] = pareto_mask(ok[x], ok[metric], higher) if len(ok) else []
    columns = ["method", *(c for c in ("method.budget",) if c in ok), x, metric]
    columns += ["on_method_front", "on_overall_front", "run_dir"]
    return ok[columns].sort_values(["method", x]).reset_index(drop=True)


def task_fronts(runs: pd.DataFrame, metric: str, x: str) -> list[tuple[str, pd.DataFrame]]:
    """(label, front table) for each comparable group of `runs` (one task's runs)."""
    groups = comparable_groups(runs)
    return [
        (label, front_table(group, metric, x)) for label, (_, group) in zip(group_labels(groups), groups, strict=True)
    ]


def pareto_figure(panels: list[tuple[str, pd.DataFrame]], metric: str, x: str, title: str) -> Figure:
    """One panel per (label, front table); a method has the same colour in every panel."""
    label, scale = AXES.get(x, (x, 1))
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.3 * rows), squeeze=False)
    methods = sorted({m for _, table in panels for m in table["method"]})
    palette = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])  # endless: more methods reuse colours
    colors = dict(zip(methods, palette, strict=False))
    for ax, (panel, table) in zip(axes.flat, panels, strict=False):  # a grid may have a spare cell or two
        for method, group in table.groupby("method"):
            ax.scatter(group[x] / scale, group[metric], alpha=0.5, s=24, color=colors[method])
            front = group[group["on_method_front"]].sort_values(x)
            ax.plot(front[x] / scale, front[metric], marker="o", color=colors[method], label=method)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.set_title(panel, fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def print_front(label: str, fronts: pd.DataFrame, x: str) -> None:
    shown = fronts.drop(columns="run_dir")
    scale = AXES.get(x, (x, 1))[1]
    if scale != 1:
        shown[x] = shown[x] / scale
        shown = shown.rename(columns={x: f"{x} (MiB)"})
    print(f"== {label}")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(shown.to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.plot", description=__doc__)
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--task", help="which task to plot (default: each task found)")
    parser.add_argument("--metric", help="y axis (default: the task's primary metric)")
    parser.add_argument("--x", default="kv_bytes_device", help=f"x axis, e.g. {', '.join(AXES)}")
    parser.add_argument("--out", type=Path, help="output file stem (default: RESULTS_DIR/pareto-TASK)")
    args = parser.parse_args(argv)
    # The command line writes files, so it needs no display. Only here is the backend chosen: importing
    # this module (in a notebook, say) must leave the caller's backend alone.
    plt.switch_backend("Agg")

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
        panels = task_fronts(runs, metric, args.x)
        for label, fronts in panels:
            print_front(f"{task} | {label}", fronts, args.x)
        out = args.out or args.results_dir / f"pareto-{task}"
        fig = pareto_figure(panels, metric, args.x, task)
        for suffix in (".png", ".svg"):
            fig.savefig(out.with_suffix(suffix), dpi=150)
        plt.close(fig)
        print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.svg')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

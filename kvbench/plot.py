"""Pareto fronts from a results directory: `python -m kvbench.plot RESULTS_DIR [--out DIR] [options]`.

For each task, one figure: a row per comparable group of runs (same model and task settings: context
lengths, limit, data...; the engine, batch size and dtype too, since they change timings) and a column per
cost: measured KV bytes on the device, decode time per token, measured compression ratio. Each method
keeps one colour and marker in every figure; the non-dominated runs of the panel (no other run is both
cheaper and at least as good) are joined by a grey line, each method's own front by a thin line of its
colour, and the full cache is a black star with a dotted line at its score. Written as
`pareto-<task>.png` and `.svg`, with the fronts as a table (`pareto-<task>.md`, `.csv`), also printed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kvbench.records import load_table


@dataclass(frozen=True)
class Axis:
    label: str
    scale: float  # stored value / scale = the plotted value
    lower_is_better: bool = True


AXES = {
    "kv_bytes_device": Axis("KV cache on device (MiB, measured)", 2**20),
    "decode_ms_per_token": Axis("decode time (ms/token)", 1),
    "compression_ratio": Axis("compression ratio (x, measured)", 1, lower_is_better=False),
    "kv_bytes_device_peak": Axis("peak KV cache on device (MiB, measured)", 2**20),
    "peak_memory_bytes": Axis("peak memory (MiB)", 2**20),
    "prefill_s_mean": Axis("prefill time (s/sequence)", 1),
}
FRONT_AXES = ("kv_bytes_device", "decode_ms_per_token", "compression_ratio")
BASELINE = "full"

# What a run measured of its inputs. Runs with equal settings but different values here did not see the
# same data (e.g. the files under a `data_dir` changed between sweeps), so they must not share a front.
INPUT_MEASURES = ("samples", "prompt_tokens_mean")
# Run settings that change the costs measured (a compiled step is faster than an eager one).
RUN_SETTINGS = ("kvbench.engine", "kvbench.batch_size", "model.dtype")
# Method parameters a sweep varies, shown as each run's setting ("budget=256") in tables.
SWEPT_PARAMETERS = ("budget", "bits", "high_bits", "low_bits", "low_ratio", "sharing", "page_size", "recall_cap")

# tab10 without its grey, which is the all-methods front's colour (FRONT_GREY), plus a teal and a navy: a
# distinct colour for each shipped method.
FRONT_GREY = "0.35"
COLOURS = (
    *(c for c in plt.get_cmap("tab10").colors if len(set(c)) > 1),
    (0.106, 0.620, 0.467),
    (0.122, 0.122, 0.478),
)
METHOD_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "method"
KNOWN_METHODS = sorted(path.stem for path in METHOD_CONFIGS.glob("*.yaml"))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def method_style(method: str) -> tuple[tuple[float, ...], str]:
    """A colour and marker per method, the same in every figure and report whichever methods are drawn:
    the methods of `configs/method/` in name order take the distinct colours first; any other method gets
    a style from its name's checksum. (The baseline is drawn as a black star instead.)"""
    known = [name for name in KNOWN_METHODS if name != BASELINE]
    index = known.index(method) if method in known else zlib.crc32(method.encode())
    return COLOURS[index % len(COLOURS)], MARKERS[(index // len(COLOURS) + index) % len(MARKERS)]


def metric_label(metric: str, higher_is_better: bool) -> str:
    return f"{metric.replace('_', ' ')} ({'higher' if higher_is_better else 'lower'} is better)"


def settings_columns(table: pd.DataFrame) -> list[str]:
    """What runs must share to be compared: task, model (and its path), every task setting (`task.*`) and the
    run settings that change costs, where the table has them."""
    task_settings = sorted(c for c in table.columns if c.startswith("task."))
    # Two models filed under one name (two local folders called alike) still differ by path.
    models = ["model", *(c for c in ("model.path",) if c in table)]
    return ["task", *models, *task_settings, *(c for c in RUN_SETTINGS if c in table)]


def _as_text(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    # Compared as text: a setting may be a list (flattened to "1024,2048"), missing (NaN) in another
    # task's rows, or of another type there; text compares and sorts them all the same way. pandas 3 keeps
    # NaN through astype(str), and groupby drops NaN keys: a missing setting becomes the text "nan" first.
    return table[columns].astype(str).fillna("nan")


def mixed_settings(runs: pd.DataFrame) -> dict[str, list[str]]:
    """The settings (and measured inputs) that differ among `runs`, with the values found."""
    columns = settings_columns(runs) + [c for c in INPUT_MEASURES if c in runs]
    text = _as_text(runs, columns)
    return {c: sorted(text[c].unique()) for c in columns if text[c].nunique() > 1}


def comparable_groups(table: pd.DataFrame) -> list[tuple[dict[str, str], pd.DataFrame]]:
    """`table` split into groups of runs with the same task, model and settings.

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


def pareto_mask(x: pd.Series, y: pd.Series, higher_is_better: bool, x_lower_is_better: bool = True) -> pd.Series:
    """True where no other point has x at least as good and y at least as good, one of them strictly."""
    better_x = -x if x_lower_is_better else x
    better_y = y if higher_is_better else -y
    keep = []
    for xi, yi in zip(better_x, better_y, strict=True):
        dominated = ((better_x >= xi) & (better_y >= yi) & ((better_x > xi) | (better_y > yi))).any()
        keep.append(not dominated)
    return pd.Series(keep, index=x.index, dtype=bool)


def run_setting(runs: pd.DataFrame) -> pd.Series:
    """Each run's swept method parameters as text ("budget=256"): those whose value differs between the
    runs of its method here, else its budget or bits; empty for a method without any (the baseline)."""
    setting = pd.Series("", index=runs.index, dtype=object)
    for _, own in runs.groupby("method"):
        present = [f"method.{p}" for p in SWEPT_PARAMETERS if f"method.{p}" in own and own[f"method.{p}"].notna().any()]
        varying = [c for c in present if own[c].astype(str).nunique() > 1]
        shown = varying or [c for c in present if c in ("method.budget", "method.bits")]
        for index, row in own.iterrows():
            setting[index] = " ".join(f"{c.removeprefix('method.')}={_number(row[c])}" for c in shown)
    return setting


def _number(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


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
    lower_x = AXES[x].lower_is_better if x in AXES else True
    ok["setting"] = run_setting(ok)
    ok["on_method_front"] = False
    for _, group in ok.groupby("method"):
        ok.loc[group.index, "on_method_front"] = pareto_mask(group[x], group[metric], higher, lower_x)
    ok["on_overall_front"] = pareto_mask(ok[x], ok[metric], higher, lower_x)
    columns = ["method", *(c for c in ("method.budget",) if c in ok), "setting", x, metric]
    columns += ["on_method_front", "on_overall_front", "run_dir"]
    return ok[columns].sort_values(["method", x]).reset_index(drop=True)


def task_fronts(runs: pd.DataFrame, metric: str, x: str) -> list[tuple[str, pd.DataFrame]]:
    """(label, front table) for each comparable group of `runs` (one task's runs)."""
    groups = comparable_groups(runs)
    return [
        (label, front_table(group, metric, x)) for label, (_, group) in zip(group_labels(groups), groups, strict=True)
    ]


def draw_front(ax: Axes, fronts: pd.DataFrame, metric: str, x: str) -> None:
    """One panel: every run as its method's marker, each method's front, the overall front, the baseline."""
    axis = AXES.get(x, Axis(x, 1))
    for method, runs in fronts.groupby("method"):
        if method == BASELINE:
            continue
        colour, marker = method_style(method)
        ax.scatter(runs[x] / axis.scale, runs[metric], color=colour, marker=marker, s=36, alpha=0.85, zorder=3)
        own = runs[runs["on_method_front"]].sort_values(x)
        ax.plot(own[x] / axis.scale, own[metric], color=colour, linewidth=0.8, alpha=0.6, zorder=2)
    overall = fronts[fronts["on_overall_front"]].sort_values(x)
    ax.plot(overall[x] / axis.scale, overall[metric], color=FRONT_GREY, linewidth=2.2, alpha=0.45, zorder=1)
    full = fronts[fronts["method"] == BASELINE]
    if len(full):
        ax.scatter(full[x] / axis.scale, full[metric], marker="*", s=220, color="black", zorder=4)
        ax.axhline(full[metric].mean(), color="black", linestyle=":", linewidth=0.8, zorder=0)
    ax.set_xlabel(axis.label)
    ax.grid(alpha=0.3)


def legend_handles(methods: list[str]) -> list[Line2D]:
    handles = []
    for method in sorted(methods):
        if method == BASELINE:
            style = {"marker": "*", "color": "black", "markersize": 12}
        else:
            colour, marker = method_style(method)
            style = {"marker": marker, "color": colour, "markersize": 7}
        handles.append(Line2D([], [], linestyle="none", label=method, **style))
    handles.append(Line2D([], [], color=FRONT_GREY, linewidth=2.2, alpha=0.45, label="Pareto front (all methods)"))
    return handles


def fronts_figure(task: str, runs: pd.DataFrame, metric: str, axes: tuple[str, ...] = FRONT_AXES) -> Figure:
    """A row per comparable group of `runs` (one task), a column per cost in `axes`."""
    groups = comparable_groups(runs)
    labels = group_labels(groups)
    fig, grid = plt.subplots(len(groups), len(axes), figsize=(4.6 * len(axes), 3.6 * len(groups) + 0.6), squeeze=False)
    higher = bool(runs["higher_is_better"].iloc[0])
    methods: set[str] = set()
    for row, (label, (_, group)) in enumerate(zip(labels, groups, strict=True)):
        for column, x in enumerate(axes):
            ax = grid[row][column]
            fronts = front_table(group, metric, x) if x in group else pd.DataFrame()
            if fronts.empty:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_xlabel(AXES.get(x, Axis(x, 1)).label)
            else:
                draw_front(ax, fronts, metric, x)
                methods |= set(fronts["method"])
            if column == 0:
                ax.set_ylabel(f"{label}\n{metric_label(metric, higher)}", fontsize="small")
    handles = legend_handles(sorted(methods))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize="small", frameon=False)
    fig.suptitle(task)
    legend_rows = -(-len(handles) // 7)
    fig.tight_layout(rect=(0, 0.3 * legend_rows / fig.get_figheight(), 1, 1))
    return fig


def pareto_figure(panels: list[tuple[str, pd.DataFrame]], metric: str, x: str, title: str) -> Figure:
    """One cost only: a panel per (label, front table) of `task_fronts`, side by side."""
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.0 * rows + 0.6), squeeze=False)
    methods: set[str] = set()
    for ax, (label, fronts) in zip(grid.flat, panels, strict=False):  # a grid may have a spare cell or two
        draw_front(ax, fronts, metric, x)
        ax.set_title(label, fontsize="medium")
        ax.set_ylabel(metric.replace("_", " "))
        methods |= set(fronts["method"])
    for ax in grid.flat[len(panels) :]:
        ax.set_visible(False)
    handles = legend_handles(sorted(methods))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize="small", frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.3 * -(-len(handles) // 7) / fig.get_figheight(), 1, 1))
    return fig


def fronts_summary(runs: pd.DataFrame, metric: str, axes: tuple[str, ...] = FRONT_AXES) -> pd.DataFrame:
    """The table behind a task's figure: a row per complete run, its costs in the plotted units, and on
    which axes it is on the overall front (every comparable group on its own)."""
    groups = comparable_groups(runs)
    tables = []
    for label, (_, group) in zip(group_labels(groups), groups, strict=True):
        ok = group[(group["status"] == "ok") & group[metric].notna()].copy()
        ok.insert(0, "group", label)
        ok["setting"] = run_setting(ok)
        shown = ["group", "method", "setting", metric]
        if "other_commit" in ok and ok["other_commit"].fillna(False).astype(bool).any():
            ok["other commit"] = ok["other_commit"].fillna(False).astype(bool)  # not this checkout's code
            shown.append("other commit")
        for x in axes:
            if x not in ok:
                continue
            axis = AXES.get(x, Axis(x, 1))
            ok[axis.label] = ok[x] / axis.scale
            front = front_table(ok, metric, x) if ok[x].notna().any() else pd.DataFrame(columns=["run_dir"])
            ok[f"front: {x}"] = ok["run_dir"].isin(set(front.loc[front.get("on_overall_front", []), "run_dir"]))
            shown += [axis.label, f"front: {x}"]
        order = ["method", *(x for x in axes[:1] if x in ok)]  # a method's runs from the smallest cache up
        tables.append(ok.sort_values(order)[shown])
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub Markdown table (no tabulate needed): numbers rounded, booleans as a check mark."""

    def cell(value: object) -> str:
        if isinstance(value, bool):
            return "✓" if value else ""
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def plot_task(
    table: pd.DataFrame, task: str, out_dir: Path, metric: str | None = None, axes: tuple[str, ...] = FRONT_AXES
) -> dict[str, Path]:
    """Figure (PNG, SVG) and front table (Markdown, CSV) of one task; the paths written, by suffix."""
    runs = table[table["task"] == task]
    metric = metric or runs["primary_metric"].dropna().iloc[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"pareto-{task}"
    fig = fronts_figure(task, runs, metric, axes)
    paths = {suffix: stem.with_suffix(suffix) for suffix in (".png", ".svg", ".md", ".csv")}
    fig.savefig(paths[".png"], dpi=150)
    fig.savefig(paths[".svg"])
    plt.close(fig)
    summary = fronts_summary(runs, metric, axes)
    summary.to_csv(paths[".csv"], index=False)
    paths[".md"].write_text(markdown_table(summary) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.plot", description=__doc__)
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--task", help="which task to plot (default: each task found)")
    parser.add_argument("--metric", help="y axis (default: the task's primary metric)")
    parser.add_argument("--x", nargs="+", default=list(FRONT_AXES), help=f"cost axes, of: {', '.join(AXES)}")
    parser.add_argument("--out", type=Path, help="folder for the figures and tables (default: RESULTS_DIR)")
    args = parser.parse_args(argv)
    # The command line writes files, so it needs no display. Only here is the backend chosen: importing
    # this module (in a notebook, say) must leave the caller's backend alone.
    plt.switch_backend("Agg")

    if not args.results_dir.is_dir():  # bad input (2), as kvbench.index and kvbench.report say it
        print(f"kvbench.plot: error: results_dir={args.results_dir} is not a folder", file=sys.stderr)
        return 2
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
        missing = [c for c in (metric, *args.x) if c not in runs]
        if missing:
            print(f"kvbench.plot: no column {missing[0]!r}; columns: {', '.join(runs.columns)}", file=sys.stderr)
            return 1
        paths = plot_task(table, task, args.out or args.results_dir, metric, tuple(args.x))
        print(f"== {task}")
        print(paths[".md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

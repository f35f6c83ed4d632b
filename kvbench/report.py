"""One Markdown page of a sweep: `python -m kvbench.report RESULTS_DIR [--previous OLD] [--out DIR]`.

The page (`report.md` in `--out`, default RESULTS_DIR/report) has the runs by status, each task's table
of fronts with its figure, the failed and unfinished runs, and which runs came from another commit than
this checkout's. The index (`index.csv`, `.parquet`) and the figures are written beside it, so the folder
is a self-contained nightly artifact and tomorrow's `--previous`.

With `--previous` (an earlier report folder, an index file, or a results folder), runs with the same
identity (the run directory's name: task, model, method and config hash) are compared, and a regression
is flagged when a run that was ok:
  - lost more than `--accuracy-drop` points of a higher-is-better metric (1 point: 0.01 of a metric in
    [0, 1] such as accuracy, 1.0 of a x100 score such as LongBench's);
  - rose by more than `--metric-rise` percent on a lower-is-better metric (perplexity);
  - decodes more than `--slowdown` percent slower per token (only when both ran on the same device);
  - or failed (error, oom).
Exit status: 0 without regressions, 3 with one (the page lists them), 1 when there is nothing to report,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from kvbench.index import build_index, write_index
from kvbench.plot import FRONT_AXES, markdown_table, plot_task, run_setting
from kvbench.records import COMMIT_AT_IMPORT

REGRESSION_EXIT = 3
FAILED = ("error", "oom")


@dataclass(frozen=True)
class Tolerances:
    accuracy_drop_points: float = 1.0  # higher-is-better metrics, in points (0.01 of a [0, 1] metric)
    metric_rise_pct: float = 1.0  # lower-is-better metrics (perplexity), relative
    slowdown_pct: float = 10.0  # decode time per token, relative

    def describe(self) -> str:
        return (
            f"a metric drop of more than {self.accuracy_drop_points:g} point(s) (0.01 of a metric in [0, 1]), "
            f"a lower-is-better metric rising more than {self.metric_rise_pct:g}%, decode time per token more "
            f"than {self.slowdown_pct:g}% slower (same device only), or a run that was ok failing"
        )


def run_key(run_dir: str) -> str:
    """`<task>/<model>/<method>-<config hash>`: the same config gives the same key in any results folder."""
    return "/".join(Path(run_dir).parts[-3:])


def read_previous(path: Path) -> pd.DataFrame:
    """An earlier index: from a report folder (its index.csv), an index file, or a results folder."""
    if path.is_file():
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if (path / "index.csv").is_file():
        return pd.read_csv(path / "index.csv")
    return build_index(path)


def _points(value: float, reference: float) -> float:
    """How many points `value` is: a metric in [0, 1] counts 0.01 as one point, a x100 score counts 1."""
    return value * 100 if max(abs(value), abs(reference)) <= 1 else value


def compare(current: pd.DataFrame, previous: pd.DataFrame, tolerances: Tolerances) -> pd.DataFrame:
    """A row per run found in both, with the primary metric and decode time before and after, and what
    regressed (empty when nothing did)."""
    now = current.assign(key=current["run_dir"].map(run_key)).set_index("key")
    before = previous.assign(key=previous["run_dir"].map(run_key)).set_index("key")
    rows = []
    for key in now.index.intersection(before.index):
        new, old = now.loc[key], before.loc[key]
        if old["status"] != "ok":
            continue  # nothing to regress from
        metric = old["primary_metric"]
        row = {"run": key, "status": new["status"], "metric": metric, "before": old.get(metric)}
        row["after"] = new.get(metric) if new["status"] == "ok" else None
        row["decode ms/token before"] = old.get("decode_ms_per_token")
        row["decode ms/token after"] = new.get("decode_ms_per_token") if new["status"] == "ok" else None
        row["regression"] = "; ".join(regressions(new, old, metric, tolerances))
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["run", "regression"])


def regressions(new: pd.Series, old: pd.Series, metric: str, tolerances: Tolerances) -> list[str]:
    if new["status"] in FAILED:
        return [f"ok before, now {new['status']}: {new.get('error')}"]
    if new["status"] != "ok":
        return []  # incomplete: not finished yet, not worse
    found = []
    before, after = float(old[metric]), float(new[metric])
    if bool(old.get("higher_is_better", True)):
        drop = _points(before - after, before)
        if drop > tolerances.accuracy_drop_points:
            found.append(f"{metric} {before:.4g} -> {after:.4g} ({drop:.2f} points lower)")
    elif before > 0 and (after - before) / before * 100 > tolerances.metric_rise_pct:
        found.append(f"{metric} {before:.4g} -> {after:.4g} ({(after - before) / before:+.1%})")
    old_ms, new_ms = old.get("decode_ms_per_token"), new.get("decode_ms_per_token")
    same_device = old.get("device_name") == new.get("device_name")
    if same_device and pd.notna(old_ms) and pd.notna(new_ms) and old_ms > 0:
        slower_pct = (new_ms - old_ms) / old_ms * 100
        if slower_pct > tolerances.slowdown_pct:
            found.append(f"decode {old_ms:.3g} -> {new_ms:.3g} ms/token ({slower_pct:+.0f}%)")
    return found


def _names(values: pd.Series) -> str:
    return ", ".join(sorted(values.astype(str).unique()))


def _counts(index: pd.DataFrame) -> pd.DataFrame:
    counts = index.groupby(["task", "status"]).size().unstack(fill_value=0)
    counts["total"] = counts.sum(axis=1)
    return counts.reset_index()


def _failures(index: pd.DataFrame) -> pd.DataFrame:
    failed = index[index["status"] != "ok"].copy()
    failed["setting"] = run_setting(failed) if len(failed) else []
    # as objects: where no failed run has a message (all unfinished), the column is float NaN, which a string
    # fill would have to change (pandas warns that it will refuse)
    failed["error"] = failed.get("error", pd.Series(index=failed.index, dtype=object)).astype(object).fillna("")
    return failed[["task", "model", "method", "setting", "status", "error", "run_dir"]]


def render(
    index: pd.DataFrame,
    figures: dict[str, dict[str, Path]],
    out_dir: Path,
    comparison: pd.DataFrame | None,
    previous: Path | None,
    tolerances: Tolerances,
) -> str:
    """The Markdown page."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# kvbench sweep report",
        "",
        f"{len(index)} runs, generated {now} by commit `{COMMIT_AT_IMPORT}`.",
        "",
        "## Runs by status",
        "",
        markdown_table(_counts(index)),
        "",
    ]
    other = index[index["other_commit"].fillna(False).astype(bool)]
    commits = sorted(index["commit"].dropna().astype(str).unique())
    lines += [f"Commits of these runs: {', '.join(f'`{c}`' for c in commits) or 'none recorded'}."]
    if len(other):
        lines += [
            f"**{len(other)} runs are of another commit than this checkout's** (`other_commit` in the index): "
            "their numbers are not necessarily what this code measures.",
        ]
        by_commit = other.groupby("commit").agg(
            runs=("run_dir", "size"), tasks=("task", _names), methods=("method", _names)
        )
        lines += ["", markdown_table(by_commit.reset_index())]
    if comparison is not None:
        lines += [
            "",
            "## Against the previous sweep",
            "",
            f"Previous: `{previous}`. Tolerances: {tolerances.describe()}.",
        ]
        flagged = comparison[comparison["regression"] != ""]
        lines += [
            "",
            f"{len(comparison)} runs in both; **{len(flagged)} regression(s)**."
            if len(flagged)
            else f"{len(comparison)} runs in both; no regression.",
        ]
        if len(flagged):
            lines += ["", markdown_table(flagged)]
    for task, paths in figures.items():
        lines += ["", f"## {task}", "", f"![{task}: Pareto fronts]({paths['.png'].relative_to(out_dir)})", ""]
        lines += [paths[".md"].read_text().strip(), ""]
        lines += [f"Files: [SVG]({paths['.svg'].relative_to(out_dir)}), [CSV]({paths['.csv'].relative_to(out_dir)})."]
    failures = _failures(index)
    lines += ["", "## Failed and unfinished runs", ""]
    lines += [markdown_table(failures) if len(failures) else "None.", ""]
    return "\n".join(lines)


def make_report(
    results_dir: Path, out_dir: Path, previous: Path | None = None, tolerances: Tolerances = Tolerances()
) -> tuple[Path, pd.DataFrame | None]:
    """Write the page, its index and figures into `out_dir`; the page's path and the comparison (if any)."""
    index = build_index(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_index(index, out_dir)
    complete = index[index["status"] != "incomplete"]
    figures = {}
    for task in sorted(complete[complete["status"] == "ok"]["task"].unique()):
        figures[task] = plot_task(complete, task, out_dir, axes=FRONT_AXES)
    comparison = compare(index, read_previous(previous), tolerances) if previous else None
    page = out_dir / "report.md"
    page.write_text(render(index, figures, out_dir, comparison, previous, tolerances))
    return page, comparison


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvbench.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--previous", type=Path, help="an earlier report folder, index file or results folder")
    parser.add_argument("--out", type=Path, help="folder for the page and its files (default: RESULTS_DIR/report)")
    parser.add_argument("--accuracy-drop", type=float, default=Tolerances.accuracy_drop_points, help="points")
    parser.add_argument("--metric-rise", type=float, default=Tolerances.metric_rise_pct, help="percent")
    parser.add_argument("--slowdown", type=float, default=Tolerances.slowdown_pct, help="percent, decode time")
    args = parser.parse_args(argv)
    for name, path in (("results_dir", args.results_dir), ("--previous", args.previous)):
        if path is not None and not path.exists():
            print(f"kvbench.report: error: {name}={path} does not exist", file=sys.stderr)
            return 2
    if build_index(args.results_dir).empty:
        print(f"kvbench.report: no run directories under {args.results_dir}", file=sys.stderr)
        return 1
    plt.switch_backend("Agg")  # files only, no display (and a notebook importing this keeps its backend)
    tolerances = Tolerances(args.accuracy_drop, args.metric_rise, args.slowdown)
    out_dir = args.out or args.results_dir / "report"
    page, comparison = make_report(args.results_dir, out_dir, args.previous, tolerances)
    print(f"wrote {page}")
    if comparison is not None:
        flagged = comparison[comparison["regression"] != ""]
        for row in flagged.itertuples():
            print(f"kvbench.report: regression: {row.run}: {row.regression}", file=sys.stderr)
        if len(flagged):
            return REGRESSION_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The results index: `python -m kvbench.index RESULTS_DIR [--out DIR]`.

One row per run directory under RESULTS_DIR, rebuilt from the directories every time (nothing else is
kept, so it cannot drift from them): config columns, metrics, measured bytes, timings, status (`ok`,
`error`, `oom`, or `incomplete` for a directory without a record: killed or still running) and the
commit that produced it (`other_commit` marks runs of a commit other than this checkout's). Written as
`index.csv`, and `index.parquet` when pyarrow is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from kvbench.records import COMMIT_AT_IMPORT, load_table

# The columns a reader looks at first; every other column follows in the table's order.
LEADING = ["task", "model", "method", "status", "other_commit", "commit", "primary_metric"]


def build_index(results_dir: str | Path) -> pd.DataFrame:
    """Every run directory under `results_dir`, complete or not, one row each."""
    table = load_table(results_dir, incomplete=True)
    if table.empty:
        return table
    leading = [c for c in LEADING if c in table]
    ordered = table[leading + [c for c in table.columns if c not in leading]]
    return ordered.sort_values(["task", "model", "method", "run_dir"]).reset_index(drop=True)


def write_index(index: pd.DataFrame, out_dir: Path) -> list[Path]:
    """`index.csv`, and `index.parquet` if pyarrow is there; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "index.csv"]
    index.to_csv(written[0], index=False)
    try:
        import pyarrow  # noqa: F401  (pandas' parquet engine; the csv is enough without it)
    except ImportError:
        return written
    # Parquet wants one type per column; a setting can be a number in one run and text in another.
    mixed = [c for c in index.columns if index[c].dtype == object]
    index.astype({c: "string" for c in mixed}).to_parquet(out_dir / "index.parquet", index=False)
    return [*written, out_dir / "index.parquet"]


def summary(index: pd.DataFrame) -> str:
    """Runs by status, and how many came from another commit than this checkout's."""
    counts = ", ".join(f"{count} {status}" for status, count in index["status"].value_counts().sort_index().items())
    lines = [f"{len(index)} runs: {counts}"]
    other = index[index["other_commit"].fillna(False).astype(bool)]
    if len(other):
        commits = ", ".join(sorted(other["commit"].astype(str).unique()))
        lines.append(f"{len(other)} runs of another commit than this checkout's ({COMMIT_AT_IMPORT}): {commits}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.index", description=__doc__)
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--out", type=Path, help="folder for index.csv / index.parquet (default: RESULTS_DIR)")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"kvbench.index: error: results_dir={args.results_dir} is not a folder", file=sys.stderr)
        return 2
    index = build_index(args.results_dir)
    if index.empty:
        print(f"kvbench.index: no run directories under {args.results_dir}", file=sys.stderr)
        return 1
    written = write_index(index, args.out or args.results_dir)
    print(summary(index))
    print("wrote " + " and ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

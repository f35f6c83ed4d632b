"""`python -m kvbench.report`: the page of a sweep (counts, tables, figures, failures, other commits) and
the comparison with a previous sweep that flags regressions beyond the stated tolerances."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest

from kvbench.index import build_index
from kvbench.records import COMMIT_AT_IMPORT, base_commit
from kvbench.report import REGRESSION_EXIT, Tolerances, compare, main

HERE = base_commit(COMMIT_AT_IMPORT)
MIB = 2**20


def write_run(
    root: Path,
    name: str,
    metric: float | None,
    decode_ms: float = 10.0,
    status: str = "ok",
    task: str = "passkey",
    commit: str = HERE,
    device: str = "cpu-a",
    budget: int | None = 128,
) -> None:
    """A run directory named `<task>/tiny/<name>` (the name stands for `<method>-<config hash>`)."""
    directory = root / task / "tiny" / name
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text("{}\n")
    if status == "incomplete":
        return
    higher = task != "wikitext2"
    metric_name = "accuracy" if higher else "perplexity"
    record = {
        "task": task, "model": "tiny", "method": name.split("-")[0], "status": status,
        "error": None if status == "ok" else "RuntimeError: boom",
        "primary_metric": metric_name, "higher_is_better": higher,
        "metrics": {metric_name: metric} if status == "ok" else {},
        "measurements": {"kv_bytes_device": (budget or 1024) / 16 * MIB, "decode_ms_per_token": decode_ms,
                         "compression_ratio": 1024 / (budget or 1024), "samples": 6} if status == "ok" else {},
        "method_params": {"budget": budget}, "task_params": {"context_lengths": [1024]},
        "environment": {"git_commit": commit, "device_name": device},
    }  # fmt: skip
    (directory / "record.json").write_text(json.dumps(record))


def write_sweep(root: Path, **changes: dict) -> None:
    """The same five runs each night; `changes[name]` overrides one run's fields."""
    runs = {
        "full-aaa": {"metric": 1.0, "budget": None},
        "snapkv-bbb": {"metric": 0.8},
        "h2o-ccc": {"metric": 0.5},
        "streamingllm-ddd": {"metric": 0.4},
        "full-eee": {"metric": 14.0, "task": "wikitext2", "budget": None},
    }
    for name, fields in runs.items():
        write_run(root, name, **{**fields, **changes.get(name, {})})


def test_report_page_has_counts_tables_figures_failures_and_other_commits(tmp_path, capsys):
    results = tmp_path / "results"
    write_sweep(results, **{"h2o-ccc": {"commit": "f" * 40}, "streamingllm-ddd": {"status": "error"}})
    write_run(results, "snapkv-fff", None, status="incomplete")
    out = tmp_path / "report"
    assert main([str(results), "--out", str(out)]) == 0
    page = (out / "report.md").read_text()
    assert "| passkey | 1 | 1 | 3 | 5 |" in page  # error, incomplete, ok, total
    assert "| wikitext2 | 0 | 0 | 1 | 1 |" in page
    assert "![passkey: Pareto fronts](pareto-passkey.png)" in page and (out / "pareto-passkey.png").exists()
    assert "![wikitext2: Pareto fronts](pareto-wikitext2.png)" in page and (out / "pareto-wikitext2.svg").exists()
    assert "| tiny | snapkv | budget=128 | 0.8 |" in page  # the front table
    assert "**1 runs are of another commit than this checkout's**" in page and "f" * 40 in page
    failed = page.split("## Failed and unfinished runs")[1]
    assert "| streamingllm | budget=128 | error | RuntimeError: boom |" in failed
    assert "| snapkv |  | incomplete |" in failed
    assert len(pd.read_csv(out / "index.csv")) == 6  # the index travels with the page


def test_a_page_whose_failed_runs_are_all_unfinished_lists_them_without_a_warning(tmp_path):
    """No failed run has a message (an unfinished one has no record): the error column is all NaN, which
    a string fill once turned into a pandas deprecation warning (to become an error)."""
    results = tmp_path / "results"
    write_sweep(results)
    write_run(results, "snapkv-fff", None, status="incomplete")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        assert main([str(results), "--out", str(tmp_path / "report")]) == 0
    failed = (tmp_path / "report" / "report.md").read_text().split("## Failed and unfinished runs")[1]
    assert "| snapkv |  | incomplete |" in failed


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"snapkv-bbb": {"metric": 0.78}}, "accuracy 0.8 -> 0.78 (2.00 points lower)"),
        ({"snapkv-bbb": {"decode_ms": 11.5}}, "decode 10 -> 11.5 ms/token (+15%)"),
        ({"snapkv-bbb": {"status": "oom"}}, "ok before, now oom"),
        ({"full-eee": {"metric": 14.5}}, "perplexity 14 -> 14.5 (+3.6%)"),
    ],
)
def test_regressions_beyond_tolerance_are_flagged(change, flag, tmp_path):
    write_sweep(tmp_path / "before")
    write_sweep(tmp_path / "after", **change)
    comparison = compare(build_index(tmp_path / "after"), build_index(tmp_path / "before"), Tolerances())
    assert len(comparison) == 5
    flagged = comparison[comparison["regression"] != ""]
    assert len(flagged) == 1 and flag in flagged["regression"].iloc[0]


@pytest.mark.parametrize(
    "change",
    [
        {"snapkv-bbb": {"metric": 0.795}},  # half a point
        {"snapkv-bbb": {"metric": 0.9, "decode_ms": 10.5}},  # better, and 5% slower
        {"snapkv-bbb": {"decode_ms": 30.0, "device": "cpu-b"}},  # slower on another machine: not comparable
        {"full-eee": {"metric": 14.1}},  # perplexity +0.7%
        {"snapkv-bbb": {"status": "incomplete"}},  # not finished yet
    ],
)
def test_changes_within_tolerance_are_not_flagged(change, tmp_path):
    write_sweep(tmp_path / "before")
    write_sweep(tmp_path / "after", **change)
    comparison = compare(build_index(tmp_path / "after"), build_index(tmp_path / "before"), Tolerances())
    assert (comparison["regression"] == "").all()


def test_cli_exits_with_the_regression_code_against_a_previous_report(tmp_path, capsys):
    write_sweep(tmp_path / "monday")
    assert main([str(tmp_path / "monday"), "--out", str(tmp_path / "monday-report")]) == 0
    write_sweep(tmp_path / "tuesday", **{"h2o-ccc": {"metric": 0.3}})
    args = [str(tmp_path / "tuesday"), "--previous", str(tmp_path / "monday-report")]
    assert main(args) == REGRESSION_EXIT == 3
    assert "regression: passkey/tiny/h2o-ccc: accuracy 0.5 -> 0.3 (20.00 points lower)" in capsys.readouterr().err
    page = (tmp_path / "tuesday" / "report" / "report.md").read_text()
    assert "5 runs in both; **1 regression(s)**." in page and "h2o-ccc" in page
    assert main([*args, "--accuracy-drop", "25"]) == 0  # a looser tolerance
    assert "no regression" in (tmp_path / "tuesday" / "report" / "report.md").read_text()


def test_cli_bad_paths(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "results_dir=" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 1
    write_sweep(tmp_path / "r")
    assert main([str(tmp_path / "r"), "--previous", str(tmp_path / "missing")]) == 2
    assert "--previous=" in capsys.readouterr().err

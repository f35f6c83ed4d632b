"""Pareto fronts: the dominance rule on a hand example, and the CLI on a small results fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kvbench.plot import main, pareto_mask
from kvbench.records import load_table


def test_pareto_mask_by_hand():
    # (bytes, accuracy): (1, .5) and (2, .9) are on the front; (3, .8) is beaten by (2, .9);
    # (2, .7) by (2, .9) (same bytes, worse accuracy).
    x = pd.Series([1, 2, 3, 2])
    y = pd.Series([0.5, 0.9, 0.8, 0.7])
    assert pareto_mask(x, y, higher_is_better=True).tolist() == [True, True, False, False]
    # Lower is better (perplexity): (1, .5) is best in both; the rest are dominated.
    assert pareto_mask(x, y, higher_is_better=False).tolist() == [True, False, False, False]


def write_record(root: Path, method: str, budget: int | None, kv_bytes: float, accuracy: float) -> None:
    directory = root / "passkey" / "tiny" / f"{method}-{budget}"
    directory.mkdir(parents=True)
    record = {
        "task": "passkey", "model": "tiny", "method": method, "status": "ok",
        "primary_metric": "accuracy", "higher_is_better": True,
        "metrics": {"accuracy": accuracy}, "measurements": {"kv_bytes_device": kv_bytes},
        "method_params": {"budget": budget}, "task_params": {},
    }  # fmt: skip
    (directory / "record.json").write_text(json.dumps(record))


def test_plot_cli_writes_png_svg_and_prints_table(tmp_path, capsys):
    mib = 2**20
    write_record(tmp_path, "full", None, 20 * mib, 1.0)
    for budget, acc in [(64, 0.2), (128, 0.6), (256, 0.5)]:
        write_record(tmp_path, "snapkv", budget, budget / 16 * mib, acc)
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "pareto-passkey.png").stat().st_size > 1000
    assert (tmp_path / "pareto-passkey.svg").exists()
    printed = capsys.readouterr().out
    assert "snapkv" in printed and "on_method_front" in printed
    table = load_table(tmp_path)
    assert len(table) == 4 and set(table["method"]) == {"full", "snapkv"}


def test_plot_cli_reports_an_empty_directory(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no run records" in capsys.readouterr().err

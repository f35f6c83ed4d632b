"""Pareto fronts: the dominance rule on a hand example, which runs may share a front, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kvbench.plot import (
    FRONT_AXES,
    comparable_groups,
    front_table,
    fronts_figure,
    fronts_summary,
    group_labels,
    main,
    method_style,
    mixed_settings,
    pareto_mask,
)
from kvbench.records import load_table

MIB = 2**20


def test_pareto_mask_by_hand():
    # (bytes, accuracy): (1, .5) and (2, .9) are on the front; (3, .8) is beaten by (2, .9);
    # (2, .7) by (2, .9) (same bytes, worse accuracy).
    x = pd.Series([1, 2, 3, 2])
    y = pd.Series([0.5, 0.9, 0.8, 0.7])
    assert pareto_mask(x, y, higher_is_better=True).tolist() == [True, True, False, False]
    # Lower is better (perplexity): (1, .5) is best in both; the rest are dominated.
    assert pareto_mask(x, y, higher_is_better=False).tolist() == [True, False, False, False]
    # A cost where more is better (compression ratio): (3, .8) and (2, .9) are on the front, (1, .5) is beaten
    # by both, (2, .7) by (2, .9).
    assert pareto_mask(x, y, higher_is_better=True, x_lower_is_better=False).tolist() == [False, True, True, False]


def write_record(
    root: Path,
    method: str,
    budget: int | None,
    kv_bytes: float,
    accuracy: float,
    model: str = "tiny",
    task_params: dict[str, Any] | None = None,
    samples: int = 10,
    engine: str = "eager",
    model_path: str | None = None,
) -> None:
    """A passkey run record as `kvbench.run` writes it (only the fields the table reads)."""
    params = {"context_lengths": [1024], "depths": [0.1, 0.5], "limit": 0, **(task_params or {})}
    directory = root / "passkey" / model / f"{method}-{budget}-{len(list(root.rglob('record.json')))}"
    directory.mkdir(parents=True)
    record = {
        "task": "passkey", "model": model, "method": method, "status": "ok",
        "primary_metric": "accuracy", "higher_is_better": True,
        "metrics": {"accuracy": accuracy},
        "measurements": {"kv_bytes_device": kv_bytes, "samples": samples, "prompt_tokens_mean": 1000.0,
                         "compression_ratio": 20 * MIB / kv_bytes, "decode_ms_per_token": 10 + kv_bytes / MIB},
        "method_params": {"budget": budget}, "task_params": params,
        "config": {"kvbench": {"engine": engine}, **({"model": {"path": model_path}} if model_path else {})},
    }  # fmt: skip
    (directory / "record.json").write_text(json.dumps(record))


def write_sweep(
    root: Path, model: str = "tiny", engine: str = "eager", model_path: str | None = None, **task_params: Any
) -> None:
    """full and snapkv at three budgets; accuracy falls with the context length, as passkey's does."""
    length = int(str(task_params.get("context_lengths", [1024])[0]))
    drop = 0.0 if length <= 1024 else 0.4
    same = {"engine": engine, "model_path": model_path}
    write_record(root, "full", None, 20 * MIB * length / 1024, 1.0, model, task_params, **same)
    for budget, acc in [(64, 0.4), (128, 0.9), (256, 0.8)]:
        write_record(root, "snapkv", budget, budget / 16 * MIB, max(acc - drop, 0.0), model, task_params, **same)


def test_plot_cli_writes_png_svg_and_the_front_table(tmp_path, capsys):
    write_sweep(tmp_path)
    out = tmp_path / "figures"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    assert (out / "pareto-passkey.png").stat().st_size > 1000
    assert (out / "pareto-passkey.svg").exists()
    table = (out / "pareto-passkey.md").read_text()
    assert table in capsys.readouterr().out
    header = "| group | method | setting | accuracy | KV cache on device (MiB, measured) | front: kv_bytes_device |"
    assert table.startswith(header)
    # Budget 128 (0.9 at 8 MiB) is on the front of bytes; 256 (0.8 at 16 MiB) is beaten by it.
    assert "| tiny | snapkv | budget=128 | 0.9 | 8 | ✓ |" in table
    assert "| tiny | snapkv | budget=256 | 0.8 | 16 |  |" in table
    assert len(pd.read_csv(out / "pareto-passkey.csv")) == 4


def test_front_summary_marks_the_front_on_each_axis(tmp_path):
    write_sweep(tmp_path)
    summary = fronts_summary(load_table(tmp_path), "accuracy").set_index("setting")
    # Fewer bytes, less time, more compression: 64 and 128 are on every front, 256 on none; full (1.0,
    # the most accurate) is on every front too.
    for x in FRONT_AXES:
        assert summary[f"front: {x}"].to_dict() == {
            "": True,
            "budget=64": True,
            "budget=128": True,
            "budget=256": False,
        }
    assert summary.loc["budget=64", "compression ratio (x, measured)"] == pytest.approx(5.0)


def test_figure_has_a_row_per_group_and_a_column_per_cost(tmp_path):
    write_sweep(tmp_path, context_lengths=[1024])
    write_sweep(tmp_path, context_lengths=[2048])
    fig = fronts_figure("passkey", load_table(tmp_path), "accuracy")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 6
    assert [ax.get_xlabel() for ax in panels[:3]] == [
        "KV cache on device (MiB, measured)", "decode time (ms/token)", "compression ratio (x, measured)"
    ]  # fmt: skip
    assert panels[0].get_ylabel().startswith("tiny | context_lengths=1024")
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["full", "snapkv"]


def test_method_styles_are_fixed_by_name():
    """A method looks the same in every figure, and the known methods do not share a colour and marker."""
    assert method_style("snapkv") == method_style("snapkv")
    styles = {method_style(m) for m in ["arkvale", "cla", "h2o", "kivi", "quarot", "rtn", "scissorhands",
                                        "snapkv", "snapstream", "streamingllm", "zipcache"]}  # fmt: skip
    assert len(styles) == 11
    colours = {colour for colour, _ in styles}
    assert len(colours) == 11  # a colour each
    assert not any(len(set(colour)) == 1 for colour in colours)  # no grey: the all-methods front is grey


def test_engines_do_not_share_a_front(tmp_path):
    """An eager and a compiled run differ in decode time for reasons that are not the method's."""
    write_sweep(tmp_path, engine="eager")
    write_sweep(tmp_path, engine="compiled")
    assert group_labels(comparable_groups(load_table(tmp_path))) == [
        "tiny | kvbench.engine=compiled", "tiny | kvbench.engine=eager"
    ]  # fmt: skip


def test_models_filed_under_one_name_from_other_paths_do_not_share_a_front(tmp_path):
    """Two local model folders of the same name are two models: their runs are two groups, told apart by path."""
    write_sweep(tmp_path, model="checkpoint", model_path="/models/a/checkpoint")
    write_sweep(tmp_path, model="checkpoint", model_path="/models/b/checkpoint")
    groups = comparable_groups(load_table(tmp_path))
    assert [len(runs) for _, runs in groups] == [4, 4]
    assert group_labels(groups) == [
        "checkpoint | model.path=/models/a/checkpoint", "checkpoint | model.path=/models/b/checkpoint"
    ]  # fmt: skip


def test_plot_cli_reports_an_empty_directory(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no run records" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2  # bad input, as kvbench.index and kvbench.report say it
    assert "is not a folder" in capsys.readouterr().err


def test_runs_at_other_context_lengths_or_models_do_not_share_a_front(tmp_path):
    write_sweep(tmp_path, context_lengths=[1024])
    write_sweep(tmp_path, context_lengths=[2048])
    write_sweep(tmp_path, context_lengths=[2048], limit=5)
    write_sweep(tmp_path, model="other", context_lengths=[1024])
    groups = comparable_groups(load_table(tmp_path))
    assert len(groups) == 4
    for _, runs in groups:
        assert len(runs) == 4 and (runs["method"] == "full").sum() == 1  # one full point per front
        assert runs["model"].nunique() == 1 and runs["task.context_lengths"].nunique() == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a comparable group draws without a warning
            fronts = front_table(runs, "accuracy", "kv_bytes_device")
        # Budget 256 (0.8) is beaten by 128 (0.9 with fewer bytes) in every group.
        snap = fronts[fronts["method"] == "snapkv"].set_index("method.budget")["on_method_front"]
        assert snap.to_dict() == {64: True, 128: True, 256: False}
    # Labels name the model and only the settings that differ between groups.
    assert sorted(group_labels(groups)) == [
        "other | context_lengths=1024 | limit=0",
        "tiny | context_lengths=1024 | limit=0",
        "tiny | context_lengths=2048 | limit=0",
        "tiny | context_lengths=2048 | limit=5",
    ]


def test_runs_on_other_data_do_not_share_a_front(tmp_path):
    """Tasks put their data's fingerprint in their settings (e.g. `data_sha256`): it splits groups too."""
    write_sweep(tmp_path, data_sha256="aaa")
    write_sweep(tmp_path, data_sha256="bbb")
    groups = comparable_groups(load_table(tmp_path))
    assert group_labels(groups) == ["tiny | data_sha256=aaa", "tiny | data_sha256=bbb"]


def test_a_front_that_mixes_settings_warns(tmp_path):
    write_sweep(tmp_path, context_lengths=[1024])
    write_sweep(tmp_path, context_lengths=[2048])
    table = load_table(tmp_path)
    assert mixed_settings(table) == {"task.context_lengths": ["1024", "2048"]}
    with pytest.warns(UserWarning, match=r"task\.context_lengths: 1024 \| 2048"):
        front_table(table, "accuracy", "kv_bytes_device")


def test_same_settings_but_other_inputs_warn(tmp_path):
    """Equal settings, different measured inputs (e.g. the files in a data_dir changed): not comparable."""
    write_sweep(tmp_path)
    write_record(tmp_path, "streamingllm", 128, 8 * MIB, 0.3, samples=7)
    (_, runs), *rest = comparable_groups(load_table(tmp_path))
    assert not rest
    with pytest.warns(UserWarning, match=r"samples: 10 \| 7"):
        front_table(runs, "accuracy", "kv_bytes_device")


def test_plot_cli_draws_one_panel_per_comparable_group(tmp_path, capsys):
    write_sweep(tmp_path, context_lengths=[1024])
    write_sweep(tmp_path, context_lengths=[2048, 4096])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny \\| context_lengths=1024 | full |" in printed
    assert "| tiny \\| context_lengths=2048,4096 | full |" in printed
    assert printed.count("| full |") == 2  # one full row in each group


def test_importing_the_module_leaves_the_backend_alone():
    """Only `python -m kvbench.plot` picks a backend: a notebook keeps its inline one."""
    code = "import kvbench.plot, matplotlib; print(matplotlib.get_backend())"
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"


def test_runs_missing_a_setting_still_form_a_group():
    """A task's runs lack the other tasks' settings (NaN in a mixed sweep's table); pandas 3 keeps NaN through
    astype(str) and groupby drops NaN keys, which once left such a task with no group and no figure."""
    table = pd.DataFrame(
        {
            "task": ["wikitext2", "wikitext2", "passkey"],
            "model": ["m", "m", "m"],
            "method": ["full", "snapkv", "full"],
            "task.context_lengths": [float("nan"), float("nan"), "1024"],
        }
    )
    groups = comparable_groups(table[table["task"] == "wikitext2"])
    assert len(groups) == 1 and len(groups[0][1]) == 2

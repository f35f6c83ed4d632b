"""The results index: rebuilt from the run directories (complete, failed, incomplete), runs of another
commit marked, written as csv and parquet, and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kvbench.index import build_index, main, write_index
from kvbench.records import COMMIT_AT_IMPORT, base_commit

HERE = base_commit(COMMIT_AT_IMPORT)
ELSEWHERE = "0" * 40


def write_run(root: Path, method: str, status: str = "ok", commit: str = HERE, budget: int = 128) -> Path:
    """A run directory as `kvbench.run` leaves it (the fields the index reads)."""
    directory = root / "passkey" / "tiny" / f"{method}-{budget}{commit[:4]}{status}"
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text("method: {}\n")
    record = {
        "task": "passkey", "model": "tiny", "method": method, "status": status,
        "error": None if status == "ok" else "RuntimeError: boom",
        "primary_metric": "accuracy", "higher_is_better": True,
        "metrics": {"accuracy": 0.5} if status == "ok" else {},
        "measurements": {"kv_bytes_device": 1024.0, "decode_ms_per_token": 3.0} if status == "ok" else {},
        "method_params": {"budget": budget}, "task_params": {"context_lengths": [1024], "limit": 0},
        "config": {"model": {"dtype": "float32"}, "kvbench": {"engine": "eager", "results_dir": "x"}},
        "environment": {"git_commit": commit}, "wall_s": 12.5, "finished_at": "2026-12-03T08:00:00+00:00",
    }  # fmt: skip
    (directory / "record.json").write_text(json.dumps(record))
    return directory


@pytest.fixture
def results(tmp_path: Path) -> Path:
    write_run(tmp_path, "full")
    write_run(tmp_path, "snapkv", commit=HERE + "+dirty")
    write_run(tmp_path, "h2o", commit=ELSEWHERE)
    write_run(tmp_path, "streamingllm", status="error")
    killed = write_run(tmp_path, "snapkv", budget=256)
    (killed / "record.json").unlink()  # killed mid-run: a config, no record
    hydra_own = tmp_path / ".hydra" / "multirun-x" / "0" / ".hydra"
    hydra_own.mkdir(parents=True)
    (hydra_own / "config.yaml").write_text("{}\n")  # Hydra's copy of a job config: not a run
    return tmp_path


def test_index_has_a_row_per_run_directory_with_status_and_commit(results):
    index = build_index(results)
    assert len(index) == 5
    assert sorted(index["status"]) == ["error", "incomplete", "ok", "ok", "ok"]
    by_method = index.set_index(["method", "status"])
    assert by_method.loc[("h2o", "ok"), "other_commit"]
    assert not by_method.loc[("snapkv", "ok"), "other_commit"]  # uncommitted changes on this commit
    assert not by_method.loc[("full", "ok"), "other_commit"]
    assert by_method.loc[("snapkv", "ok"), "dirty"] and not by_method.loc[("full", "ok"), "dirty"]
    assert by_method.loc[("snapkv", "incomplete"), "run_dir"].endswith("snapkv-256" + HERE[:4] + "ok")
    # Config columns, measured bytes, timings.
    ok = index[index["method"] == "full"].iloc[0]
    assert ok["model.dtype"] == "float32" and ok["kvbench.engine"] == "eager" and "kvbench.results_dir" not in index
    assert ok["kv_bytes_device"] == 1024.0 and ok["wall_s"] == 12.5 and ok["method.budget"] == 128
    assert list(index.columns[:5]) == ["task", "model", "method", "status", "other_commit"]


def test_index_is_rebuilt_from_the_directories(results):
    before = build_index(results)
    shutil.rmtree(Path(before[before["method"] == "h2o"]["run_dir"].iloc[0]))
    write_run(results, "snapkv", budget=512)
    after = build_index(results)
    assert len(after) == len(before) and "h2o" not in set(after["method"])
    assert (after["method.budget"] == 512).sum() == 1


def test_index_files_read_back(results, tmp_path):
    index = build_index(results)
    written = write_index(index, tmp_path / "out")
    assert [p.name for p in written] == ["index.csv", "index.parquet"]
    for table in (pd.read_csv(written[0]), pd.read_parquet(written[1])):
        assert len(table) == len(index) and list(table.columns) == list(index.columns)
        assert sorted(table["status"]) == sorted(index["status"])


def test_index_cli_says_which_runs_are_of_another_commit(results, capsys):
    assert main([str(results)]) == 0
    out = capsys.readouterr().out
    assert "5 runs: 1 error, 1 incomplete, 3 ok" in out
    assert "1 runs of another commit than this checkout's" in out and ELSEWHERE in out
    assert (results / "index.csv").exists()


def test_index_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "results_dir=" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 1
    assert "no run directories" in capsys.readouterr().err

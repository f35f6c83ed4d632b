"""The notebooks run top to bottom in a real kernel on small results fixtures and draw their figures:
pareto.ipynb on records written here, analysis.ipynb on the committed tests/fixtures/sweep_results."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SWEEP_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sweep_results"


def execute(name: str, results: Path, monkeypatch) -> list[dict]:
    """Run notebooks/`name` on `results`; every output of its code cells."""
    monkeypatch.setenv("KVBENCH_RESULTS", str(results))
    # The kernel picks its inline backend only when MPLBACKEND is unset; a CI that sets it (e.g. to Agg)
    # would otherwise hide every figure and fail this test for the wrong reason.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def write_record(root: Path, method: str, budget: int | None, context: int, kv_mib: float, accuracy: float) -> None:
    """A passkey run record with the fields `load_table` reads, as `kvbench.run` writes them."""
    directory = root / "passkey" / "tiny" / f"{method}-{budget}-{context}"
    directory.mkdir(parents=True)
    record = {
        "task": "passkey", "model": "tiny", "method": method, "status": "ok", "error": None,
        "primary_metric": "accuracy", "higher_is_better": True,
        "metrics": {"accuracy": accuracy},
        "measurements": {"kv_bytes_device": kv_mib * 2**20, "samples": 6, "prompt_tokens_mean": context,
                         "compression_ratio": 4.0, "decode_ms_per_token": 5.0},
        "method_params": {"budget": budget},
        "task_params": {"context_lengths": [context], "depths": [0.1, 0.5, 0.9], "limit": 0},
    }  # fmt: skip
    (directory / "record.json").write_text(json.dumps(record))


def test_pareto_notebook_draws_a_panel_per_setting(tmp_path, monkeypatch):
    for context in (1024, 2048):
        write_record(tmp_path, "full", None, context, 16 * context / 1024, 1.0)
        for budget, accuracy in [(128, 0.3), (256, 0.8)]:
            write_record(tmp_path, "snapkv", budget, context, budget / 16, accuracy * 1024 / context)
    failed = tmp_path / "passkey" / "tiny" / "h2o-oom"
    failed.mkdir(parents=True)
    failed.joinpath("record.json").write_text(
        json.dumps({"task": "passkey", "model": "tiny", "method": "h2o", "status": "oom", "error": "OutOfMemoryError"})
    )

    outputs = execute("pareto.ipynb", tmp_path, monkeypatch)
    data = [out.get("data", {}) for out in outputs]
    assert sum("image/png" in d for d in data) == 1  # one figure for the one task
    shown = "\n".join(d.get("text/markdown", "") for d in data)
    assert "tiny | context_lengths=1024" in shown and "tiny | context_lengths=2048" in shown
    streams = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert f"7 runs under {tmp_path.resolve()}" in streams
    assert "not comparable" not in streams  # no front mixed settings
    assert any("OutOfMemoryError" in d.get("text/plain", "") for d in data)  # the failures table


def test_analysis_notebook_on_the_committed_sweep_fixture(monkeypatch):
    outputs = execute("analysis.ipynb", SWEEP_FIXTURE, monkeypatch)
    data = [out.get("data", {}) for out in outputs]
    streams = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "10 runs: 1 error, 1 incomplete, 8 ok" in streams
    assert "runs of another commit than this checkout's" in streams  # the fixture's commits are old
    # The fronts (one figure, a row per model) and the costs chart.
    assert sum("image/png" in d for d in data) == 2
    markdown = "\n".join(d.get("text/markdown", "") for d in data)
    assert "| arkvale | budget=192 |" in markdown and "| snapkv | budget=128 |" in markdown
    assert "| smollm2-135m \\| context_lengths=1024" in markdown and "| tiny-llama \\| context_lengths=256" in markdown
    html = "\n".join(d.get("text/html", "") for d in data)
    assert "accuracy@1024" in html  # the per-task breakdown
    assert "prefill_overhead" in html  # the costs table
    assert "injected by hand" in html and "incomplete" in html  # failed and unfinished runs

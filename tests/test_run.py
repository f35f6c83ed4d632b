"""The whole path: config errors before any model loads, records, resume after a crash, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvbench.run as run_module
from kvbench.engine import Engine, Measurement
from kvbench.errors import ConfigError
from kvbench.run import run
from tests.conftest import REPO, compose_config

TINY = ["model=tiny-llama", "model.device=cpu", "kvbench.warmup=false"]
SHORT_PASSKEY = ["task=passkey", "task.context_lengths=[128]", "task.depths=[0.5]", "task.max_new_tokens=4"]


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_model", refuse)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["method=snapkv", "method.budget=0"], "method.budget"),
        (["method=snapkv", "method.budget=16", "method.window=32"], "method.budget"),
        (["method=streamingllm", "method.budget=4", "method.sinks=4"], "method.budget"),
        (["method=streamingllm", "method.positions=sideways"], "method.positions"),
        (["method=h2o", "method.budget=100000"], "method.budget"),
        (["method=h2o", "method.exempt_layers=99"], "method.exempt_layers"),
        (["method=snapkv", "+method.colour=blue"], "method.colour"),
        (["method=snapkv", "method.budget=many"], "method.budget"),
        (["task=passkey", "task.context_lengths=[9000]"], "task.context_lengths"),
        (["task=wikitext2", "task.data_dir=/nonexistent"], "task.data_dir"),
        (["task=wikitext2", "task.protocol=sliding", "method=snapkv"], "task.protocol"),
        (["model.source=moon"], "model.source"),
        (["kvbench.prefill_chunk=0"], "kvbench.prefill_chunk"),
    ],
)
def test_bad_input_fails_before_any_model_loads(overrides, key, no_model_loads, tmp_path):
    cfg = compose_config(*TINY, f"kvbench.results_dir={tmp_path}", *overrides)
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    assert caught.value.key == key
    assert not any(tmp_path.iterdir())  # nothing was written either


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "kvbench", "method=snapkv", "method.budget=-3", f"kvbench.results_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "method.budget=-3" in lines[0] and "positive" in lines[0]


def test_cli_unknown_method_lists_the_choices(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvbench", "method=nope", f"kvbench.results_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2  # bad input, as kvbench's own checks report it (Hydra itself exits 1)
    assert "method/nope" in result.stderr and "snapkv" in result.stderr


def test_record_has_every_field_and_rerun_skips(tiny, tmp_path, monkeypatch, capsys):
    cfg = compose_config(*TINY, *SHORT_PASSKEY, "method=snapkv", "method.budget=64", f"kvbench.results_dir={tmp_path}")
    directory = run(cfg)
    record = json.loads((directory / "record.json").read_text())
    assert record["status"] == "ok"
    assert set(record["metrics"]) >= {"accuracy"}
    assert set(record["measurements"]) >= {
        "prefill_s_mean", "decode_ms_per_token", "decode_tokens_per_s", "kv_bytes_device", "kv_bytes_host",
        "kv_bytes_device_peak", "dense_kv_bytes", "compression_ratio", "peak_memory_bytes", "prompt_tokens_max",
    }  # fmt: skip
    assert record["measurements"]["kv_bytes_device"] > 0
    assert record["environment"]["git_commit"] and record["environment"]["torch"]
    assert record["method_params"]["budget"] == 64 and "gqa_policy" in record["method_params"]
    assert record["config"]["method"]["budget"] == 64
    rows = [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "prediction" in rows[0] and "m_prefill_s" in rows[0]

    monkeypatch.setattr(run_module, "load_model", lambda *a: (_ for _ in ()).throw(AssertionError("reloaded")))
    capsys.readouterr()
    assert run(cfg) == directory  # complete: skipped without loading anything
    printed = capsys.readouterr().out  # and its results shown again, as when it ran
    assert "complete already, skipping" in printed and "accuracy" in printed and "kv bytes (device" in printed


def test_crash_leaves_no_record_and_rerun_completes(tiny, tmp_path, monkeypatch):
    cfg = compose_config(
        *TINY, *SHORT_PASSKEY, "task.depths=[0.2,0.8]", "method=h2o", f"kvbench.results_dir={tmp_path}"
    )
    original = Engine.generate
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of the run
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    (directory,) = [p.parent for p in Path(tmp_path).rglob("config.yaml")]
    assert not (directory / "record.json").exists()
    monkeypatch.setattr(Engine, "generate", original)
    run(cfg)
    record = json.loads((directory / "record.json").read_text())
    assert record["status"] == "ok" and record["measurements"]["samples"] == 2


def test_errors_become_records(tiny, tmp_path, monkeypatch):
    cfg = compose_config(*TINY, *SHORT_PASSKEY, "method=full", f"kvbench.results_dir={tmp_path}")

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Engine, "generate", broken)
    directory = run(cfg)
    record = json.loads((directory / "record.json").read_text())
    assert record["status"] == "error" and "simulated" in record["error"]


def test_sweep_resumes_where_it_stopped(tiny, tmp_path):
    """A multirun sweep, one run's record removed as a kill would leave it, run again: only it reruns."""
    command = [
        sys.executable, "-m", "kvbench", "-m", *TINY, *SHORT_PASSKEY, "method=streamingllm",
        "method.budget=32,64", f"kvbench.results_dir={tmp_path}",
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    records = sorted(Path(tmp_path).rglob("record.json"))
    assert len(records) == 2
    kept_mtime = records[0].stat().st_mtime
    records[1].unlink()
    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("skipping") == 1
    assert records[1].exists() and records[0].stat().st_mtime == kept_mtime


def test_prefill_time_is_a_mean_over_the_sequences_prefilled():
    """A sample whose identical request was prefilled for it (`prefill_shared`, 0 s) does not halve the mean."""
    measurements = [Measurement(prefill_s=2.0, batch_size=2), Measurement(prefill_shared=True, batch_size=2)]
    assert run_module.summarize(measurements, torch.device("cpu"))["prefill_s_mean"] == 2.0

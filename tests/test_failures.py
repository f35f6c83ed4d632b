"""Failures a finished record would hide: a method that compressed nothing, a record others cannot read,
an environment without a device name, two runs that differ in a setting sharing one directory."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from kvbench.config import RunSettings, build
from kvbench.errors import ConfigError
from kvbench.records import environment, write_json_atomic
from kvbench.run import identity, run
from tests.conftest import compose_config

TINY = ["model=tiny-llama", "model.device=cpu", "kvbench.warmup=false"]
SHORT_PASSKEY = ["task=passkey", "task.context_lengths=[128]", "task.depths=[0.5]", "task.max_new_tokens=4"]


@pytest.mark.parametrize(
    ("method", "compressed", "warned"),
    [
        (["method=snapkv", "method.budget=512"], False, "budget"),  # budget above the ~128-token context
        (["method=snapkv", "method.budget=48"], True, None),
        (["method=full"], False, None),  # the dense baseline is not meant to compress
        (["method=kivi", "method.storage=simulated"], False, "simulated"),  # no budget to blame
    ],
)
def test_a_method_that_compressed_nothing_is_flagged(method, compressed, warned, capsys, tmp_path):
    cfg = compose_config(*TINY, *SHORT_PASSKEY, *method, f"kvbench.results_dir={tmp_path}")
    record = json.loads((run(cfg) / "record.json").read_text())
    assert record["status"] == "ok"
    assert record["measurements"]["compressed"] is compressed
    assert bool(record["warnings"]) is bool(warned)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert bool(printed) is bool(warned)
    if warned:  # the reason given is this method's
        assert "compressed nothing" in printed[0] and warned in printed[0]
        assert ("budget" in printed[0]) is (warned == "budget")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_record_is_as_readable_as_other_files(umask, tmp_path):
    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "record.json", {"status": "ok"})
        (tmp_path / "predictions.jsonl").write_text("")  # how the run's other files are made
    finally:
        os.umask(previous)
    mode = (tmp_path / "record.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "predictions.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["predictions.jsonl", "record.json"]  # no temp


def test_cpu_environment_names_the_device():
    env = environment(torch.device("cpu"))
    assert env["device"] == "cpu" and env["device_name"].strip()


def test_every_setting_but_location_and_failure_handling_defines_the_run(tmp_path):
    """The engine and the batch size separate runs, or one's record would skip the other."""
    config = build(compose_config(*TINY, *SHORT_PASSKEY, f"kvbench.results_dir={tmp_path}"))
    eager = identity(config)
    compiled = identity(dataclasses.replace(config, settings=dataclasses.replace(config.settings, engine="compiled")))
    batched = identity(dataclasses.replace(config, settings=dataclasses.replace(config.settings, batch_size=4)))
    assert len({str(eager), str(compiled), str(batched)}) == 3
    elsewhere = dataclasses.replace(
        config.settings, results_dir=str(Path(tmp_path) / "other"), retry_errors=True, debug=True
    )
    assert identity(dataclasses.replace(config, settings=elsewhere)) == identity(config)


def test_compile_scope_defines_compiled_runs_only(tmp_path):
    """`kvbench.compile_scope` separates compiled runs; eager and graph runs keep the directories they had
    before the setting existed (it changes nothing there)."""
    config = build(compose_config(*TINY, *SHORT_PASSKEY, f"kvbench.results_dir={tmp_path}"))

    def with_settings(**changes) -> dict:
        return identity(dataclasses.replace(config, settings=dataclasses.replace(config.settings, **changes)))

    assert "compile_scope" not in identity(config)
    assert with_settings(compile_scope="step") == identity(config)
    assert with_settings(engine="compiled") != with_settings(engine="compiled", compile_scope="step")


def test_inductor_options_define_compiled_runs_only_when_given(tmp_path):
    """`kvbench.inductor_options` (added after runs were recorded) stays out of the identity while empty, so
    those runs keep their directories; given, it separates compiled runs (a speed setting, as the engine)."""
    config = build(compose_config(*TINY, *SHORT_PASSKEY, f"kvbench.results_dir={tmp_path}", "kvbench.engine=compiled"))
    combo = dataclasses.replace(config.settings, inductor_options={"combo_kernels": True})
    assert "inductor_options" not in identity(config)
    assert identity(dataclasses.replace(config, settings=combo))["inductor_options"] == {"combo_kernels": True}


def test_bad_compile_scope_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as caught:
        RunSettings(compile_scope="model")
    assert "kvbench.compile_scope" in str(caught.value) and "layer" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_config_error_crosses_processes_whole():
    """A joblib sweep's worker hands its exceptions to the parent pickled: ConfigError once failed to
    un-pickle there (BrokenProcessPool) instead of arriving as the one-line error it is."""
    import pickle

    from kvbench.errors import ConfigError

    error = pickle.loads(pickle.dumps(ConfigError("method.budget", 16, "at least 32")))
    assert (error.key, error.value, error.allowed) == ("method.budget", 16, "at least 32")
    assert str(error) == "method.budget=16 is not valid: at least 32"

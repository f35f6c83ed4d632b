"""Sweeps: the nightly configs compose into valid runs for every method, the progress callback counts and
estimates, the model loads once per worker, and a sweep killed mid-run resumes where it stopped."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import kvbench.run as run_module
from kvbench import model_pool
from kvbench.__main__ import main
from kvbench.config import build, claim_finish_number, claim_gpu, progress_line, sweep_size
from kvbench.models import ModelConfig, model_spec
from tests.conftest import CONFIGS, compose_config, method_names

TINY = ["model=tiny-llama", "model.device=cpu", "kvbench.warmup=false"]
SHORT_PASSKEY = ["task.context_lengths=[256]", "task.depths=[0.5]", "task.max_new_tokens=4"]
SIZES = {"nightly_cpu": ["small", "medium", "large"], "nightly_gpu": ["small", "large"]}


def sweep_methods(sweep: str) -> list[str]:
    params = OmegaConf.load(CONFIGS / "sweep" / f"{sweep}.yaml").hydra.sweeper.params
    return params["+sweep/method"].split(",")


@pytest.mark.parametrize("sweep", sorted(SIZES))
def test_every_method_is_in_the_nightly_sweeps(sweep):
    assert sweep_methods(sweep) == method_names()
    assert sorted(p.stem for p in (CONFIGS / "sweep" / "method").glob("*.yaml")) == method_names()


@pytest.mark.parametrize("sweep", sorted(SIZES))
def test_every_method_at_every_size_is_a_valid_run(sweep):
    """Each job of the sweep passes every check a run makes before loading weights (with the sweep's model:
    the embedded one on CPU, Llama-3.1-8B's shape on GPU), and the sizes really differ."""
    model = ["model=llama-3.1-8b"] if sweep == "nightly_gpu" else []
    spec = None
    for method in sweep_methods(sweep):
        described = set()
        for size in SIZES[sweep]:
            cfg = compose_config(f"+sweep={sweep}", f"+sweep/method={method}", f"sweep.size={size}", *model)
            config = build(cfg)
            spec = spec or model_spec(config.model)
            config.method.check(spec)
            config.task.check(spec, config.method)
            described.add(json.dumps(config.method.describe(), sort_keys=True, default=str))
        assert len(described) == (1 if method == "full" else len(SIZES[sweep])), method


@pytest.mark.parametrize("task", ["passkey", "wikitext2", "longbench"])
def test_every_cpu_task_of_the_nightly_sweep_is_a_valid_run(task, shared_data, monkeypatch):
    """The tasks' data settings resolve to the shared data (KVBENCH_DATA) and pass the data checks."""
    monkeypatch.setenv("KVBENCH_DATA", str(shared_data))
    assert OmegaConf.load(CONFIGS / "sweep" / "nightly_cpu.yaml").hydra.sweeper.params["+sweep/cpu_task"] == (
        "passkey,wikitext2,longbench"
    )
    cfg = compose_config("+sweep=nightly_cpu", f"+sweep/cpu_task={task}", "+sweep/method=snapkv", "sweep.size=small")
    config = build(cfg)
    config.task.check(model_spec(config.model), config.method)
    assert type(config.task).__module__.endswith(task)


def test_sweep_size_is_the_product_of_the_sweeps_last_override_winning():
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"a": "1,2,3", "b": "x,y"}},
                "overrides": {"task": ["b=z", "c=4,5", "d=plain"]},  # b on the command line: one value
            }
        }
    )
    assert sweep_size(config) == 3 * 1 * 2 * 1


def test_sweep_size_is_unknown_for_a_glob():
    config = OmegaConf.create({"hydra": {"sweeper": {"params": {}}, "overrides": {"task": ["method=glob(*)"]}}})
    assert sweep_size(config) == 0


def _finish_after(barrier, folder: Path, numbers) -> None:
    barrier.wait()
    numbers.put(claim_finish_number(folder))


def test_jobs_ending_together_get_different_progress_counts(tmp_path):
    """Twelve jobs ending at once (released by a barrier) each get their own place 1..12: touching a file
    and counting the folder gave two jobs the same count (a flaky sweep test printed 1, 2, 4, 4 of 4)."""
    context = multiprocessing.get_context("fork")
    barrier, numbers = context.Barrier(12), context.Queue()
    workers = [context.Process(target=_finish_after, args=(barrier, tmp_path, numbers)) for _ in range(12)]
    for worker in workers:
        worker.start()
    got = sorted(numbers.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join()
    assert got == list(range(1, 13))
    assert claim_finish_number(tmp_path) == 13


def test_progress_line_estimates_time_left_from_finished_runs():
    assert progress_line(3, 12, 90.0) == "kvbench sweep: 3/12 runs done, elapsed 1m30s, about 4m30s left"
    assert progress_line(12, 12, 7200.0) == "kvbench sweep: 12/12 runs done, elapsed 2h00m, about 0m00s left"
    assert progress_line(2, 0, 5.0) == "kvbench sweep: 2 runs done, elapsed 0m05s"


def test_model_pool_loads_once_per_config():
    loads = []

    def load(cfg):
        loads.append(cfg.name)
        return object(), object()

    model_pool.release()
    tiny, other = ModelConfig(name="tiny-llama", source="shape", shape="tiny-llama"), ModelConfig()
    first = model_pool.get(tiny, load)
    again = model_pool.get(ModelConfig(name="tiny-llama", source="shape", shape="tiny-llama"), load)
    assert loads == ["tiny-llama"] and not first.reused and again.reused and again.model is first.model
    model_pool.get(ModelConfig(name="tiny-llama", source="shape", shape="tiny-llama", seed=1), load)
    model_pool.get(other, load)
    assert loads == ["tiny-llama", "tiny-llama", "smollm2-135m"]  # another seed is another model
    model_pool.release()


def test_nightly_sweep_shows_progress_and_loads_the_model_once(monkeypatch, capsys, tmp_path):
    """The nightly config run through the CLI (in-process launcher): three jobs, one model load, a progress
    line after each job, and the records say which runs reused the model."""
    model_pool.release()
    loads = []
    real_load = run_module.load_model

    def counted(cfg):
        loads.append(cfg.name)
        return real_load(cfg)

    monkeypatch.setattr(run_module, "load_model", counted)
    args = ["-m", "+sweep=nightly_cpu", "+sweep/cpu_task=passkey", "+sweep/method=streamingllm,snapkv"]
    args += ["sweep.size=small", "sweep.budgets.small=48,64", *TINY, *SHORT_PASSKEY, f"kvbench.results_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", ["kvbench", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    assert loads == ["tiny-llama"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvbench sweep:")]
    assert [line.split(",")[0] for line in lines] == [f"kvbench sweep: {n}/4 runs done" for n in (1, 2, 3, 4)]
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("record.json")]
    assert sorted(r["measurements"]["model_reused"] for r in records) == [False, True, True, True]
    assert all((r["measurements"]["model_load_s"] > 0) != r["measurements"]["model_reused"] for r in records)
    model_pool.release()


def test_a_sweep_killed_mid_run_redoes_that_run_only(tmp_path):
    """SIGKILL (no Python handler runs) while the second of three runs generates: the rerun skips the first,
    redoes the second from scratch and runs the third."""
    # 48 new tokens keep the second run alive ~0.4 s on a fast CPU (4 tokens: ~50 ms, which a CI run once missed
    # between two polls: the sweep had finished before it could be killed)
    command = [
        sys.executable, "-m", "kvbench", "-m", *TINY, "task=passkey", "task.context_lengths=[256]",
        "task.depths=[0.5]", "task.samples_per_cell=2", "task.max_new_tokens=48", "method=streamingllm",
        "method.budget=32,48,64", f"kvbench.results_dir={tmp_path}",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        runs = [p.parent for p in tmp_path.glob("passkey/*/*/config.yaml")]
        if len(runs) == 2 and len(list(tmp_path.rglob("record.json"))) == 1:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the sweep ended before its second run could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (finished,) = [p.parent for p in tmp_path.rglob("record.json")]
    (killed,) = [p.parent for p in tmp_path.glob("passkey/*/*/config.yaml") if p.parent != finished]
    assert not (killed / "record.json").exists()
    kept_mtime = (finished / "record.json").stat().st_mtime

    rerun = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("skipping") == 1 and str(finished) in rerun.stdout
    assert (finished / "record.json").stat().st_mtime == kept_mtime
    records = [json.loads(p.read_text()) for p in Path(tmp_path).rglob("record.json")]
    assert len(records) == 3 and all(r["status"] == "ok" and r["measurements"]["samples"] == 2 for r in records)


def test_each_worker_claims_its_own_gpu(tmp_path):
    folder = tmp_path / ".gpus"
    assert claim_gpu(folder, ["2", "5"]) == "2"
    assert claim_gpu(folder, ["2", "5"]) == "5"  # "2" is held by a live process (this one)
    with pytest.raises(RuntimeError, match="more workers"):
        claim_gpu(folder, ["2", "5"])
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "5").write_text(finished.stdout.strip())  # a worker that died: its GPU is free again
    assert claim_gpu(folder, ["2", "5"]) == "5"
    (folder / "7").write_text("")  # a claimant still writing its pid: taken
    with pytest.raises(RuntimeError):
        claim_gpu(folder, ["7"])


def test_the_slurm_example_composes_into_submitits_slurm_launcher():
    """configs/hydra/launcher/slurm.yaml against the launcher's own config schema (a key it lacks fails here),
    one GPU a job."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        config = compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = config.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)


def test_joblib_sweep_over_two_workers(tmp_path):
    """`hydra/launcher=joblib_gpus` with two workers: each claims its own GPU (harmless on a CPU), loads the
    model once for its jobs, and the progress count is shared through the sweep folder."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    command = [
        sys.executable, "-m", "kvbench", "-m", "+sweep=nightly_cpu", "+sweep/cpu_task=passkey",
        "+sweep/method=streamingllm", "sweep.size=small", "sweep.budgets.small=32,40,48,56", *TINY, *SHORT_PASSKEY,
        "hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=2", f"kvbench.results_dir={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Anywhere in a line: the other worker's progress bar (carriage returns, no newline) may precede or follow
    # a message, so one line can hold both workers' (a CI run under load read only the last one's GPU).
    jobs = dict(re.findall(r"kvbench: job (\d+) on GPU (\d+)", result.stderr))
    assert sorted(jobs) == ["0", "1", "2", "3"] and set(jobs.values()) == {"0", "1"}, result.stderr[-3000:]
    done = sorted(re.findall(r"kvbench sweep: (\d+)/4 runs done", result.stderr))
    assert done == ["1", "2", "3", "4"]
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("record.json")]
    assert len(records) == 4
    assert sum(not r["measurements"]["model_reused"] for r in records) == 2  # one load per worker

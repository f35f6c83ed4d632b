"""The model pool's prefetch: the sweep's next model is read into host memory in a background thread and
taken by the run that needs it; a failed read falls back to a load; nothing is read without a next model."""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
import weakref

import pytest
import torch  # noqa: F401 - imported before the pool's first release, where its seconds would hide a wait
from omegaconf import OmegaConf

import kvbench.run as run_module
from kvbench import model_pool
from kvbench.__main__ import main
from kvbench.config import sweep_jobs
from kvbench.models import ModelConfig, load_model

SHORT_PASSKEY = ["task=passkey", "task.context_lengths=[256]", "task.depths=[0.5]", "task.max_new_tokens=4"]


class FakeModel:
    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg, self.device = cfg, cfg.device

    def to(self, device) -> FakeModel:
        self.device = str(device)
        return self


class Loader:
    """Records each load (model name, device, dtype, whether in the main thread); `fail` names failing ones."""

    def __init__(self, fail: tuple[str, ...] = (), gate: threading.Event | None = None) -> None:
        self.loads: list[tuple[str, str, str, bool]] = []
        self.made: list[weakref.ref] = []  # the models returned, to see which are still alive
        self.fail, self.gate = fail, gate

    def __call__(self, cfg: ModelConfig) -> tuple[FakeModel, object]:
        main_thread = threading.current_thread() is threading.main_thread()
        self.loads.append((cfg.name, cfg.device, cfg.dtype, main_thread))
        if self.gate is not None and not main_thread:
            self.gate.wait()
        if cfg.name in self.fail and not main_thread:
            raise OSError(f"cannot read {cfg.name}")
        model = FakeModel(cfg)
        self.made.append(weakref.ref(model))
        return model, object()


A, B, C = (ModelConfig(name=name, device="cpu") for name in "abc")


@pytest.fixture(autouse=True)
def empty_pool():
    model_pool.release()
    yield
    model_pool.release()


def test_the_next_model_is_read_in_the_background_and_taken_instead_of_loaded():
    load = Loader()
    assert not model_pool.get(A, load).reused
    assert model_pool.prefetch(B, load)
    taken = model_pool.get(B, load)
    # B was read once, in another thread, on the CPU in its device's dtype (`auto` resolved)
    assert load.loads == [("a", "cpu", "auto", True), ("b", "cpu", "float32", False)]
    assert taken.prefetched and not taken.reused and taken.model.cfg.name == "b" and taken.model.device == "cpu"
    assert taken.prefetch_s > 0 and taken.prefetch_error is None
    again = model_pool.get(B, load)  # the second run of that model: kept, not loaded or prefetched again
    assert again.reused and not again.prefetched and again.model is taken.model and len(load.loads) == 2


def test_a_run_waits_for_a_read_still_going():
    gate = threading.Event()
    load = Loader(gate=gate)
    model_pool.get(A, load)
    model_pool.prefetch(B, load)
    threading.Timer(5.0, gate.set).start()  # the read ends 5 s from now (margin for a loaded CI machine)
    taken = model_pool.get(B, load)
    assert taken.prefetched and taken.prefetch_wait_s >= 0.5 and taken.load_s >= taken.prefetch_wait_s


def test_a_failed_prefetch_falls_back_to_a_load(capsys):
    load = Loader(fail=("b",))
    model_pool.get(A, load)
    assert model_pool.prefetch(B, load)
    taken = model_pool.get(B, load)
    assert not taken.prefetched and taken.model.cfg.name == "b" and load.loads[-1] == ("b", "cpu", "auto", True)
    assert taken.prefetch_error == "OSError: cannot read b"
    assert "kvbench: prefetching model b failed (OSError: cannot read b); loading it now" in capsys.readouterr().err


def test_a_prefetch_that_cannot_start_fails_no_run(capsys):
    load = Loader()
    model_pool.get(A, load)
    assert not model_pool.prefetch(ModelConfig(name="b", device="cuda:7"), load)  # no such device here
    assert "kvbench: not prefetching model b" in capsys.readouterr().err and len(load.loads) == 1


def test_nothing_is_read_without_another_model():
    load = Loader()
    model_pool.get(A, load)
    assert not model_pool.prefetch(None, load)  # no later job uses another model
    assert not model_pool.prefetch(A, load)  # the kept one
    assert not model_pool.prefetch(ModelConfig(name="t", source="shape", shape="tiny-llama"), load)  # made, not read
    assert model_pool.prefetch(B, load) and not model_pool.prefetch(B, load)  # read once
    model_pool.release()
    assert len(load.loads) == 2


def test_at_most_one_model_ahead():
    """A prefetch not taken gives way to the next one once its read has ended: never two reads at once,
    which with the kept model would be three models in host memory."""
    gate = threading.Event()
    load = Loader(gate=gate)
    model_pool.get(A, load)
    model_pool.prefetch(B, load)
    threading.Timer(1.5, gate.set).start()  # B's read ends 1.5 s from now
    began = time.perf_counter()
    model_pool.prefetch(C, load)
    assert time.perf_counter() - began >= 0.5  # C's read started only after B's ended
    gc.collect()
    assert [model() is None for model in load.made] == [False, True, False]  # B's model is freed
    assert model_pool.get(C, load).prefetched and [name for name, *_ in load.loads] == ["a", "b", "c"]


def test_a_joblib_worker_holding_models_is_not_shut_down_as_leaking():
    """loky restarts a worker whose memory grew 300 MB after its first job; a prefetched model is such
    growth, and the restarted worker would load both models again."""
    loky = pytest.importorskip("joblib.externals.loky.process_executor")
    default = loky._MAX_MEMORY_LEAK_SIZE
    try:
        loky._MAX_MEMORY_LEAK_SIZE = int(3e8)
        model_pool.get(A, Loader())
        assert loky._MAX_MEMORY_LEAK_SIZE > 2**40
    finally:
        loky._MAX_MEMORY_LEAK_SIZE = default


def test_model_major_sweeps_put_the_model_first():
    """The basic sweeper's order: the first swept key varies slowest, so `model=...` first is model-major."""

    def order(*overrides: str) -> list[list[str]]:
        return sweep_jobs(OmegaConf.create({"hydra": {"sweeper": {"params": {}}, "overrides": {"task": overrides}}}))

    assert order("model=a,b", "method.budget=1,2") == [
        ["model=a", "method.budget=1"], ["model=a", "method.budget=2"],
        ["model=b", "method.budget=1"], ["model=b", "method.budget=2"],
    ]  # fmt: skip
    assert [job[1] for job in order("method.budget=1,2", "model=a,b")] == ["model=a", "model=b"] * 2


@pytest.fixture(scope="module")
def two_model_folders(tmp_path_factory):
    """Two tiny random Llamas saved as HF folders (model=hf): real models whose loads the pool can read ahead."""
    folders = []
    for seed in (0, 1):
        model, tokenizer = load_model(
            ModelConfig(name="tiny", source="shape", shape="tiny-llama", device="cpu", seed=seed)
        )
        folder = tmp_path_factory.mktemp(f"tiny-hf-{seed}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_two_model_sweep_reads_the_second_model_during_the_first_ones_runs(
    prefetch, two_model_folders, monkeypatch, capsys, tmp_path
):
    """The in-process launcher over 2 models x 2 budgets (model-major): the second model is read while the
    first one's runs go on and its first run takes it; with the setting off it loads there instead."""
    loads = []

    def counted(cfg):
        loads.append((cfg.path, threading.current_thread() is threading.main_thread()))
        return load_model(cfg)

    monkeypatch.setattr(run_module, "load_model", counted)
    args = ["-m", "model=hf", f"model.path={','.join(two_model_folders)}", "model.device=cpu", "method=streamingllm"]
    args += ["method.budget=32,48", "kvbench.warmup=false", *SHORT_PASSKEY, f"kvbench.results_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", ["kvbench", *args, f"kvbench.prefetch_next_model={str(prefetch).lower()}"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    first, second = two_model_folders
    assert loads == [(first, True), (second, not prefetch)]  # each model read once; the second in the background
    records = sorted(
        (json.loads(p.read_text()) for p in tmp_path.rglob("record.json")),
        key=lambda r: (r["config"]["model"]["path"], r["config"]["method"]["budget"]),
    )
    measured = [(r["measurements"]["model_reused"], r["measurements"]["model_prefetched"]) for r in records]
    assert measured == [(False, False), (True, False), (False, prefetch), (True, False)]
    assert capsys.readouterr().err.count("into host memory") == int(prefetch)  # none after the last switch

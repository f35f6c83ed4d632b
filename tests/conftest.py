"""Shared fixtures: a tiny random-weight Llama (fast), the embedded SmolLM2 (real), the shared data."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from kvbench.models import ModelConfig, load_model, model_spec

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data folder is not beside the checkout ({SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer, spec) of the tiny-llama shape, with weights large enough for peaked attention."""
    torch.set_num_threads(2)
    cfg = ModelConfig(name="tiny-llama", source="shape", shape="tiny-llama", device="cpu")
    model, tokenizer = load_model(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "proj" in name:  # random init is near-uniform attention; sharpen it so selection matters
                param.mul_(8)
    return model, tokenizer, model_spec(cfg)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer, spec) of the embedded SmolLM2-135M-Instruct."""
    cfg = ModelConfig(device="cpu")
    model, tokenizer = load_model(cfg)
    return model, tokenizer, model_spec(cfg)


# One time-out for every interpreted run, set well above the longest: it only stops a hung one
# (test_quantized_layer.py's run takes ~435 s on one core of the 2-core development machine, 556 s beside
# another test process, and CI machines have run the suite up to 1.3x slower).
INTERPRETER_TIMEOUT_S = 1200


class InterpretedRuns:
    """The test modules' interpreted runs (each a fresh process: Triton reads TRITON_INTERPRET once, at import),
    started on a background thread as soon as collection says which modules need one, so that they use the
    second core while this process runs the other tests. The thread takes them from the last module to run
    backwards; a module that comes up before its run has started runs it itself, and one whose run has
    started waits for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: dict[Path, threading.Event] = {}  # a claimed script -> set when its run has ended
        self.results: dict[Path, subprocess.CompletedProcess] = {}
        self.processes: list[subprocess.Popen] = []
        self.stopping = False
        self.thread: threading.Thread | None = None

    def start(self, scripts: list[Path]) -> None:
        self.thread = threading.Thread(target=self._run_each, args=(scripts[::-1],), daemon=True)
        self.thread.start()

    def _run_each(self, scripts: list[Path]) -> None:
        for script in scripts:
            self._run_unless_claimed(script)

    def _run_unless_claimed(self, script: Path) -> None:
        with self.lock:
            if script in self.done:
                return
            self.done[script] = threading.Event()
            if self.stopping:
                process = None
            else:
                env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
                process = subprocess.Popen(
                    [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                self.processes.append(process)
        try:
            if process is None:
                self.results[script] = subprocess.CompletedProcess([], 1, "", "the test session ended first")
                return
            try:
                stdout, stderr = process.communicate(timeout=INTERPRETER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
                stderr += f"\ntimed out after {INTERPRETER_TIMEOUT_S} s"
            self.results[script] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        finally:
            self.done[script].set()

    def result(self, script: Path) -> subprocess.CompletedProcess:
        self._run_unless_claimed(script)  # here, if the background has not started it
        self.done[script].wait()
        return self.results[script]

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for process in self.processes:
                if process.poll() is None:
                    process.kill()
        if self.thread is not None:
            self.thread.join()


INTERPRETED_RUNS = InterpretedRuns()
STARTED_RUNS = pytest.StashKey[InterpretedRuns]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the interpreted runs of the collected modules that take the `interpreted` fixture."""
    if importlib.util.find_spec("triton") is None:
        return
    scripts = list(dict.fromkeys(Path(item.fspath) for item in session.items if "interpreted" in item.fixturenames))
    if scripts:
        runs = shared_runs()
        runs.start(scripts)
        session.stash[STARTED_RUNS] = runs


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Kill a run still going (an interrupted or `-x` session), so that no process outlives the session."""
    runs = session.stash.get(STARTED_RUNS, None)
    if runs is not None:
        runs.stop()


def shared_runs() -> InterpretedRuns:
    """The runs the test files see: pytest loads this file as `conftest`, the test files import it as
    `tests.conftest`, and each module object has its own globals."""
    return importlib.import_module("tests.conftest").INTERPRETED_RUNS


def run_under_triton_interpreter(script: Path) -> dict:
    """Run a test file as a script with TRITON_INTERPRET=1 (the kernels run on CPU tensors only in a fresh
    process) and return the JSON its last output line holds; the run may have started in the background
    (`InterpretedRuns`)."""
    pytest.importorskip("triton")
    proc = INTERPRETED_RUNS.result(script)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def method_names() -> list[str]:
    return sorted(path.stem for path in (CONFIGS / "method").glob("*.yaml"))


def spill_operations(compiled) -> int:
    """Local-memory loads and stores (register spills) in a `compile_for_hopper` kernel's SASS, through the
    nvdisasm Triton ships. Skips where that binary is missing."""
    import re
    import tempfile

    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.exists():
        pytest.skip("Triton ships no nvdisasm here")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([nvdisasm, "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\b(?:LDL|STL)\b", sass))


def compile_for_hopper(
    kernel, types: dict[str, str], constexprs: dict, num_warps: int = 4, divisible_by_16: tuple[str, ...] = ()
):
    """`kernel` lowered for sm_90 with Triton's bundled ptxas: no GPU needed, and it catches what the
    interpreter cannot (tl.dot shape rules, layouts, inline PTX, lowering). Arguments not in `types` or
    `constexprs` are i32. `divisible_by_16` names the arguments Triton's launcher marks so at run time
    (16-byte-aligned pointers, integers that are multiples of 16): unmarked, loads go an element at a time,
    so a register or spill count would be of a kernel that never runs. Skips where Triton has no NVIDIA
    backend, or runs kernels interpreted."""
    pytest.importorskip("triton.backends.nvidia")
    from kvbench import kernels

    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted functions")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: types.get(name, "i32") for name in kernel.arg_names}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    positions = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    source = ASTSource(kernel, signature, constexprs=positions, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 2}
    )
    assert compiled.asm["cubin"]
    return compiled

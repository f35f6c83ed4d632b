"""Shared fixtures: a tiny random-weight Llama (fast), the embedded SmolLM2 (real), the shared data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from kvbench.models import ModelConfig, load_model, model_spec
from tests.interpreted import INTERPRETED_RUNS, REPO

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


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the interpreted runs of the collected modules that take the `interpreted` fixture."""
    if importlib.util.find_spec("triton") is None:
        return
    scripts = list(dict.fromkeys(Path(item.fspath) for item in session.items if "interpreted" in item.fixturenames))
    if scripts:
        INTERPRETED_RUNS.start(scripts)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Kill a run still going (an interrupted or `-x` session), so that no process outlives the session."""
    INTERPRETED_RUNS.stop()


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

"""Programmatic dependent launch (`kvbench/pdl.py`): refused where it cannot apply, the in-kernel wait and the
launch attribute always together, and the engine's compiled step built and run with it when asked. The
kernel side (the wait before any load) is checked by `tests/test_gemv.py`'s sm_90 compile."""

from __future__ import annotations

import pytest
import torch

from kvbench import pdl
from kvbench.engine import Engine
from kvbench.methods.full import Full

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.mark.parametrize(("engine", "device"), [("compiled", CPU), ("eager", CPU), ("graph", CPU)])
def test_refused_off_a_hopper_gpu_or_outside_the_compiled_engine(engine: str, device: torch.device) -> None:
    with pytest.raises(ValueError, match=r"pdl=True: needs engine=compiled .* compute capability >= 9\.0"):
        pdl.check(True, engine, device)
    pdl.check(False, engine, device)  # off: nothing to refuse


def test_refused_for_the_eager_engine_even_on_a_capable_gpu(monkeypatch) -> None:
    monkeypatch.setattr(pdl, "supported", lambda device: True)
    with pytest.raises(ValueError, match="engine='eager'"):
        pdl.check(True, "eager", CUDA)
    pdl.check(True, "compiled", CUDA)


def test_launch_attribute_only_with_the_wait_and_only_on_cuda_while_active() -> None:
    assert pdl.launch_options(CUDA) == {"PDL": False}  # not active
    with pdl.dependent_launches(True):
        assert pdl.launch_options(CUDA) == {"PDL": True, "launch_pdl": True}
        assert pdl.launch_options(CPU) == {"PDL": False}  # the interpreter and CPU tensors
        with pdl.dependent_launches(False):
            assert pdl.launch_options(CUDA) == {"PDL": False}
        assert pdl.launch_options(CUDA)["launch_pdl"]  # the outer setting comes back
    assert pdl.launch_options(CUDA) == {"PDL": False}


def test_engine_refuses_before_touching_the_model(tiny) -> None:
    model, tokenizer, spec = tiny
    with pytest.raises(ValueError, match="pdl=True"):
        Engine(model, tokenizer, Full(), spec, engine="compiled", pdl=True)


def test_compiled_step_gets_inductors_switch_and_runs_with_dependent_launches(tiny, monkeypatch) -> None:
    """Inductor's kernels are generated with PDL (its compile option), and the step (warm-up, capture and
    every replayed call) runs inside `dependent_launches`, where the GEMVs read it at launch."""
    model, tokenizer, spec = tiny
    monkeypatch.setattr(pdl, "supported", lambda device: True)  # a CPU run stands in for the GPU here
    engine = Engine(model, tokenizer, Full(), spec, prefill_chunk=64, engine="compiled", pdl=True)
    assert engine._compile_kwargs() == {"options": {"triton.enable_pdl": True}}
    active_in_step = []

    def tracing_only(gm: torch.fx.GraphModule, example_inputs) -> object:
        def run(*args):
            active_in_step.append(pdl._active)
            return gm.forward(*args)

        return run

    engine.compile_options = {"backend": tracing_only}
    assert "options" not in engine._compile_kwargs()  # Inductor's options are not another backend's
    torch._dynamo.reset()
    reference = Engine(model, tokenizer, Full(), spec, prefill_chunk=64).generate(list(range(100, 160)), 5)
    got = engine.generate(list(range(100, 160)), 5)
    assert got.token_ids == reference.token_ids
    assert active_in_step and all(active_in_step)
    assert not pdl._active  # restored after decode
    off = Engine(model, tokenizer, Full(), spec, prefill_chunk=64, engine="compiled")
    assert off._compile_kwargs() == {}

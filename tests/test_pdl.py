"""Programmatic dependent launch (`kvbench/pdl.py`): refused where it cannot apply, the in-kernel wait and the
launch attribute always together, the engine's compiled step built and run with it when asked, and the
operators' `_dependent` twins (their launches through Triton) giving what the traced operators give,
under Triton's interpreter. The kernels' side (each waits before any load) is checked in their sm_90 PTX."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvbench import kernels, pdl, quant_kernels, token_quant
from kvbench.engine import Engine
from kvbench.hadamard import hadamard_matrix
from kvbench.methods.full import Full
from tests.conftest import run_under_triton_interpreter
from tests.test_kernels import kernel_modules

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
    every replayed call) runs inside `dependent_launches`, where kvbench's operators read it at launch."""
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
    # profile_step's autotuning asks for a mode; torch.compile refuses a mode with options, so the mode's
    # options come along, and options of one's own are kept with the switch on top.
    engine.compile_options = {"mode": "max-autotune-no-cudagraphs"}
    assert engine._compile_kwargs() == {
        "options": {"max_autotune": True, "coordinate_descent_tuning": True, "triton.enable_pdl": True}
    }
    engine.compile_options = {"options": {"triton.enable_pdl": False, "max_autotune": True}}
    assert engine._compile_kwargs() == {"options": {"triton.enable_pdl": True, "max_autotune": True}}


def _interpreted_checks() -> dict:
    """Each public function with and without `dependent_launches`: the same kernels, so equal outputs; and
    which way each launch went (`kernels.launch` records whether it ran inside a twin)."""
    from tests.test_quantized_layer import _case_inputs, _window

    assert kernels._INTERPRETED
    inside_twin = []
    plain_launch = kernels.launch

    def recording_launch(kernel, grid, device):
        inside_twin.append(kernels._launching_dependent)
        return plain_launch(kernel, grid, device)

    kernels.launch = recording_launch  # module global: kernels.py's own launches and quant_kernels' find it
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 8, 64, generator=gen)
    keys, values = torch.randn(2, 2, 2, 300, 64, generator=gen).unbind(0)
    positions = torch.arange(300).expand(2, 2, 300).clone()
    positions[1, :, 250:] = -1
    rotation = hadamard_matrix(64, dtype=torch.int8, normalized=False)
    packed = {name: _case_inputs(name, seed=1) for name in ("kivi4_halves_bf16", "kivi2_fp32", "quarot4_offset_bf16")}

    def run_all() -> dict[str, list[torch.Tensor]]:
        out, lse = kernels.decode_attention(query, keys, values, positions, 0.125)
        results = {
            "decode_attention": [out, lse],
            "received": [kernels.received_attention(query, keys, positions, 0.125, lse)],
        }
        for name, x in packed.items():
            args = (x["query"], x["keys"], x["values"], x["lengths"], x["scale"])
            window = _window(x, 70, torch.Generator().manual_seed(7))
            rotate = (
                None
                if name == "kivi4_halves_bf16"
                else hadamard_matrix(x["query"].shape[-1], dtype=torch.int8, normalized=False)
            )
            results[name] = list(quant_kernels.packed_decode_attention(*args, window, rotate))
        key_q, value_q = token_quant.quantize_tokens(keys[:, :, :1], values[:, :, :1], rotation, 4, 64, 0.9)
        results["quantize_tokens"] = [*key_q, *value_q]
        return results

    plain = run_all()
    plain_flags, inside_twin[:] = list(inside_twin), []
    with pdl.dependent_launches(True):
        dependent = run_all()
    return {
        "equal": {
            name: all(torch.equal(a, b) for a, b in zip(plain[name], dependent[name], strict=True)) for name in plain
        },
        "plain_launches_in_twins": sum(plain_flags),
        "plain_launches": len(plain_flags),
        "dependent_launches_in_twins": sum(inside_twin),
        "dependent_launches": len(inside_twin),
    }


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


def test_dependent_twins_give_the_traced_operators_results(interpreted: dict) -> None:
    assert interpreted["equal"] == dict.fromkeys(interpreted["equal"], True)
    # quantize_tokens is one opaque operator either way (PDL only changes its launch options), so its entry
    # shows only that its output is unchanged; the launch counts below are those of `kernels.launch`.
    assert set(interpreted["equal"]) >= {"decode_attention", "received", "quantize_tokens", "kivi2_fp32"}
    # Every launch inside `dependent_launches` went through a twin, and none outside it did.
    assert interpreted["plain_launches"] == interpreted["dependent_launches"] > 10
    assert interpreted["plain_launches_in_twins"] == 0
    assert interpreted["dependent_launches_in_twins"] == interpreted["dependent_launches"]


def test_traced_step_calls_the_twins_only_while_active() -> None:
    """What dynamo records: the opaque twins (Triton launches them, with PDL) while active, else the
    traced operators (Inductor launches their kernels); the twins' fake implementations give the shapes."""
    query, keys = torch.randn(1, 4, 16), torch.randn(1, 2, 8, 16)
    positions = torch.arange(8).expand(1, 2, 8)

    def step(q, k, p):
        out, lse = kernels.decode_attention(q, k, k, p, 0.25)
        return out, kernels.received_attention(q, k, p, 0.25, lse)

    targets: list[str] = []

    def recording(gm: torch.fx.GraphModule, example_inputs) -> object:
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    for active in (False, True):
        targets.clear()
        torch._dynamo.reset()
        with pdl.dependent_launches(active):
            torch.compile(step, backend=recording, fullgraph=True)(query, keys, positions)
        suffix = "_dependent" if active else ""
        assert f"kvbench.decode_attention{suffix}" in targets
        assert f"kvbench.received_attention{suffix}" in targets
        assert not active or "kvbench.decode_attention" not in targets


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))


def _kernels_taking_pdl() -> dict[str, object]:
    pytest.importorskip("triton")
    found = {}
    for module in kernel_modules().values():
        for name, value in vars(module).items():
            if "PDL" in getattr(value, "arg_names", ()) and value is not kernels.await_previous_kernel:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_kernel_taking_pdl_waits_first() -> None:
    """A kernel launched with PDL may start before its predecessor ends: its first statement (after the
    docstring) must be the wait (`await_previous_kernel`, whose PTX the test below checks: the wait comes
    before any load). The launches ask for PDL only of kernels taking the flag (`kernels.launch`)."""
    import ast
    import inspect
    import textwrap

    found = _kernels_taking_pdl()
    assert len(found) >= 6, sorted(found)  # split, combine, received, plane, packed, quantize
    for name, kernel in found.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn)))
        body = tree.body[0].body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        first = ast.unparse(body[0])
        assert first == "await_previous_kernel(PDL)", (name, first)


def test_kernels_compile_with_the_wait_first_for_hopper() -> None:
    """The nested helper compiles into the kernels: with PDL, the wait precedes every load and the kernel
    then allows the next one's launch (`launch_dependents`); without PDL, neither instruction is emitted."""
    pytest.importorskip("triton.backends.nvidia")
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted functions")
    from tests.test_kernels import _compile_for_hopper

    tensors = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "scale_log2": "fp32"}
    partials = {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32"}
    blocks = {"BLOCK_N": kernels.BLOCK_N, "BLOCK_D": 128, "UPCAST": False, "PRECISION": "tf32", "HEAD_DIM": 128}
    split = blocks | {"BLOCK_G": 16, "BLOCK_DV": 128, "VALUE_DIM": 128}
    combine = {"BLOCK_SPLITS": 64, "COMBINE_BLOCK": kernels.COMBINE_BLOCK, "BLOCK_DV": 128, "ROTATE": False}
    quantize = {"kc_ptr": "*u8", "vc_ptr": "*u8", "rotation_ptr": "*i8", "slot_ptr": "*i64"}
    quantize |= {name: "*fp16" for name in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")}
    quantize |= {"k_ptr": "*bf16", "v_ptr": "*bf16", "rotation_scale": "fp32", "clip": "fp32"}
    quantize_constexprs = {"DIM": 128, "GROUP": 128, "ROTATE": True, "UPCAST": False, "BLOCK_R": 16}
    cases = (
        (kernels._decode_split_kernel, tensors | partials, split),
        (kernels._decode_combine_kernel, partials | {"out_ptr": "*bf16", "lse_ptr": "*fp32"}, combine),
        (kernels._received_kernel, tensors | {"lse_ptr": "*fp32", "out_ptr": "*fp32"}, blocks | {"BLOCK_G": 16}),
        (token_quant._quantize_tokens_kernel, quantize, quantize_constexprs),
    )
    for kernel, pointers, constexprs in cases:
        for dependent in (False, True):
            ptx = _compile_for_hopper(kernel, pointers, constexprs | {"PDL": dependent}).asm["ptx"]
            assert ("griddepcontrol.wait" in ptx) == dependent
            assert ("griddepcontrol.launch_dependents" in ptx) == dependent
            if dependent:
                assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")


def test_inductor_options_are_checked_before_any_compile_and_merged(tiny, monkeypatch) -> None:
    """Experiments pass Inductor config values (speed.py --inductor-option KEY=VALUE): a key Inductor does not
    have, or a value of another type, is refused with the key named; good ones reach torch.compile's options
    along with the PDL switch."""
    from kvbench.engine import parse_inductor_options

    model, tokenizer, spec = tiny
    assert parse_inductor_options(["combo_kernels=1", "max_autotune=false"]) == {
        "combo_kernels": True,
        "max_autotune": False,
    }
    with pytest.raises(ValueError, match="'no_such_key=1'"):
        parse_inductor_options(["no_such_key=1"])
    with pytest.raises(ValueError, match="'no_such_key' is not an Inductor config key"):
        Engine(model, tokenizer, Full(), spec, engine="compiled", inductor_options={"no_such_key": 1})
    with pytest.raises(ValueError, match="combo_kernels=1 must be a bool"):
        Engine(model, tokenizer, Full(), spec, engine="compiled", inductor_options={"combo_kernels": 1})
    with pytest.raises(ValueError, match="only for engine=compiled"):
        Engine(model, tokenizer, Full(), spec, inductor_options={"combo_kernels": True})
    engine = Engine(model, tokenizer, Full(), spec, engine="compiled", inductor_options={"combo_kernels": True})
    assert engine._compile_kwargs() == {"options": {"combo_kernels": True}}
    monkeypatch.setattr(pdl, "supported", lambda device: True)
    both = Engine(model, tokenizer, Full(), spec, engine="compiled", pdl=True, inductor_options={"combo_kernels": True})
    assert both._compile_kwargs() == {"options": {"combo_kernels": True, "triton.enable_pdl": True}}

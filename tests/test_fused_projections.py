"""Fused q/k/v and gate/up projections: same outputs, same parameters, no second copy, loud on misuse."""

from __future__ import annotations

import copy

import pytest
import torch

from kvbench.engine import Engine
from kvbench.fused_projections import FusedFirst, FusedPart, fuse_projections
from kvbench.methods.full import Full
from kvbench.models import ModelConfig, load_model, model_spec


@pytest.fixture(scope="module")
def pair():
    """An unfused tiny Llama and a fused deep copy of it."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny-llama", source="shape", shape="tiny-llama", device="cpu")
    model, tokenizer = load_model(cfg)
    fused = copy.deepcopy(model)
    groups = fuse_projections(fused)
    return model, fused, tokenizer, model_spec(cfg), groups


def test_every_layer_is_fused_once(pair):
    _, fused, _, spec, groups = pair
    assert groups == 2 * spec.num_layers
    assert fuse_projections(fused) == 0  # a second call leaves the fused groups alone
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedFirst) and isinstance(attn.v_proj, FusedPart)


def test_logits_match_the_unfused_model(pair):
    model, fused, _, _, _ = pair
    ids = torch.randint(0, 1000, (2, 37))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = fused(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_state_dict_and_bytes_are_unchanged(pair):
    model, fused, _, _, _ = pair
    want, got = model.state_dict(), fused.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    # Every member's weight is a view into its group's fused matrix: no second copy of the weights.
    attn = fused.model.layers[0].self_attn
    base = attn.q_proj.fused_weight
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())


def test_a_member_called_on_another_input_fails(pair):
    _, fused, _, _, _ = pair
    attn = fused.model.layers[0].self_attn
    x = torch.randn(1, 3, attn.q_proj.fused_weight.shape[1])
    attn.q_proj(x)
    with pytest.raises(RuntimeError, match="out of order"):
        attn.k_proj(x.clone())


def test_fused_compiled_step_gives_the_eager_tokens(pair):
    model, fused, tokenizer, spec, _ = pair
    prompt = list(range(5, 70))
    eager = Engine(model, tokenizer, Full(), spec, prefill_chunk=32, engine="eager").generate(prompt, 12)
    engine = Engine(fused, tokenizer, Full(), spec, prefill_chunk=32, engine="compiled")
    engine.compile_options = {"backend": "eager"}  # dynamo's fullgraph trace through the handoff
    got = engine.generate(prompt, 12)
    assert got.token_ids == eager.token_ids

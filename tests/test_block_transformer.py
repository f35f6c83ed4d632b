"""Block Transformer (kvbench/block_model.py): attention pattern, block-local token decoder, engine generation
against teacher-forced scoring, cache bytes against the formula, bad settings, loading as model=hf."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvbench.block_model import BlockCache, BlockConfig, BlockForCausalLM, kv_bytes_formula
from kvbench.cache import ModelSpec
from kvbench.engine import Engine, Request
from kvbench.errors import ConfigError
from kvbench.methods.full import Full
from kvbench.methods.snapkv import SnapKV
from kvbench.models import ModelConfig, load_model, model_spec
from kvbench.train.config import DataSettings, ModelShape, TrainConfig, TrainSettings
from kvbench.train.model import build_model

VOCAB = 64


def block_model(block_len: int = 4, prefix_tokens: int = 2, seed: int = 0) -> BlockForCausalLM:
    torch.manual_seed(seed)
    config = BlockConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, block_layers=2, token_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, block_len=block_len,
                         prefix_tokens=prefix_tokens, max_position_embeddings=256, eos_token_id=2)  # fmt: skip
    model = BlockForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so attention is peaked and tokens matter
        for name, param in model.named_parameters():
            if "proj" in name:
                param.mul_(8)
    return model


def engine_for(model: BlockForCausalLM, prefill_chunk: int = 8, method=None) -> Engine:
    c = model.config
    spec = ModelSpec("block", c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, 256)
    return Engine(model, None, method or Full(), spec, prefill_chunk=prefill_chunk)


def dependence(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[t, s]: whether changing input token s changes the teacher-forced logits at position t."""
    with torch.no_grad():
        base = model(input_ids=ids).logits[0]
        rows = []
        for s in range(ids.shape[1]):
            changed = ids.clone()
            changed[0, s] = (changed[0, s] + 1) % VOCAB
            rows.append((model(input_ids=changed).logits[0] - base).abs().amax(dim=-1) > 1e-6)
    return torch.stack(rows, dim=1)


def test_block_len_1_has_a_plain_decoders_attention_pattern():
    """Compared: which input tokens each prediction depends on (perturb token s, see which logits t change).

    A plain causal decoder (kvbench.train's llama) depends on exactly the tokens s <= t; with L_B = 1 the
    Block Transformer must too, with every token reaching the prediction through the block decoder (one
    block-decoder KV entry per token, plus the start block) and the token decoder holding only the prefix
    (P + L_B - 1 = P local entries). With L_B = 4 the set is the same (no token sees the future) though the
    routes differ: tokens of earlier blocks through the block decoder, the current block's through the token
    decoder."""
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.manual_seed(0)
    shape = ModelShape(name="plain", layers=4, hidden=32, heads=4, kv_heads=2, max_positions=64)
    plain = build_model(shape, VOCAB).eval()
    assert torch.equal(dependence(plain, ids), causal)
    one = block_model(block_len=1)
    assert torch.equal(dependence(one, ids), causal)
    assert torch.equal(dependence(block_model(block_len=4), ids), causal)
    cache = BlockCache(one, tokens=9)
    assert cache.block_keys[0].shape[2] == 9 + 1  # one entry per token, as a plain decoder's, plus the start
    assert cache.token_keys[0].shape[2] == one.config.prefix_tokens


def test_token_decoder_never_sees_another_blocks_tokens():
    """Perturb a token of block 1 with every block's prefix held fixed: the token decoder's outputs of blocks
    0, 2, 3 stay bit for bit the same; through the whole model, later blocks change (via their prefixes)."""
    model = block_model()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % VOCAB  # block 1, offset 1
    with torch.no_grad():
        start = model.block_start.weight.expand(1, 1, -1)
        blocks = torch.cat((start, model.embed_blocks(ids[:, :12])), dim=1)
        prefixes = model.prefixes(model.block_decoder(blocks, torch.arange(4), lambda i, q, k, v: _causal(q, k, v)))
        before = model.decode_tokens(prefixes, ids).view(4, 4, -1)  # [block, offset, d]
        after = model.decode_tokens(prefixes, changed).view(4, 4, -1)
        assert torch.equal(before[[0, 2, 3]], after[[0, 2, 3]])
        assert torch.equal(before[1, :2], after[1, :2])  # row j predicts token j: tokens 4, 5 precede the change
        assert not torch.equal(before[1, 2:], after[1, 2:])
        whole = (model(input_ids=ids).logits[0] - model(input_ids=changed).logits[0]).abs().amax(dim=-1)
    assert (whole[8:] > 1e-6).all()  # blocks 2, 3 (logit t predicts token t + 1) see it through the prefix


def _causal(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("block_len", [1, 4])
def test_engine_generation_equals_teacher_forced_argmax(block_len):
    """Greedy tokens of a batched engine generation (prompts 13, 10, 16 tokens: they complete blocks at
    different steps; prefill in chunks of 8) equal the argmax of the teacher-forced logits over prompt +
    generated tokens."""
    model = block_model(block_len)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (13, 10, 16)]
    generations = engine_for(model).generate_batch([Request(p, 9, min_new_tokens=9) for p in prompts])
    for prompt, generation in zip(prompts, generations, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + generation.token_ids])).logits[0]
        assert generation.token_ids == logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist()


def test_engine_nll_equals_teacher_forced_nll():
    model = block_model()
    generator = torch.Generator().manual_seed(4)
    prefix, continuation = (torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (14, 11))
    scored = engine_for(model).score_continuation(prefix, continuation)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix + continuation])).logits[0].double()
    log_probs = torch.log_softmax(logits[len(prefix) - 1 : -1], dim=-1)
    reference = -log_probs.gather(1, torch.tensor(continuation).view(-1, 1)).sum()
    assert scored.tokens == len(continuation)
    assert scored.nll_sum == pytest.approx(float(reference), rel=1e-5)


@pytest.mark.parametrize("block_len", [1, 4])
def test_kv_bytes_measured_equal_the_formula(block_len):
    """Bytes counted from the cache's tensors after a generation: block decoder ceil(tokens / L_B) + 1
    entries per layer, token decoder P + L_B - 1 per layer, K and V, fp32."""
    model = block_model(block_len)
    generation = engine_for(model).generate_batch([Request(list(range(1, 14)), 9, min_new_tokens=9)])[0]
    tokens = 13 + 9
    assert generation.measurement.kv_bytes_device == kv_bytes_formula(model.config, tokens, 4)
    per_entry = 2 * 2 * 8 * 4  # K and V x 2 KV heads x head_dim 8 x fp32
    expected = per_entry * (2 * (-(-tokens // block_len) + 1) + 2 * (2 + block_len - 1))
    assert generation.measurement.kv_bytes_device == expected


def test_decode_variants_name_the_rows_that_complete_a_block():
    """Rows at positions 13, 10, 16, L_B = 4: the next 4 steps' shapes (the rows that run the block decoder),
    from which the engine captures one CUDA graph each."""
    model = block_model()
    engine = engine_for(model)
    caches = []
    for length in (13, 10, 16):
        cache = engine.new_cache(16, 4)
        engine._prefill(cache, list(range(1, length + 1)))
        cache.finish_prefill()
        caches.append(cache)
    stacked = BlockCache.stack(caches)
    # The token at position p completes a block when p + 1 is a multiple of 4: step 0 feeds positions
    # 13, 10, 16 (none), step 1 feeds 11 (row 1), step 2 feeds 15 (row 0), step 3 feeds 19 (row 2).
    assert stacked.decode_variants() == [(), (1,), (0,), (2,)]
    with stacked.hold_variant((2,)):
        assert stacked.decode_variant() == (2,)
    assert stacked.host_positions == [13, 10, 16]


def test_a_compressing_method_is_refused():
    with pytest.raises(ValueError, match="method=full"):
        engine_for(block_model(), method=SnapKV(budget=64)).generate(list(range(1, 9)), 2)


@pytest.mark.parametrize(
    ("model_keys", "train_keys", "key"),
    [
        (dict(block_len=0), {}, "model.block_len"),
        (dict(block_len=3), {}, "model.block_len"),  # hidden 32
        (dict(block_layers=4), {}, "model.block_layers"),  # 4 layers: none left for the token decoder
        (dict(prefix_tokens=0), {}, "model.prefix_tokens"),
        (dict(kv_sharing=2), {}, "model.kv_sharing"),
        ({}, dict(seq_len=30), "train.seq_len"),  # blocks of 4
    ],
)
def test_bad_block_settings_name_the_key(model_keys, train_keys, key):
    with pytest.raises(ConfigError) as error:
        shape = ModelShape(name="b", arch="block", layers=4, hidden=32, heads=4, kv_heads=4, **model_keys)
        TrainConfig(shape, DataSettings(paths=["x"]), TrainSettings(**{"seq_len": 32, **train_keys}))
    assert error.value.key == key


def test_bad_block_setting_is_one_line_from_the_cli():
    cmd = [sys.executable, "-m", "kvbench.train", "train_model=block", "model.block_len=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "kvbench: error: model.block_len=3 is not valid: a divisor of model.hidden (128): each token's block "
        "embedding is hidden / block_len wide"
    ]


def test_checkpoint_loads_as_model_hf(tmp_path):
    model = block_model()
    model.save_pretrained(tmp_path)
    cfg = ModelConfig(name="block", source="hf", path=str(tmp_path), device="cpu")
    assert model_spec(cfg).num_layers == 4
    loaded, _ = load_model(cfg, with_tokenizer=False)
    assert engine_for(loaded).model_stop_ids == {model.config.eos_token_id}  # generation ends at end of text
    ids = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

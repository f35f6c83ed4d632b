"""`kvbench.train`: the loop learns, accumulation equals a larger batch, a killed run resumes to the same
log and weights, checkpoints load through kvbench's loader, CLA shares K/V, bad settings are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from kvbench.engine import Engine
from kvbench.errors import ConfigError
from kvbench.models import ModelConfig, load_model, model_spec
from kvbench.train import checkpoint
from kvbench.train.__main__ import build
from kvbench.train.config import DataSettings, ModelShape, TrainConfig, TrainSettings
from kvbench.train.data import BatchOrder, read_documents, split_pieces
from kvbench.train.loop import Trainer, batch_loss, train
from kvbench.train.model import build_model, forward_kwargs, parameter_counts, unused_parameters
from methods.full import Full
from tests.conftest import CONFIGS, REPO

TOY_VOCAB = 64
STEPS, SAVE_EVERY = 150, 10  # the CLI runs


def toy_pieces(seq_len: int = 16):
    """A 97-token pattern repeated: learnable within a few steps by a tiny model."""
    pattern = torch.randint(0, TOY_VOCAB, (97,), generator=torch.Generator().manual_seed(0))
    return split_pieces(pattern.repeat(60), seq_len, val_every=10)


def toy_config(out_dir: Path, **train) -> TrainConfig:
    shape = ModelShape(name="toy", layers=2, hidden=32, heads=4, kv_heads=2, max_positions=64)
    settings = dict(steps=4, batch=4, seq_len=16, lr=1e-2, warmup_steps=2, device="cpu", save_every=100,
                    eval_every=100, out_dir=str(out_dir), progress=False)  # fmt: skip
    return TrainConfig(shape, DataSettings(paths=["unused"]), TrainSettings(**{**settings, **train}))


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "checkpoint" / "model.safetensors")


def test_a_few_steps_lower_the_loss(tmp_path):
    torch.set_num_threads(2)
    result = Trainer(toy_config(tmp_path, steps=30), toy_pieces(), TOY_VOCAB).run()
    rows = checkpoint.read_loss_log(tmp_path)
    assert [row["step"] for row in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # ln(64) = 4.16 at the start
    assert result.val_loss < rows[0]["loss"] - 1.0  # held-out pieces too
    assert (tmp_path / "loss.png").is_file()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    torch.set_num_threads(2)
    pieces = toy_pieces()
    Trainer(toy_config(tmp_path / "big", batch=4, grad_accum=1), pieces, TOY_VOCAB).run()
    Trainer(toy_config(tmp_path / "acc", batch=2, grad_accum=2), pieces, TOY_VOCAB).run()
    big, acc = checkpoint.read_loss_log(tmp_path / "big"), checkpoint.read_loss_log(tmp_path / "acc")
    assert [r["loss"] for r in big] == pytest.approx([r["loss"] for r in acc], rel=1e-5)
    assert [r["tokens"] for r in big] == [r["tokens"] for r in acc]
    weights_big, weights_acc = final_weights(tmp_path / "big"), final_weights(tmp_path / "acc")
    for name, value in weights_big.items():
        torch.testing.assert_close(weights_acc[name], value, rtol=1e-4, atol=1e-5)


def test_batch_order_is_a_function_of_seed_and_step():
    order = BatchOrder(10, seed=3)
    epoch = torch.cat([order.micro_batch(step, 0, batch=5, grad_accum=1) for step in (0, 1)])
    assert sorted(epoch.tolist()) == list(range(10))  # each piece once per epoch
    fresh = BatchOrder(10, seed=3)  # a resumed run asks for step 3 first
    assert torch.equal(fresh.micro_batch(3, 1, 2, 2), order.micro_batch(3, 1, 2, 2))
    assert not torch.equal(BatchOrder(10, seed=4).micro_batch(0, 0, 5, 1), order.micro_batch(0, 0, 5, 1))


# ----- CLA -----


def cla_shape(kv_sharing: int) -> ModelShape:
    return ModelShape(name="cla", layers=4, hidden=32, heads=4, kv_heads=1, kv_sharing=kv_sharing, max_positions=256)


def test_cla_consumer_projections_get_no_gradient():
    torch.manual_seed(0)
    model = build_model(cla_shape(2), TOY_VOCAB)
    tokens = toy_pieces().train[:2]
    batch_loss(model, tokens, None).backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert unused_parameters(model) == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (1, 3) for p in "kv"}
    for name in unused_parameters(model):
        assert grads[name] is None, name
    for idx in (0, 2):  # producers serve two layers
        assert grads[f"model.layers.{idx}.self_attn.k_proj.weight"].abs().sum() > 0
    counts, plain = parameter_counts(model), parameter_counts(build_model(cla_shape(1), TOY_VOCAB))
    assert counts["params_unused"] == 4 * 32 * 8
    assert counts["params"] == plain["params"] - counts["params_unused"]


def test_cla_model_outputs_ignore_consumer_projections():
    torch.manual_seed(0)
    model = build_model(cla_shape(2), TOY_VOCAB).eval()
    tokens = toy_pieces().train[:1]
    before = model(input_ids=tokens, **forward_kwargs()).logits
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.normal_()
    assert torch.equal(model(input_ids=tokens, **forward_kwargs()).logits, before)


@pytest.mark.slow
def test_trained_cla_model_caches_half_the_kv_bytes(tmp_path):
    """The saved checkpoints go through kvbench's loader and engine; CLA2 holds half of MQA's cache."""
    torch.set_num_threads(2)
    kv_bytes = {}
    for sharing in (1, 2):
        config = replace(toy_config(tmp_path / str(sharing), steps=2, seq_len=32), model=cla_shape(sharing))
        Trainer(config, toy_pieces(32), TOY_VOCAB).run()
        folder = tmp_path / str(sharing) / "checkpoint"
        cfg = ModelConfig(name=f"s{sharing}", source="hf", path=str(folder), device="cpu")
        model, _ = load_model(cfg, with_tokenizer=False)
        spec = model_spec(cfg)
        assert spec.kv_sharing == sharing
        generation = Engine(model, None, Full(), spec).generate(list(range(1, 40)), 8)
        kv_bytes[sharing] = generation.measurement.kv_bytes_device
    assert kv_bytes[2] * 2 == kv_bytes[1]


# ----- the CLI: kill and resume, loading, bad input -----


def corpus(folder: Path) -> Path:
    """About 20k tokens of words: enough pieces, seconds to tokenize."""
    words = [
        "the",
        "a",
        "model",
        "cache",
        "key",
        "value",
        "layer",
        "token",
        "attention",
        "shares",
        "trains",
        "learns",
        "resumes",
        "every",
        "step",
    ]
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (20_000,), generator=generator).tolist()
    path = folder / "corpus.txt"
    path.write_text(" ".join(words[i] for i in picks))
    return path


def cli_args(text: Path, out_dir: Path, steps: int) -> list[str]:
    return [
        "model.name=tiny_cla", "model.layers=2", "model.hidden=32", "model.heads=2", "model.kv_heads=1",
        "model.kv_sharing=2", f"data.paths=[{text}]", "data.val_every=10", "train.seq_len=32", "train.batch=2",
        f"train.steps={steps}", f"train.save_every={SAVE_EVERY}", "train.eval_every=50", "train.warmup_steps=5",
        "train.device=cpu", "train.progress=false", f"train.out_dir={out_dir}",
    ]  # fmt: skip


def cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "kvbench.train", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted CLI run of a tiny MQA + CLA2 model."""
    folder = tmp_path_factory.mktemp("train")
    done = finish(cli(cli_args(corpus(folder), folder / "reference", STEPS)))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_repeating_steps(reference):
    text, out_dir = reference / "corpus.txt", reference / "killed"
    process = cli(cli_args(text, out_dir, STEPS))
    deadline = time.monotonic() + 300
    # Kill between checkpoints: a checkpoint exists and the log has steps past it (resume must drop them).
    while not (checkpoint.has_checkpoint(out_dir) and len(checkpoint.read_loss_log(out_dir)) > SAVE_EVERY + 1):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_step = torch.load(out_dir / "checkpoint" / "trainer_state.pt", weights_only=True)["step"]
    logged = len(checkpoint.read_loss_log(out_dir))
    assert saved_step < logged < STEPS, (saved_step, logged)
    done = finish(cli(cli_args(text, out_dir, STEPS)))
    assert done.returncode == 0, done.stderr[-3000:]

    def without_time(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]

    resumed, uninterrupted = checkpoint.read_loss_log(out_dir), checkpoint.read_loss_log(reference / "reference")
    assert [row["step"] for row in resumed] == list(range(1, STEPS + 1))
    assert without_time(resumed) == without_time(uninterrupted)
    expected = final_weights(reference / "reference")
    for name, value in final_weights(out_dir).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.slow
def test_checkpoint_loads_through_kvbench_and_generates(reference):
    folder = reference / "reference" / "checkpoint"
    cfg = ModelConfig(name="tiny_cla", source="hf", path=str(folder), device="cpu")
    model, tokenizer = load_model(cfg)
    spec = model_spec(cfg)
    assert (spec.num_layers, spec.num_kv_heads, spec.kv_sharing) == (2, 1, 2)
    prompt = tokenizer("the model cache", add_special_tokens=False).input_ids
    generation = Engine(model, tokenizer, Full(), spec).generate(prompt, 6)
    assert len(generation.token_ids) == 6
    assert (reference / "reference" / "loss.png").is_file()
    saved = json.loads((folder / "config.json").read_text())
    assert saved["kvbench_kv_sharing"] == 2


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.kv_sharing=0", "model.kv_sharing"),
        ("model.kv_sharing=5", "model.kv_sharing"),  # 4 layers
        ("model.kv_heads=3", "model.kv_heads"),  # 4 query heads
        ("train.seq_len=4096", "train.seq_len"),  # 2048 positions
        ("train.steps=0", "train.steps"),
        ("train.batch=0", "train.batch"),
        ("train.precision=fp16", "train.precision"),
        ("model.arch=nope", "model.arch"),
        ("+model.colour=blue", "model.colour"),
        ("train.lr=fast", "train.lr"),
    ],
)
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        build(compose_train(override))
    assert error.value.key == key


def test_presets_build():
    shapes = {name: build(compose_train(f"train_model={name}")).model for name in ("mha", "gqa", "mqa", "mqa_cla2")}
    assert [shapes[n].kv_heads for n in ("mha", "gqa", "mqa")] == [4, 2, 1]
    assert shapes["mqa_cla2"].kv_sharing == 2


def test_corpus_problems_fail_before_training(tmp_path, shared_data):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = build(compose_train(f"train.out_dir={tmp_path / 'out'}", "train.device=cpu"))
    cases = [
        (DataSettings(paths=[str(empty)]), "data.paths"),  # no tokens
        (DataSettings(paths=[str(tmp_path / "missing")]), "data.paths"),
        (DataSettings(paths=[str(shared_data / "wikitext2")]), "data.paths"),  # the evaluation text
    ]
    for data, key in cases:
        with pytest.raises(ConfigError) as error:
            train(replace(base, data=data))
        assert error.value.key == key
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_jsonl_records_may_hold_unicode_line_separators(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"context": "one\u2028two"}, ensure_ascii=False) + "\n" + json.dumps({"context": "x"}))
    assert read_documents(path, "context") == ["one\u2028two", "x"]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    Trainer(toy_config(tmp_path, steps=2), toy_pieces(), TOY_VOCAB).run()
    for changed, key in ((dict(lr=5e-3), "train.lr"), (dict(resume=False), "train.resume")):
        with pytest.raises(ConfigError) as error:
            Trainer(toy_config(tmp_path, steps=2, **changed), toy_pieces(), TOY_VOCAB)
        assert error.value.key == key


def test_cli_bad_input_is_one_line(tmp_path):
    done = finish(cli(["model.kv_sharing=9", f"train.out_dir={tmp_path}"]))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "kvbench: error: model.kv_sharing=9 is not valid: an integer from 1 (no sharing) to model.layers (4)"
    ]

"""WikiText-2 perplexity: one text from both sources, the stream protocol with a full cache equals teacher
forcing, both sliding conventions against hand-computed references, smoke-test labels, data errors early."""

from __future__ import annotations

import math

import pytest
import torch

import kvbench.run as run_module
from kvbench.cache import ModelSpec
from kvbench.config import build
from kvbench.engine import Engine
from kvbench.errors import ConfigError
from kvbench.methods.full import Full
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.tasks.wikitext2 import WikiText2
from tests.conftest import compose_config

SPEC = ModelSpec("model", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, max_positions=4096)


def dense_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def summed_nll(logits: torch.Tensor, targets: list[int]) -> float:
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="sum"))


@pytest.fixture
def hub_rows(monkeypatch, shared_data):
    """Stub `load_dataset` with the hub's test rows: each line of the raw file with its newline, and "" where
    the file has a blank line (a single space). Returns the recorded calls."""
    import datasets

    lines = (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    rows = ["" if line == " \n" else line for line in lines]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or {"text": rows})
    return calls


def test_both_sources_give_the_papers_text(hub_rows, shared_data):
    local = WikiText2(data_dir=str(shared_data / "wikitext2")).text()
    hub = WikiText2()
    assert hub.text() == local
    assert hub_rows == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]
    # "\n\n".join of the hub's 4,358 rows: SOURCE.md's reference copy of that string has 1,307,975 bytes
    # with CRLF line ends, i.e. the LF bytes plus one per newline.
    assert len(local.encode("utf-8")) + local.count("\n") == 1_307_975
    assert local.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert hub.describe()["data_sha256"] == WikiText2(data_dir=str(shared_data / "wikitext2")).describe()["data_sha256"]


def test_a_changed_data_file_is_a_different_run(shared_data, tmp_path):
    raw = (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    (tmp_path / "wiki.test.raw").write_text(raw.replace("film", "flim", 1))  # a corrected typo, say
    original = WikiText2(data_dir=str(shared_data / "wikitext2")).describe()["data_sha256"]
    assert WikiText2(data_dir=str(tmp_path)).describe()["data_sha256"] != original


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    (tmp_path / "wiki.test.raw").write_bytes(b" \n = A = \n \n bad \xff byte\n")
    with pytest.raises(ConfigError, match=r"wiki\.test\.raw line 4 is not UTF-8"):
        WikiText2(data_dir=str(tmp_path)).text()


def test_missing_hub_data_fails_in_one_line_before_the_model_loads(monkeypatch, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = compose_config("model=tiny-llama", "model.device=cpu", "task=wikitext2", f"kvbench.results_dir={tmp_path}")
    with pytest.raises(ConfigError) as caught:
        run_module.run(cfg)
    message = str(caught.value)
    assert caught.value.key == "task.data_dir" and "\n" not in message
    assert "not cached" in message and "task.data_dir=" in message and not any(tmp_path.iterdir())


def test_stream_protocol_with_full_cache_equals_teacher_forcing(tiny, shared_data):
    model, tokenizer, spec = tiny
    task = WikiText2(data_dir=str(shared_data / "wikitext2"), prefix_tokens=96, continuation_tokens=32, limit=2)
    samples = list(task.samples(tokenizer))
    assert len(samples) == 2 and len(samples[0].continuation_ids) == 32
    engine = Engine(model, tokenizer, Full(), spec, prefill_chunk=40)
    rows = [task.score(s, task.evaluate(engine, s)) for s in samples]
    metrics = task.aggregate(rows)

    nll, count = 0.0, 0
    for s in samples:
        logits = dense_logits(model, s.prompt_ids + s.continuation_ids)
        nll += summed_nll(logits[len(s.prompt_ids) - 1 : -1], s.continuation_ids)
        count += len(s.continuation_ids)
    assert math.isclose(metrics["perplexity"], math.exp(nll / count), rel_tol=1e-4)
    assert metrics["scored_tokens"] == 64


def test_eviction_changes_stream_perplexity(tiny, shared_data):
    model, tokenizer, spec = tiny
    task = WikiText2(data_dir=str(shared_data / "wikitext2"), prefix_tokens=96, continuation_tokens=32, limit=1)
    (sample,) = task.samples(tokenizer)
    full = task.evaluate(Engine(model, tokenizer, Full(), spec), sample)
    evicted = task.evaluate(Engine(model, tokenizer, StreamingLLM(budget=16, sinks=4), spec), sample)
    assert full.nll_sum != evicted.nll_sum


@pytest.fixture
def sliding(tiny, shared_data, monkeypatch):
    """(run the sliding protocol with window/stride over 200 tokens -> (metrics, token ids)); the engine's
    own sliding method (being removed) must not be used."""
    monkeypatch.delattr(Engine, "sliding_window_nll", raising=False)
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, Full(), spec)

    def run(window: int, stride: int) -> tuple[dict[str, float], list[int]]:
        task = WikiText2(
            data_dir=str(shared_data / "wikitext2"), protocol="sliding", window=window, stride=stride, max_tokens=200
        )
        (sample,) = task.samples(tokenizer)
        return task.aggregate([task.score(sample, task.evaluate(engine, sample))]), sample.prompt_ids

    return run


def test_overlapping_windows_score_every_token_once_with_the_overlap_as_context(sliding, tiny):
    metrics, ids = sliding(64, 32)
    # The HF guide: windows at 0, 32, 64, ... of 64 tokens; each scores the tokens past the previous end.
    nll = summed_nll(dense_logits(tiny[0], ids[0:64])[:-1], ids[1:64])
    for begin in (32, 64, 96, 128, 160):  # the previous window ended at begin + 32
        end = min(begin + 64, 200)
        nll += summed_nll(dense_logits(tiny[0], ids[begin:end])[31:-1], ids[begin + 32 : end])
    assert metrics["scored_tokens"] == 199  # every token but the first is predicted exactly once
    assert math.isclose(metrics["perplexity"], math.exp(nll / 199), rel_tol=1e-5)


def test_stride_equal_to_window_is_gptq_s_non_overlapping_protocol(sliding, tiny):
    metrics, ids = sliding(64, 64)
    # GPTQ / QuaRot: whole windows of 64 (three in 200 tokens, the last 8 dropped), each scoring its tokens
    # from the 2nd on; perplexity = exp(mean over windows of the window's mean loss x 64 / 64).
    losses = []
    for begin in (0, 64, 128):
        chunk = ids[begin : begin + 64]
        losses.append(summed_nll(dense_logits(tiny[0], chunk)[:-1], chunk[1:]) / 63)
    assert metrics["scored_tokens"] == 3 * 63
    assert math.isclose(metrics["perplexity"], math.exp(sum(loss * 64 for loss in losses) / (3 * 64)), rel_tol=1e-5)


def test_stride_equal_to_window_needs_a_whole_window():
    with pytest.raises(ConfigError) as caught:
        WikiText2(protocol="sliding", window=2048, stride=2048, max_tokens=1000)
    assert caught.value.key == "task.max_tokens"


def test_the_default_limit_is_labelled_a_smoke_test(shared_data, capsys):
    model_free = {"nll_sum": 1.0, "tokens": 256}
    default = build(compose_config("task=wikitext2", f"task.data_dir={shared_data / 'wikitext2'}")).task
    default.check(SPEC, Full())
    warning = capsys.readouterr().err
    assert "smoke test" in warning and "1024 tokens" in warning and "task.limit=0" in warning
    assert default.aggregate([model_free])["smoke_test"] == 1.0
    full = build(compose_config("task=wikitext2_full", f"task.data_dir={shared_data / 'wikitext2'}")).task
    full.check(SPEC, Full())
    assert capsys.readouterr().err == ""
    assert full.limit == 0 and full.aggregate([model_free])["smoke_test"] == 0.0
    sliced = WikiText2(data_dir=str(shared_data / "wikitext2"), protocol="sliding", max_tokens=20000)
    assert sliced.aggregate([model_free])["smoke_test"] == 1.0


def test_gptq_preset():
    task = build(compose_config("task=wikitext2_gptq")).task
    assert (task.protocol, task.window, task.stride, task.max_tokens) == ("sliding", 2048, 2048, 0)
    assert not task.smoke_test()


def test_a_run_scored_without_the_engine_records_no_measurement_rather_than_zeros(
    shared_data, monkeypatch, capsys, tmp_path
):
    """The sliding protocol runs dense forwards outside the engine: its record measured no cache, no decode and
    no memory peak, so those fields are null and the summary says so (it once printed 0.00x compression and
    a 0 B peak)."""
    import json
    import sys

    from kvbench.__main__ import main

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "kvbench", "model=tiny-llama", "model.device=cpu", "kvbench.warmup=false", "method=full", "task=wikitext2",
            f"task.data_dir={shared_data / 'wikitext2'}", "task.protocol=sliding",
            "task.window=64", "task.stride=32", "task.max_tokens=128", f"kvbench.results_dir={tmp_path}",
        ],
    )  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    (path,) = tmp_path.rglob("record.json")
    measured = json.loads(path.read_text())["measurements"]
    assert measured["samples"] == 1
    assert measured["peak_memory_bytes"] is None and measured["compression_ratio"] is None
    printed = capsys.readouterr().out
    assert "0.00x" not in printed and "0.0 B" not in printed
    assert "measurements" in printed and "perplexity" in printed

"""lm-evaluation-harness both ways, on the embedded model and three small local-data tasks (tests/fixtures/lmeval:
multiple choice, generation with two filters, rolling perplexity): with the full cache kvbench's lm-eval model
scores what lm-eval's own `hf` model scores; `task=lmeval` in a kvbench run scores what `--model kvbench` scores,
with the method's cache in effect; the greedy flag; the command line; bad input fails in one line, before a
model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

import kvbench.models
import kvbench.run as run_module
from kvbench.engine import Engine, Measurement
from kvbench.errors import ConfigError
from kvbench.lmeval import KVBenchLM, merged
from kvbench.methods.full import Full
from kvbench.models import ModelConfig, load_model
from kvbench.run import run
from kvbench.tasks.lmeval import task_manager
from tests.conftest import REPO, compose_config

FIXTURES = REPO / "tests" / "fixtures" / "lmeval"
CHOICE, GENERATE, ROLLING = "kvbench_gsm8k_choice", "kvbench_gsm8k_generate", "kvbench_pg19_rolling"
SNAPKV = ["model=smollm2-135m", "model.device=cpu", "method=snapkv", "method.budget=48"]


@pytest.fixture(scope="module")
def task_dir(shared_data, tmp_path_factory) -> Path:
    """The fixture tasks as lm-eval reads them: YAMLs whose data paths point into ../shared/data."""
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    for template in FIXTURES.glob("*.yaml.template"):
        text = template.read_text().replace("SHARED_DATA", str(shared_data))
        (folder / template.name.removesuffix(".template")).write_text(text)
    return folder


def evaluate(model, task_dir: Path, tasks: list[str], **options) -> dict:
    """lm-eval's own evaluator on the fixture tasks, by default the first two documents of each (no stderr
    bootstrap)."""
    manager = task_manager(str(task_dir), False)
    options = {"limit": 2, **options} if "samples" not in options else options
    return simple_evaluate(model, tasks=tasks, task_manager=manager, bootstrap_iters=0, **options)


def printed(results: dict) -> dict[str, dict[str, str]]:
    """Every score as lm-eval's results table prints it (4 decimals)."""
    return {
        task: {key: f"{value:.4f}" for key, value in metrics.items() if "," in key and "_stderr" not in key}
        for task, metrics in results["results"].items()
    }


def responses(results: dict, task: str) -> list:
    """Each document's raw responses (lm-eval logs a document once per filter)."""
    return list({sample["doc_id"]: sample["resps"] for sample in results["samples"][task]}.values())


def test_full_cache_scores_equal_lm_eval_s_own_hf_model(embedded, task_dir):
    model, tokenizer, spec = embedded
    # lm-eval's `hf` gets the same weights in a plain transformers model (SDPA, no kvbench code in its path).
    plain, _ = load_model(ModelConfig(device="cpu"), with_tokenizer=False)
    plain.set_attn_implementation("sdpa")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True))
    engine = Engine(model, tokenizer, Full(), spec)

    def both(max_length: int, tasks: list[str], **options) -> tuple[dict, dict]:
        # kvbench decodes its generations two at a time; `hf` one at a time.
        ours = KVBenchLM(engine, batch_size=2, max_length=max_length)
        hf = HFLM(pretrained=plain, tokenizer=tokenizer, batch_size=1, max_length=max_length)
        return evaluate(ours, task_dir, tasks, **options), evaluate(hf, task_dir, tasks, **options)

    # Short limits make lm-eval's cuts part of what must agree: max_length=32 cuts the choices' contexts and the
    # generation prompts (to 32 - 8 new tokens); 8 splits each text into two rolling windows, the second one's
    # context prefilled.
    ours, theirs = both(32, [CHOICE])
    # Questions 1 and 2 (105 and 181 characters): decoded together longest first, so answers must find their way
    # back to request order.
    generated, generated_hf = both(32, [GENERATE], samples={GENERATE: [1, 2]})
    rolling_ours, rolling_theirs = both(8, [ROLLING])
    assert printed(ours) == printed(theirs) and printed(generated) == printed(generated_hf)
    assert len(printed(ours)[CHOICE]) == 2 and len(printed(generated)[GENERATE]) == 2
    # Word perplexity is in the hundreds on these short texts, so lm-eval prints 7 significant digits of it: fp32
    # does not repeat the 7th between one forward and token-by-token decoding (seen: 781.0178 vs 781.0170); 6 it does.
    rolling, rolling_hf = rolling_ours["results"][ROLLING], rolling_theirs["results"][ROLLING]
    word = "word_perplexity,none"
    assert rolling[word] == pytest.approx(rolling_hf[word], rel=1e-6) and rolling[word] > 100
    del rolling[word], rolling_hf[word]
    assert printed(rolling_ours) == printed(rolling_theirs) and len(printed(rolling_ours)[ROLLING]) == 2
    # Beyond the printed digits: each choice's log-likelihood and greedy flag, each generation, each text.
    for mine, hf in zip(responses(ours, CHOICE), responses(theirs, CHOICE), strict=True):
        assert [r[0][1] for r in mine] == [r[0][1] for r in hf]
        assert [r[0][0] for r in mine] == pytest.approx([r[0][0] for r in hf], abs=1e-3)
    assert responses(generated, GENERATE) == responses(generated_hf, GENERATE)
    assert len({r[0][0] for r in responses(generated, GENERATE)}) == 2  # two different generations
    rolling = [r[0][0] for r in responses(rolling_ours, ROLLING)]
    assert rolling == pytest.approx([r[0][0] for r in responses(rolling_theirs, ROLLING)], abs=1e-3)
    # Each request left its measurement, summarized in lm-eval's results.
    assert ours["config"]["kvbench"]["measurements"]["samples"] == 2 * 3
    assert generated["config"]["kvbench"]["measurements"]["samples"] == 2
    assert generated["config"]["kvbench"]["measurements"]["batch_size_max"] == 2


def test_greedy_flag_says_whether_greedy_decoding_produces_the_continuation(embedded):
    model, tokenizer, spec = embedded
    engine = Engine(model, tokenizer, Full(), spec, prefill_chunk=4)  # several prefill forwards before decode
    lm = KVBenchLM(engine)
    context = tokenizer("The capital of France is")["input_ids"]
    greedy = engine.generate(context, 3).token_ids
    other = (greedy[1] + 1) % len(tokenizer)
    for continuation, expected in [(greedy, True), ([greedy[0], other, *greedy[2:]], False), ([other], False)]:
        ((_, is_greedy),) = lm._loglikelihood_tokens([(None, context, continuation)])
        assert is_greedy is expected, continuation


def test_both_routes_give_the_same_scores_with_the_method_s_cache_in_effect(embedded, task_dir, tmp_path):
    # Route 1: lm-eval's evaluator with the registered `kvbench` model, built from --model_args.
    lm_results = evaluate("kvbench", task_dir, [CHOICE, GENERATE], model_args=",".join(SNAPKV), batch_size=2)
    # Route 2: the same tasks as kvbench runs, two documents per batch.
    records, predictions = {}, {}
    for name in (CHOICE, GENERATE):
        overrides = ["task=lmeval", f"task.name={name}", f"task.include_path={task_dir}", "task.include_defaults=false"]
        settings = ["task.limit=2", "kvbench.batch_size=2", "kvbench.warmup=false", f"kvbench.results_dir={tmp_path}"]
        directory = run(compose_config(*SNAPKV, *overrides, *settings))
        records[name] = json.loads((directory / "record.json").read_text())
        predictions[name] = [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]

    for name in (CHOICE, GENERATE):
        assert records[name]["status"] == "ok", records[name]["error"]
        scores = {k: v for k, v in lm_results["results"][name].items() if "," in k and "_stderr" not in k}
        assert records[name]["metrics"] == scores
        assert [row["responses"] for row in predictions[name]] == json.loads(json.dumps(responses(lm_results, name)))
    assert records[CHOICE]["primary_metric"] == "acc,none" and records[CHOICE]["higher_is_better"] is True
    assert set(records[GENERATE]["metrics"]) == {"exact_match,whole", "exact_match,last-number"}
    # The method acted: SnapKV kept 48 of the first question's ~70 context tokens, measured from its buffers...
    measured = records[CHOICE]["measurements"]
    assert measured["samples"] == 2 and measured["kv_bytes_device"] < measured["dense_kv_bytes"]
    # ...and its first choice scored differently from the full cache's.
    model, tokenizer, spec = embedded
    full = KVBenchLM(Engine(model, tokenizer, Full(), spec))
    context, continuation = lm_results["samples"][CHOICE][0]["arguments"][0]
    ((full_logprob, _),) = full._loglikelihood_tokens([(None, *full._encode_pair(context, continuation))])
    ((snapkv_logprob, _),) = responses(lm_results, CHOICE)[0][0]
    assert abs(full_logprob - snapkv_logprob) > 1e-3


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_model", refuse)
    monkeypatch.setattr(kvbench.models, "load_model", refuse)


def lmeval_error(include_path: Path, results: Path, *overrides: str) -> ConfigError:
    """The error a `task=lmeval` run with `overrides` stops on: one line, before any run directory exists."""
    base = ["task=lmeval", f"task.include_path={include_path}", "task.include_defaults=false", "model.device=cpu"]
    with pytest.raises(ConfigError) as caught:
        run(compose_config(*base, *overrides, f"kvbench.results_dir={results}"))
    assert "\n" not in str(caught.value) and not results.exists()
    return caught.value


def test_a_misspelled_task_name_fails_in_one_line_before_the_model_loads(no_model_loads, task_dir, tmp_path):
    error = lmeval_error(task_dir, tmp_path / "results", "task.name=kvbench_gsm8k_choise")
    assert error.key == "task.name" and "did you mean kvbench_gsm8k_choice" in str(error)
    assert f"`lm-eval ls tasks` --include_path {task_dir}" in str(error)
    missing = lmeval_error(task_dir, tmp_path / "results")
    assert missing.key == "task.name" and missing.value == "???"


def test_groups_and_missing_data_fail_in_one_line_before_the_model_loads(no_model_loads, task_dir, tmp_path):
    for task in task_dir.glob("*.yaml"):
        (tmp_path / task.name).write_text(task.read_text())
    (tmp_path / "group.yaml").write_text(f"group: kvbench_pair\ntask: [{CHOICE}, {ROLLING}]\n")
    broken = (task_dir / "gsm8k_choice.yaml").read_text().replace("gsm8k/test.jsonl", "gsm8k/missing.jsonl")
    (tmp_path / "broken.yaml").write_text(broken.replace(f"task: {CHOICE}", "task: kvbench_missing_data"))
    group = lmeval_error(tmp_path, tmp_path / "results", "task.name=kvbench_pair")
    assert "not a group" in str(group) and CHOICE in str(group)
    data = lmeval_error(tmp_path, tmp_path / "results", "task.name=kvbench_missing_data")
    assert "data" in str(data) and "task.include_path" in str(data)


def test_bad_model_args_fail_in_one_line_before_the_model_loads(no_model_loads):
    with pytest.raises(ConfigError) as caught:
        KVBenchLM.create_from_arg_string("model=smollm2-135m,method=snapkv,method.budget=16")
    assert caught.value.key == "method.budget"
    with pytest.raises(ConfigError) as caught:
        KVBenchLM.create_from_arg_string("method=snapkv,colour=blue")
    assert caught.value.key == "model_args colour" and "max_length" in str(caught.value)
    with pytest.raises(ConfigError) as caught:  # a misspelled config key: Hydra's error, once a long traceback
        KVBenchLM.create_from_arg_string("model=smollm2-135m,method=snapkv,method.budgt=512")
    assert caught.value.key == "model_args" and "method.budgt" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        KVBenchLM.create_from_arg_obj({"method": "full"}, {"batch_size": "auto"})
    assert caught.value.key == "batch_size"


def test_lm_eval_finds_the_model_by_name_and_entry_point():
    assert get_model("kvbench") is KVBenchLM
    assert get_model("hf") is HFLM  # registering kvbench did not hide lm-eval's own models
    (entry,) = [e for e in entry_points(group="lm_eval.models") if e.name == "kvbench"]
    assert entry.load() is KVBenchLM


def test_the_command_line_runs_a_task_and_reports_bad_arguments_in_one_line(task_dir):
    def lm_eval_cli(model_args: str) -> subprocess.CompletedProcess:
        args = ["--model", "kvbench", "--model_args", model_args, "--tasks", CHOICE, "--limit", "1"]
        command = [sys.executable, "-m", "kvbench.lmeval", *args, "--include_path", str(task_dir)]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)

    # No model.device: kvbench's `auto` decides, whatever device lm-eval's command line passes by default.
    ok = lm_eval_cli("model=smollm2-135m,method=streamingllm,method.budget=32")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert CHOICE in ok.stdout and "acc_norm" in ok.stdout
    bad = lm_eval_cli("model=smollm2-135m,method=snapkv,method.budget=16")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("kvbench: error: method.budget=16 is not valid")


def test_merged_work_counts_as_prefilled_if_any_of_its_requests_was():
    """A document's requests merged into one measurement: shared only when none of them was prefilled (the
    run's prefill mean then leaves the document out instead of adding its 0 s)."""
    prefilled, shared = Measurement(prefill_s=2.0), Measurement(prefill_shared=True)
    assert not merged([prefilled, shared]).prefill_shared
    assert merged([shared, shared]).prefill_shared

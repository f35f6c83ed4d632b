"""AIME: the boxed-answer extraction, loading both years, limits against the model, pass@1 over samples."""

from __future__ import annotations

import pytest

from kvbench.cache import ModelSpec
from kvbench.config import build
from kvbench.engine import Engine, Generation, Measurement
from kvbench.errors import ConfigError
from kvbench.methods.full import Full
from kvbench.models import ModelConfig, load_tokenizer
from kvbench.task import Sample
from kvbench.tasks.aime import AIME, extract_answer, last_boxed, to_integer
from tests.conftest import compose_config

SPEC = ModelSpec("long-model", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, max_positions=40000)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def test_last_boxed_handles_nesting_and_takes_the_last():
    assert last_boxed(r"so \boxed{12} then \boxed{\frac{1}{2}} wait, finally \boxed{25}.") == "25"
    assert last_boxed(r"\boxed{\frac{a}{b}}") == r"\frac{a}{b}"
    assert last_boxed(r"$\boxed{m+n = {3}{4}}$") == "m+n = {3}{4}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"answer: \boxed 204$") == "204"  # LaTeX's unbraced single-token argument
    assert last_boxed("the answer is 42") is None
    assert last_boxed(r"\boxed{12") is None  # generation stopped inside the box


def test_integer_comparison():
    assert to_integer("025") == 25
    assert to_integer(r"\text{25}") == 25
    assert to_integer("1,000") == 1000
    assert to_integer("m+n=73") == 73  # the value after the last "="
    assert to_integer(r"45^\circ") == 45
    assert to_integer("25.0") == 25
    assert to_integer(r"\frac{1}{2}") is None and to_integer("x") is None and to_integer(None) is None
    assert extract_answer(r"Thus the answer is $\boxed{073}$.") == 73


@pytest.mark.parametrize(("file", "first_answer"), [("aime24.jsonl", 204), ("aime25.jsonl", 70)])
def test_local_loading(file, first_answer, shared_data, tokenizer):
    task = AIME(data_dir=str(shared_data / "aime"), data_file=file, limit=2)
    task.check(SPEC, Full())
    assert AIME(data_dir=str(shared_data / "aime"), data_file=file).count() == 30
    samples = list(task.samples(tokenizer))
    assert len(samples) == task.count() == 2
    assert samples[0].reference == first_answer and isinstance(samples[1].reference, int)
    text = tokenizer.decode(samples[0].prompt_ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>" in text
    assert samples[0].max_new_tokens == 32768 and samples[0].stop_ids == [tokenizer.eos_token_id]


def test_all_answers_are_integers_in_range(shared_data):
    for file in ("aime24.jsonl", "aime25.jsonl"):
        answers = [p["answer"] for p in AIME(data_dir=str(shared_data / "aime"), data_file=file).problems()]
        assert len(answers) == 30 and all(0 <= a <= 999 for a in answers)


def test_limits_against_the_model(shared_data, tokenizer):
    small = ModelSpec("small", 2, 2, 1, 8, max_positions=8192)
    with pytest.raises(ConfigError) as caught:
        AIME().check(small, Full())  # 32768 new tokens do not fit 8192 positions
    assert caught.value.key == "task.max_new_tokens" and "7680" in str(caught.value)
    fill = AIME(data_dir=str(shared_data / "aime"), data_file="aime25.jsonl", limit=1, max_new_tokens=0)
    fill.check(small, Full())
    (sample,) = fill.samples(tokenizer)
    assert len(sample.prompt_ids) + sample.max_new_tokens == 8192  # 0 = all the positions left


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"temperature": -0.5}, "task.temperature"),
        ({"top_p": 0.0}, "task.top_p"),
        ({"samples_per_problem": 2}, "task.samples_per_problem"),  # greedy repeats would be identical
        ({"samples_per_problem": 0}, "task.samples_per_problem"),
        ({"prompt": "no placeholder"}, "task.prompt"),
        ({"data_dir": "/nonexistent"}, "task.data_dir"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, key):
    with pytest.raises(ConfigError) as caught:
        AIME(**kwargs)
    assert caught.value.key == key


def test_pass_at_1_averages_samples_per_problem():
    task = AIME(samples_per_problem=2, temperature=0.6)
    stop = 2
    cases = [  # (problem, reference, text, last token)
        ("p1", 25, r"\boxed{025}", stop),  # right
        ("p1", 25, r"\boxed{24}", stop),  # wrong
        ("p2", 7, r"\boxed{7}", stop),  # right
        ("p2", 7, "I ran out of tok", 99),  # no box, hit the limit
    ]
    rows = []
    for index, (problem, reference, text, last) in enumerate(cases):
        sample = Sample(f"{problem}#{index}", [1], 100, stop_ids=[stop], reference=reference,
                        meta={"problem_id": problem})  # fmt: skip
        rows.append(task.score(sample, Generation([5] * (index + 1) + [last], text, Measurement())))
    assert [row["correct"] for row in rows] == [1.0, 0.0, 1.0, 0.0]
    metrics = task.aggregate(rows)
    # p1: 1/2, p2: 1/2 -> pass@1 = 50; 3 of 4 boxed; 1 of 4 truncated; lengths 2, 3, 4, 5 tokens
    assert metrics["pass@1"] == 50 and metrics["boxed"] == 75 and metrics["truncated"] == 25
    assert metrics["generated_tokens_mean"] == 3.5 and metrics["generated_tokens_max"] == 5


def test_hub_records_are_normalized(monkeypatch):
    import datasets

    rows = [{"ID": "2024-I-1", "Problem": "What is 1+1?", "Solution": "2", "Answer": 2}]  # Maxwell-Jia/AIME_2024
    seen = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: seen.append((name, split)) or rows)
    (problem,) = AIME().problems()
    assert seen == [("Maxwell-Jia/AIME_2024", "train")]
    assert problem == {"id": "2024-I-1", "problem": "What is 1+1?", "answer": 2}
    rows[:] = [{"problem": "p", "answer": "025", "id": "0"}]  # math-ai/aime25 style, answer as a string
    assert next(AIME(dataset="math-ai/aime25", split="test").problems())["answer"] == 25


def test_yaml_configs_build():
    for name, file in (("aime24", "aime24.jsonl"), ("aime25", "aime25.jsonl")):
        task = build(compose_config(f"task={name}", "model=tiny-llama")).task
        assert isinstance(task, AIME) and task.data_file == file
        assert task.prompt.endswith("within \\boxed{}.")


def test_end_to_end_on_the_tiny_model(tiny, shared_data):
    model, tokenizer, spec = tiny
    task = AIME(data_dir=str(shared_data / "aime"), limit=1, max_new_tokens=6, samples_per_problem=2, temperature=1.0)
    task.check(spec, Full())
    samples = list(task.samples(tokenizer))
    assert [s.id for s in samples] == ["60#0", "60#1"]
    assert samples[0].sampling.seed != samples[1].sampling.seed  # each repeat draws its own tokens
    engine = Engine(model, tokenizer, Full(), spec)
    rows = [task.score(s, task.evaluate(engine, s)) for s in samples]
    again = task.score(samples[0], task.evaluate(engine, samples[0]))
    assert again["prediction"] == rows[0]["prediction"]  # seeded: a rerun repeats exactly
    assert task.aggregate(rows)["pass@1"] in (0.0, 50.0, 100.0)

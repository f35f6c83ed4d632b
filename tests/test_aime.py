"""AIME: the boxed-answer extraction, loading both years, limits against the model, pass@1 over samples."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize(
    "boxed",
    [
        r"\mathbf{33}",
        r"\textbf{33}",
        r"\boldsymbol{33}",
        r"\textbf{\text{33}}",
        r"\displaystyle 33",
        r"\displaystyle \mathbf{33}",
        r"33 \text{ degrees}",
        r"33\,\mathrm{cm}",
        "33 degrees",
        r"33^\circ",
        r"33^{\circ}",
        r"33^\circ \text{C}",
        "33°",
        r"33\%",
        r"\$33",
        r"\dfrac{66}{2}",
        r"\frac{66}{2}",
        r"\tfrac{66}{2}",
        r"\displaystyle\frac{66}{2}",
        r"x = \frac{99}{3}",
        "33.",
        "033",
    ],
)
def test_formatted_integer_answers_are_read(boxed):
    assert extract_answer(rf"so the answer is $\boxed{{{boxed}}}$.") == 33


@pytest.mark.parametrize(
    "boxed",
    [
        r"\frac{1}{2}",
        r"\dfrac{67}{2}",
        r"\frac12",
        r"\frac{66}{0}",
        "33.5",
        r"\mathbf{33.5}",
        "33x",
        "3 x",
        "3 3",
        r"33 \text{ or } 34",
        "33^2",
        r"2\pi",
        r"\sqrt{33}",
    ],
)
def test_non_integer_answers_are_not_accepted(boxed):
    assert extract_answer(rf"\boxed{{{boxed}}}") is None


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
        output = Generation([5] * (index + 1) + [last], text, Measurement(), stopped=last == stop)
        rows.append(task.score(sample, output))
    assert [row["correct"] for row in rows] == [1.0, 0.0, 1.0, 0.0]
    metrics = task.aggregate(rows)
    # p1: 1/2, p2: 1/2 -> pass@1 = 50; 3 of 4 boxed; 1 of 4 truncated; lengths 2, 3, 4, 5 tokens
    assert metrics["pass@1"] == 50 and metrics["boxed"] == 75 and metrics["truncated"] == 25
    assert metrics["generated_tokens_mean"] == 3.5 and metrics["generated_tokens_max"] == 5


def test_a_model_stop_id_is_not_truncation():
    """Llama-3.1 ends turns with 128001/128008 too; the task's stop_ids hold only the tokenizer's EOS."""
    task = AIME()
    sample = Sample("p#0", [1], 100, stop_ids=[128009], reference=7, meta={"problem_id": "p"})
    ended = task.score(sample, Generation([5, 128008], r"\boxed{7}", Measurement(), stopped=True))
    cut = task.score(sample, Generation([5, 6], r"\boxed{7}", Measurement(), stopped=False))
    assert ended["truncated"] == 0.0 and cut["truncated"] == 1.0


def test_a_generation_ended_by_the_model_s_own_stop_id_on_the_engine(tiny):
    model, tokenizer, spec = tiny
    engine = Engine(model, tokenizer, Full(), spec)
    sample = Sample("p#0", list(range(1, 9)), 5, stop_ids=[], reference=7, meta={"problem_id": "p"})
    free = engine.generate(sample.prompt_ids, 5)
    engine.model_stop_ids = {free.token_ids[0]}  # the model's own end id, absent from sample.stop_ids
    row = AIME().score(sample, engine.generate(sample.prompt_ids, 5, stop_ids=sample.stop_ids))
    assert row["generated_tokens"] == 1 and row["truncated"] == 0.0


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


def test_the_data_hash_is_part_of_the_identity(shared_data, tmp_path):
    task = AIME(data_dir=str(shared_data / "aime"), data_file="aime24.jsonl")
    assert task.describe()["data_sha256"].startswith("af2b8bd2aa911b63")  # as SOURCE.md lists it
    lines = (shared_data / "aime" / "aime24.jsonl").read_text(encoding="utf-8").splitlines()
    last = json.loads(lines[-1])
    last["answer"] = str(int(last["answer"]) + 1)  # a corrected answer
    (tmp_path / "aime24.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    fixed = AIME(data_dir=str(tmp_path), data_file="aime24.jsonl")
    assert fixed.describe()["data_sha256"] != task.describe()["data_sha256"]


def test_a_corrupt_line_is_reported_before_the_model_loads(shared_data, tmp_path, monkeypatch):
    import kvbench.run as run_module

    lines = (shared_data / "aime" / "aime25.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "aime25.jsonl").write_text("".join(lines[:2]) + lines[2][:40] + "\n" + "".join(lines[3:]))
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    results = tmp_path / "results"
    cfg = compose_config(
        "model=tiny-llama",
        "model.device=cpu",
        "task=aime25",
        f"task.data_dir={tmp_path}",
        "task.max_new_tokens=1024",
        f"kvbench.results_dir={results}",
    )
    with pytest.raises(ConfigError) as caught:
        run_module.run(cfg)
    assert caught.value.key == "task.data_dir" and f"{tmp_path / 'aime25.jsonl'} line 3 " in str(caught.value)
    assert not results.exists()


def test_a_record_without_an_integer_answer_is_reported(tmp_path):
    (tmp_path / "aime24.jsonl").write_text('{"problem": "p", "answer": 3}\n\n{"problem": "q", "answer": "3.5"}\n')
    with pytest.raises(ConfigError, match=r"aime24\.jsonl line 3 is not a record"):
        AIME(data_dir=str(tmp_path), max_new_tokens=100).check(SPEC, Full())


def test_missing_hub_data_is_one_line_naming_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'math-ai/aime25' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError) as caught:
        AIME(dataset="math-ai/aime25", split="test", data_file="aime25.jsonl").check(SPEC, Full())
    message = str(caught.value)
    assert caught.value.key == "task.data_dir" and "\n" not in message
    assert "not cached" in message and "task.data_dir=" in message and "OfflineModeIsEnabled" in message


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


def test_hub_data_hash_covers_every_row(monkeypatch):
    """The hub rows' hash is part of a run's identity: an edit anywhere in the data makes another run."""
    import datasets

    rows = [{"id": str(i), "problem": f"p{i}", "answer": i} for i in range(3)]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: [dict(row) for row in rows])
    before = AIME().describe()["data_sha256"]
    rows[2]["problem"] = "edited"
    assert AIME().describe()["data_sha256"] != before
    rows[2]["problem"] = "p2"
    assert AIME().describe()["data_sha256"] == before

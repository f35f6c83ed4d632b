"""GSM8K: references, answer extraction (boxed, then the last number), local and hub loading, metrics."""

from __future__ import annotations

import json

import pytest

from kvbench.cache import ModelSpec
from kvbench.config import build
from kvbench.engine import Generation, Measurement
from kvbench.errors import ConfigError
from kvbench.methods.full import Full
from kvbench.models import ModelConfig, load_tokenizer
from kvbench.task import Sample
from kvbench.tasks.gsm8k import GSM8K, extract_answer, reference_answer
from tests.conftest import compose_config

SPEC = ModelSpec("model", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, max_positions=8192)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def test_reference_is_the_integer_after_the_hashes():
    assert reference_answer("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == 18
    assert reference_answer("...\n#### 1,450,000") == 1450000
    assert reference_answer("#### -3") == -3
    assert reference_answer("no final line") is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"So 9 * 2 = 18. The answer is $\boxed{18}$.", (18, "boxed")),
        (r"\boxed{\$1,000}", (1000, "boxed")),
        (r"first \boxed{3}, then corrected: \boxed{18.00}", (18, "boxed")),
        (r"\boxed{18.5}", (None, "boxed")),  # a boxed non-integer is wrong, no fallback
        ("She sells 9 eggs, 9 * 2 = 18, so she makes $18.", (18, "last_number")),
        ("The total is 1,450,000 dollars", (1450000, "last_number")),
        ("It went down to -4.", (-4, "last_number")),
        ("I do not know", (None, None)),
    ],
)
def test_answer_extraction(response, expected):
    assert extract_answer(response) == expected


def test_local_loading_matches_the_shared_copy(shared_data, tokenizer):
    task = GSM8K(data_dir=str(shared_data / "gsm8k"), limit=3)
    task.check(SPEC, Full())
    assert GSM8K(data_dir=str(shared_data / "gsm8k")).count() == 1319
    samples = list(task.samples(tokenizer))
    assert [s.reference for s in samples] == [18, 3, 70000] and samples[0].id == "0"
    text = tokenizer.decode(samples[0].prompt_ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "Janet" in text and "put your final answer within \\boxed{}.<|im_end|>" in text
    assert samples[0].max_new_tokens == 512 and samples[0].stop_ids == [tokenizer.eos_token_id]
    assert len(task.describe()["data_sha256"]) == 64


def test_hub_rows_are_loaded_with_the_subset(monkeypatch):
    import datasets

    rows = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]
    seen = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, subset, split: seen.append((name, subset, split)) or rows
    )
    assert GSM8K().records() == [{"id": "0", "question": "1+1?", "answer": 2}]
    assert seen == [("openai/gsm8k", "main", "test")]


def test_accuracy_boxed_and_truncated():
    task = GSM8K()
    stop = 2
    cases = [  # (reference, text, last token)
        (18, r"\boxed{18}", stop),  # right, boxed
        (18, "so the answer is 18", stop),  # right, from the last number
        (7, r"\boxed{8}", stop),  # wrong
        (7, "and then 7 + 1 = 8 and", 99),  # wrong (last number 8), hit the limit
    ]
    rows = []
    for index, (reference, text, last) in enumerate(cases):
        sample = Sample(str(index), [1], 100, stop_ids=[stop], reference=reference)
        rows.append(task.score(sample, Generation([5] * index + [last], text, Measurement(), stopped=last == stop)))
    assert [row["correct"] for row in rows] == [1.0, 1.0, 0.0, 0.0]
    metrics = task.aggregate(rows)
    assert metrics["accuracy"] == 50 and metrics["boxed"] == 50 and metrics["truncated"] == 25
    assert metrics["generated_tokens_mean"] == 2.5 and metrics["generated_tokens_max"] == 4


def test_corrupt_or_missing_data_fails_before_the_model(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 4"}) + "\n{oops\n")
    with pytest.raises(ConfigError) as caught:
        GSM8K(data_dir=str(tmp_path)).check(SPEC, Full())
    assert caught.value.key == "task.data_dir" and "line 2" in str(caught.value)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "no hashes"}) + "\n")
    with pytest.raises(ConfigError) as caught:
        GSM8K(data_dir=str(tmp_path)).check(SPEC, Full())
    assert "line 1" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        GSM8K(data_dir=str(tmp_path / "nowhere"))
    assert caught.value.key == "task.data_dir"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["task.max_new_tokens=0"], "task.max_new_tokens"),
        (["task.prompt=no placeholder"], "task.prompt"),
        (["task.limit=-1"], "task.limit"),
    ],
)
def test_bad_settings_fail_at_construction(overrides, key):
    with pytest.raises(ConfigError) as caught:
        build(compose_config("task=gsm8k", *overrides))
    assert caught.value.key == key


def test_generation_limit_must_fit_the_model():
    with pytest.raises(ConfigError) as caught:
        GSM8K(max_new_tokens=8000).check(SPEC, Full())
    assert caught.value.key == "task.max_new_tokens" and "7680" in str(caught.value)

"""LongBench v1/E and v2: official prompts and budgets, truncation, the two-phase split, loading, scoring."""

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
from kvbench.tasks import longbench as lb
from kvbench.tasks import longbench_v2 as v2
from tests.conftest import compose_config

SPEC = ModelSpec("test-model", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, max_positions=8192)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())  # the embedded SmolLM2's (has a chat template, adds no BOS)


@pytest.fixture(scope="module")
def longbench_dir(shared_data):
    return shared_data / "longbench"


def generation(text: str, tokens: int = 3) -> Generation:
    return Generation(list(range(tokens)), text, Measurement())


# ----- official configuration -----
def test_templates_and_budgets_equal_the_official_config(longbench_dir):
    prompts = json.loads((longbench_dir / "config" / "dataset2prompt.json").read_text(encoding="utf-8"))
    budgets = json.loads((longbench_dir / "config" / "dataset2maxlen.json").read_text(encoding="utf-8"))
    assert list(prompts) == list(lb.TASKS)  # all 21, in the official order
    for name, template in prompts.items():
        assert lb.TEMPLATES[name] == template, name
    assert budgets == lb.MAX_NEW_TOKENS


def test_task_lists():
    assert len(lb.TASKS) == 21 and len(lb.E_TASKS) == 13 and set(lb.E_TASKS) <= set(lb.TASKS)
    assert sorted(sum(lb.CATEGORIES.values(), ())) == sorted(lb.TASKS)
    assert set(lb.NO_CHAT_TASKS) == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    for template in lb.TEMPLATES.values():  # the two-phase split point exists, the question comes after
        head, tail = template.split("{context}")
        assert "{input}" not in head and tail


# ----- validation before any model loads -----
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"variant": "x"}, "task.variant"),
        ({"subtasks": ["nope"]}, "task.subtasks"),
        ({"variant": "e", "subtasks": ["narrativeqa"]}, "task.subtasks"),  # not in LongBench-E
        ({"subtasks": ["trec", "trec"]}, "task.subtasks"),
        ({"max_length": 10}, "task.max_length"),
        ({"subtasks": ["qasper"], "data_dir": "/nonexistent"}, "task.data_dir"),
        ({"limit": -1}, "task.limit"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, key):
    with pytest.raises(ConfigError) as caught:
        lb.LongBench(**kwargs)
    assert caught.value.key == key


def test_check_validates_max_length_against_the_model():
    task = lb.LongBench(subtasks=["gov_report"], max_length=7800)  # 7800 + 512 > 8192
    with pytest.raises(ConfigError) as caught:
        task.check(SPEC, Full())
    assert caught.value.key == "task.max_length" and "7680" in str(caught.value)
    lb.LongBench(subtasks=["hotpotqa"], max_length=7800).check(SPEC, Full())  # 7800 + 32 fits


def test_yaml_configs_build_and_bad_overrides_fail_before_loading(tmp_path):
    for name in ("longbench", "longbench_e", "longbench_v2"):
        config = build(compose_config(f"task={name}", "model=tiny-llama"))
        assert type(config.task).__name__ in ("LongBench", "LongBenchV2")
    e = build(compose_config("task=longbench_e", "model=tiny-llama")).task
    assert e.variant == "e" and e.task_names() == list(lb.E_TASKS)
    with pytest.raises(ConfigError):
        build(compose_config("task=longbench", "task.subtasks=[bogus]"))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["task=longbench", "task.max_length=5000"], "task.max_length"),  # tiny-llama has 4096 positions
        (["task=longbench_v2", "task.max_length=4000"], "task.max_length"),  # 4000 + 128 > 4096
        (["task=aime24"], "task.max_new_tokens"),  # 32768 > 4096
    ],
)
def test_runner_rejects_what_does_not_fit_before_loading(overrides, key, tmp_path, monkeypatch):
    import kvbench.run as run_module

    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = compose_config("model=tiny-llama", "model.device=cpu", f"kvbench.results_dir={tmp_path}", *overrides)
    with pytest.raises(ConfigError) as caught:
        run_module.run(cfg)
    assert caught.value.key == key and not any(tmp_path.iterdir())


# ----- samples on the local data -----
def test_local_loading_with_limit_and_count(tokenizer, longbench_dir):
    task = lb.LongBench(subtasks=["multi_news", "passage_retrieval_zh"], data_dir=str(longbench_dir), limit=2)
    task.check(SPEC, Full())
    assert task.count() == 4
    assert lb.LongBench(subtasks=["multi_news"], data_dir=str(longbench_dir)).count() == 200
    samples = list(task.samples(tokenizer))
    assert [s.id for s in samples] == [
        "multi_news-0000",
        "multi_news-0001",
        "passage_retrieval_zh-0000",
        "passage_retrieval_zh-0001",
    ]
    assert [s.max_new_tokens for s in samples] == [512, 512, 32, 32]
    assert samples[0].stop_ids == [tokenizer.eos_token_id]
    assert samples[2].reference["answers"] == ["段落27"]
    for sample in samples:  # every prompt fits the model with its answer
        assert len(sample.prompt_ids) + sample.max_new_tokens <= SPEC.max_positions
    assert task.describe()["subtasks"] == ["multi_news", "passage_retrieval_zh"]


def test_prompt_is_the_official_template_in_the_chat_template(tokenizer, longbench_dir):
    task = lb.LongBench(subtasks=["multi_news"], data_dir=str(longbench_dir), limit=1)
    task.check(SPEC, Full())
    (sample,) = task.samples(tokenizer)
    record = next(lb.read_jsonl(longbench_dir / "data" / "multi_news.jsonl"))
    official = lb.TEMPLATES["multi_news"].format(context=record["context"], input=record["input"])
    messages = [{"role": "user", "content": official}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert sample.meta["truncated_tokens"] == 0
    assert tokenizer.decode(sample.prompt_ids) == expected
    raw = lb.LongBench(subtasks=["multi_news"], data_dir=str(longbench_dir), limit=1, chat_template=False)
    raw.check(SPEC, Full())
    (plain,) = raw.samples(tokenizer)
    assert tokenizer.decode(plain.prompt_ids) == official


def test_few_shot_and_code_tasks_skip_the_chat_template(tokenizer):
    task = lb.LongBench(subtasks=["trec", "hotpotqa"], max_length=4000)
    record = {"context": "Question: Who? Type: Human\n", "input": "Question: Where?\nType:", "answers": ["x"]}
    trec = tokenizer.decode(task.encode(tokenizer, "trec", record).prompt_ids)
    hotpot = tokenizer.decode(task.encode(tokenizer, "hotpotqa", record).prompt_ids)
    assert trec == lb.TEMPLATES["trec"].format(**record)
    assert hotpot.startswith("<|im_start|>system") and hotpot.endswith("<|im_start|>assistant\n")


def test_middle_truncation_keeps_the_first_and_last_halves(tokenizer, longbench_dir):
    full = lb.LongBench(subtasks=["multi_news"], data_dir=str(longbench_dir), limit=1, chat_template=False)
    full.check(SPEC, Full())
    (whole,) = full.samples(tokenizer)
    cut = lb.LongBench(
        subtasks=["multi_news"], data_dir=str(longbench_dir), limit=1, chat_template=False, max_length=1001
    )
    cut.check(SPEC, Full())
    (short,) = cut.samples(tokenizer)
    # 1001 tokens kept: the first 500 and the last 501 of the untruncated prompt
    assert len(short.prompt_ids) == 1001
    assert short.prompt_ids == whole.prompt_ids[:500] + whole.prompt_ids[-501:]
    assert short.meta["truncated_tokens"] == len(whole.prompt_ids) - 1001
    # the pure functions: 10 tokens of context + 3 of question into 6 -> first 3 and last 3
    assert lb.middle_truncate(list(range(10)), [10, 11, 12], 6) == ([0, 1, 2], [10, 11, 12])
    assert lb.middle_truncate(list(range(10)), [10, 11, 12], 4) == ([0, 1], [11, 12])


def test_default_budget_fills_the_model_with_the_chat_template(tokenizer, longbench_dir):
    small = ModelSpec("small", 2, 2, 1, 8, max_positions=2048)
    task = lb.LongBench(subtasks=["passage_retrieval_zh"], data_dir=str(longbench_dir), limit=1)
    task.check(small, Full())
    (sample,) = task.samples(tokenizer)
    assert len(sample.prompt_ids) + sample.max_new_tokens == 2048  # the prompt was long: exactly full
    assert sample.meta["truncated_tokens"] > 0


def test_samples_need_the_model_or_a_max_length(tokenizer, longbench_dir):
    task = lb.LongBench(subtasks=["multi_news"], data_dir=str(longbench_dir), limit=1)
    with pytest.raises(ConfigError):
        next(task.samples(tokenizer))


def test_two_phase_moves_the_text_after_the_context_to_question_ids(tokenizer, longbench_dir):
    for max_length in (0, 1200):
        kwargs = dict(subtasks=["passage_retrieval_zh"], data_dir=str(longbench_dir), limit=1, max_length=max_length)
        one, two = lb.LongBench(**kwargs), lb.LongBench(**kwargs, two_phase=True)
        one.check(SPEC, Full())
        two.check(SPEC, Full())
        (a,), (b,) = one.samples(tokenizer), two.samples(tokenizer)
        assert not a.question_ids and b.question_ids
        assert b.prompt_ids + b.question_ids == a.prompt_ids  # the same tokens, split
        question = tokenizer.decode(b.question_ids)
        assert question.startswith("\n\n下面是一个摘要") and question.endswith("<|im_start|>assistant\n")
        assert "下面是一个摘要" not in tokenizer.decode(b.prompt_ids[-64:])


def test_score_and_aggregate():
    task = lb.LongBench(variant="e", subtasks=["trec", "passage_count"])
    rows = []
    cases = [  # (task, prediction, answers, classes, length) -> score
        ("trec", "Location\nmore", ["Location"], ["Location", "Number"], 1000),  # 100
        ("trec", "Number", ["Location"], ["Location", "Number"], 5000),  # 0
        ("passage_count", "3", ["3"], None, 9000),  # 100
        ("passage_count", "3 or 4", ["3"], None, 9500),  # 50
    ]
    for index, (name, text, answers, classes, length) in enumerate(cases):
        sample = Sample(
            f"{name}-{index}",
            [1],
            8,
            reference={"answers": answers, "all_classes": classes},
            meta={"subtask": name, "length": length},
        )
        rows.append(task.score(sample, generation(text)))
    assert [row["score"] for row in rows] == [100, 0, 100, 50]
    metrics = task.aggregate(rows)
    # per task: trec (100 + 0)/2 = 50, passage_count (100 + 50)/2 = 75; average 62.5
    assert metrics["trec"] == 50 and metrics["passage_count"] == 75 and metrics["average"] == 62.5
    assert metrics["avg_few_shot"] == 50 and metrics["avg_synthetic"] == 75
    # buckets: trec 0-4k 100, 4-8k 0; passage_count 8k+ 75
    assert metrics["trec@0-4k"] == 100 and metrics["trec@4-8k"] == 0 and metrics["passage_count@8k+"] == 75
    assert metrics["average@0-4k"] == 100 and metrics["average@8k+"] == 75
    assert lb.LongBench.primary_metric == "average"


# ----- end to end on the tiny random model (fast): the runner's calls in order -----
def test_end_to_end_two_phase_on_the_tiny_model(tiny, longbench_dir):
    model, tokenizer, spec = tiny
    task = lb.LongBench(
        subtasks=["multi_news"], data_dir=str(longbench_dir), limit=1, max_length=256, max_new_tokens=4, two_phase=True
    )
    task.check(spec, Full())
    engine = Engine(model, tokenizer, Full(), spec)
    rows = [task.score(s, task.evaluate(engine, s)) for s in task.samples(tokenizer)]
    assert [row["subtask"] for row in rows] == ["multi_news"] and rows[0]["question_tokens"] == 24
    assert 0 <= rows[0]["score"] <= 100 and rows[0]["generated_tokens"] <= 4
    metrics = task.aggregate(rows)
    assert metrics["average"] == metrics["multi_news"] == metrics["avg_summarization"] == rows[0]["score"]


def test_hub_path_reads_the_official_zip(tmp_path, monkeypatch, longbench_dir):
    import zipfile

    import huggingface_hub

    archive = tmp_path / "data.zip"  # the layout of the hub's data.zip: data/<task>.jsonl
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(longbench_dir / "data" / "multi_news.jsonl", "data/multi_news.jsonl")
    asked = []

    def download(repo_id, filename, repo_type):
        asked.append((repo_id, filename, repo_type))
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    task = lb.LongBench(subtasks=["multi_news"], limit=3)
    assert task.count() == 3  # the official size is known: no download
    records = list(task.records("multi_news"))
    assert asked == [("THUDM/LongBench", "data.zip", "dataset")]
    local = list(lb.read_jsonl(longbench_dir / "data" / "multi_news.jsonl", limit=3))
    assert records == local
    with pytest.raises(ConfigError):
        list(lb.LongBench(subtasks=["qasper"]).records("qasper"))  # not in that zip


# ----- LongBench v2 -----
def test_v2_answer_extraction():
    assert v2.extract_answer("The correct answer is (B)") == "B"
    assert v2.extract_answer("**The correct answer is (C)**.") == "C"  # asterisks removed first
    assert v2.extract_answer("The correct answer is D, because ...") == "D"  # the bare-letter fallback
    assert v2.extract_answer("I think (A) is right") is None
    assert v2.extract_answer("the correct answer is (A)") is None  # case-sensitive, as officially
    # the first occurrence wins
    assert v2.extract_answer("The correct answer is (A). The correct answer is (B)") == "A"


def test_v2_prompt_truncation_and_filters(tokenizer, shared_data):
    folder = shared_data / "longbench_v2_short"
    task = v2.LongBenchV2(data_dir=str(folder), limit=2, max_length=2000, difficulties=["easy"])
    task.check(SPEC, Full())
    assert task.count() == 2
    samples = list(task.samples(tokenizer))
    assert [s.meta["difficulty"] for s in samples] == ["easy", "easy"]
    record = next(r for r in v2.read_jsonl(folder / "data_short.jsonl") if r["_id"] == samples[0].id)
    text = tokenizer.decode(samples[0].prompt_ids)
    assert text.startswith("<|im_start|>system") and "<text>\n" in text
    tail = text.split("</text>\n\n")[1]
    assert tail.startswith(f"What is the correct answer to this question: {record['question'].strip()}\n")
    assert f"(D) {record['choice_D'].strip()}\n\nFormat your response as follows:" in tail
    assert samples[0].meta["input_tokens"] - samples[0].meta["truncated_tokens"] == 2000
    assert samples[0].max_new_tokens == 128
    assert v2.LongBenchV2(data_dir=str(folder), lengths=["short"]).count() == 180


def test_v2_bad_settings_fail_at_construction():
    for kwargs, key in [
        ({"difficulties": ["medium"]}, "task.difficulties"),
        ({"lengths": ["tiny"]}, "task.lengths"),
        ({"data_dir": "/nonexistent"}, "task.data_dir"),
        ({"max_new_tokens": 0}, "task.max_new_tokens"),
    ]:
        with pytest.raises(ConfigError) as caught:
            v2.LongBenchV2(**kwargs)
        assert caught.value.key == key
    with pytest.raises(ConfigError) as caught:
        v2.LongBenchV2(cot=True).check(ModelSpec("m", 1, 1, 1, 8, max_positions=1024), Full())
    assert caught.value.key == "task.cot_max_new_tokens"


def test_v2_hub_path_uses_datasets(monkeypatch, shared_data):
    import datasets

    records = list(v2.read_jsonl(shared_data / "longbench_v2_short" / "data_short.jsonl", limit=3))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: records if split == "train" else None)
    task = v2.LongBenchV2(limit=2)
    assert [r["_id"] for r in task.records()] == [r["_id"] for r in records[:2]] and task.count() == 2


def test_v2_score_and_aggregate():
    task = v2.LongBenchV2()
    cases = [("easy", "short", "A", "The correct answer is (A)"), ("hard", "short", "B", "The correct answer is (C)"),
             ("hard", "long", "C", "no idea"), ("hard", "medium", "D", "The correct answer is D")]  # fmt: skip
    rows = []
    for index, (difficulty, length, answer, text) in enumerate(cases):
        sample = Sample(
            str(index), [1], 8, reference={"answer": answer}, meta={"difficulty": difficulty, "length": length}
        )
        rows.append(task.score(sample, generation(text)))
    assert [row["pred"] for row in rows] == ["A", "C", None, "D"]
    metrics = task.aggregate(rows)
    # 2 of 4 right; easy 1/1, hard 1/3; short 1/2, medium 1/1, long 0/1; 1 of 4 unparsed
    assert metrics["accuracy"] == 50 and metrics["accuracy_easy"] == 100
    assert metrics["accuracy_hard"] == pytest.approx(100 / 3)
    assert metrics["accuracy_short"] == 50 and metrics["accuracy_medium"] == 100 and metrics["accuracy_long"] == 0
    assert metrics["unparsed"] == 25


def test_v2_cot_runs_two_passes(tiny, shared_data):
    model, tokenizer, spec = tiny
    task = v2.LongBenchV2(
        data_dir=str(shared_data / "longbench_v2_short"), limit=1, cot=True, max_length=200, cot_max_new_tokens=3,
        max_new_tokens=2,
    )  # fmt: skip
    task.check(spec, Full())
    (sample,) = task.samples(tokenizer)
    assert sample.max_new_tokens == 3
    output = task.evaluate(Engine(model, tokenizer, Full(), spec), sample)
    assert isinstance(output, v2.CotGeneration) and len(output.token_ids) <= 3 and output.answer_tokens <= 2
    row = task.score(sample, output)
    assert "reasoning" in row and row["correct"] in (0.0, 1.0)


def test_samsum_stops_at_a_newline_but_never_first(tokenizer, longbench_dir, tmp_path):
    record = {"context": "Dialogue: A: hi\nSummary: A greets.\n\n", "input": "B: bye", "answers": ["B leaves."],
              "all_classes": None, "length": 9, "_id": "x"}  # fmt: skip
    (tmp_path / "samsum.jsonl").write_text(json.dumps(record) + "\n")
    (sample,) = lb.LongBench(subtasks=["samsum"], data_dir=str(tmp_path), max_length=512).samples(tokenizer)
    assert tokenizer.decode([sample.stop_ids[-1]]) == "\n" and sample.min_new_tokens == 1
    (other,) = lb.LongBench(subtasks=["multi_news"], data_dir=str(longbench_dir), limit=1, max_length=512).samples(
        tokenizer
    )
    assert other.min_new_tokens == 0 and other.stop_ids == lb.stop_ids(tokenizer)

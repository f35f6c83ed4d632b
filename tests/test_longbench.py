"""LongBench v1/E and v2: official prompts and budgets, truncation, the two-phase split, loading, scoring."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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


def write_tasks(folder: Path, names: list[str], suffix: str = "") -> Path:
    """Two small records per task in the official layout (`<task><suffix>.jsonl`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        records = [
            {"context": f"Passage {i} of {name}.", "input": f"Question {i}?", "answers": ["x"], "length": 1000 * i,
             "all_classes": None, "_id": f"{name}-{i}"}
            for i in range(2)
        ]  # fmt: skip
        (folder / f"{name}{suffix}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


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
    assert len(lb.EN_TASKS) == 16 and len(lb.ZH_TASKS) == 5 and sorted(lb.EN_TASKS + lb.ZH_TASKS) == sorted(lb.TASKS)
    for language, members in (("en", lb.EN_TASKS), ("zh", lb.ZH_TASKS)):  # six categories, code in both
        listed = sum(lb.LEADERBOARD[language].values(), ())
        assert len(lb.LEADERBOARD[language]) == 6 and sorted(listed) == sorted({*members, "lcc", "repobench-p"})
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


def test_check_validates_max_length_against_the_model(tmp_path):
    data = str(write_tasks(tmp_path, ["gov_report", "hotpotqa"]))
    task = lb.LongBench(subtasks=["gov_report"], max_length=7800, data_dir=data)  # 7800 + 512 > 8192
    with pytest.raises(ConfigError) as caught:
        task.check(SPEC, Full())
    assert caught.value.key == "task.max_length" and "7680" in str(caught.value)
    lb.LongBench(subtasks=["hotpotqa"], max_length=7800, data_dir=data).check(SPEC, Full())  # 7800 + 32 fits


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
    described = task.describe()
    assert described["subtasks"] == ["multi_news", "passage_retrieval_zh"] and described["max_length"] == 7500
    # the fingerprint is each file's sha256: multi_news's equals the one ../shared/data/longbench/SOURCE.md lists
    assert described["data_sha256"]["multi_news.jsonl"].startswith("f8817c00af317c2d")
    assert described["data_sha256"]["passage_retrieval_zh.jsonl"].startswith("d71c1f71f9fee4c2")


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


def spec_with(positions: int) -> ModelSpec:
    return ModelSpec(f"m{positions}", 2, 2, 1, 8, max_positions=positions)


@pytest.mark.parametrize(
    ("positions", "subtasks", "expected"),
    [
        (4096, [], 3500),  # the official 4k length: 3500 + 512 (gov_report's budget) fits 4096
        (8192, [], 7500),
        (16384, [], 15500),
        (32768, [], 31500),
        (131072, [], 31500),  # v1 has no longer official length
        (12000, [], 7500),  # in between: the largest that fits
        (4000, ["hotpotqa"], 3500),  # 3500 + 32 fits 4000 ...
        (4000, [], None),  # ... 3500 + 512 does not: no official length fits -> an explicit one is asked for
    ],
)
def test_default_max_length_is_the_official_one_for_the_model(positions, subtasks, expected, tmp_path):
    data = str(write_tasks(tmp_path, subtasks or list(lb.TASKS)))
    task = lb.LongBench(subtasks=subtasks, data_dir=data)
    if expected is None:
        with pytest.raises(ConfigError) as caught:
            task.check(spec_with(positions), Full())
        assert caught.value.key == "task.max_length" and "at most 3488" in str(caught.value)
        return
    task.check(spec_with(positions), Full())
    assert task.describe()["max_length"] == expected


@pytest.mark.parametrize(
    ("positions", "cot", "expected"),
    [(131072, False, 120_000), (131072, True, 120_000), (128000, True, 120_000), (262144, False, 200_000),
     (32768, False, 31500), (8192, False, 7500), (120_100, False, 31500)],
)  # fmt: skip
def test_v2_default_max_length_is_the_official_one_for_the_model(positions, cot, expected, tmp_path):
    folder = tmp_path / "v2"
    folder.mkdir()
    (folder / "data.json").write_text(json.dumps([V2_RECORD]))
    task = v2.LongBenchV2(data_dir=str(folder), cot=cot)
    task.check(spec_with(positions), Full())
    assert task.describe()["max_length"] == expected


def test_explicit_max_length_is_kept_and_the_resolved_one_is_in_the_run_identity(tmp_path, longbench_dir):
    import kvbench.run as run_module
    from kvbench.models import model_spec

    def identity(*overrides: str) -> dict:
        config = build(compose_config("task=longbench", "model=tiny-llama", *overrides))
        config.task.check(model_spec(config.model), config.method)
        return run_module.identity(config)["task"]

    data = (f"task.data_dir={longbench_dir}", "task.subtasks=[multi_news]")
    assert identity(*data)["max_length"] == 3500  # tiny-llama has 4096 positions
    assert identity(*data, "task.max_length=2048")["max_length"] == 2048
    # the default and its explicit value are the same run
    assert identity(*data) == identity(*data, "task.max_length=3500")


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


def scored_rows(task: lb.LongBench, cases: list[tuple]) -> list[dict]:
    """Rows of `task.score` for (task, prediction, answers, classes, length) cases."""
    rows = []
    for index, (name, text, answers, classes, length) in enumerate(cases):
        reference = {"answers": answers, "all_classes": classes}
        sample = Sample(f"{name}-{index}", [1], 8, reference=reference, meta={"subtask": name, "length": length})
        rows.append(task.score(sample, generation(text)))
    return rows


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
    # per task: trec (100 + 0)/2 = 50, passage_count (100 + 50)/2 = 75; English average 62.5
    assert metrics["trec"] == 50 and metrics["passage_count"] == 75 and metrics["average_en"] == 62.5
    assert metrics["en/few_shot"] == 50 and metrics["en/synthetic"] == 75 and metrics["en/leaderboard_avg"] == 62.5
    assert not any(key.startswith(("zh", "average_zh")) for key in metrics)  # no Chinese task ran
    # buckets: trec 0-4k 100, 4-8k 0; passage_count 8k+ 75
    assert metrics["trec@0-4k"] == 100 and metrics["trec@4-8k"] == 0 and metrics["passage_count@8k+"] == 75
    assert metrics["average_en@0-4k"] == 100 and metrics["average_en@8k+"] == 75
    assert task.primary_metric == lb.LongBench.primary_metric == "average_en"


def test_averages_keep_the_languages_apart():
    task = lb.LongBench(subtasks=["hotpotqa", "musique", "lcc", "dureader", "multifieldqa_zh"])
    rows = scored_rows(task, [  # (task, prediction, answers, classes, length) -> score
        ("hotpotqa", "Paris", ["Paris"], None, 0),  # 100
        ("musique", "Lyon", ["Paris"], None, 0),  # 0
        ("lcc", "abcd", ["abce"], None, 0),  # 75
        ("dureader", "北京", ["北京"], None, 0),  # 100 (less the rouge package's 1e-8 guard)
        ("multifieldqa_zh", "上海", ["北京"], None, 0),  # 0
    ])  # fmt: skip
    metrics = task.aggregate(rows)
    # English: hotpotqa 100, musique 0, lcc 75 -> average_en = 175/3; the Chinese tasks stay out of it
    assert metrics["average_en"] == pytest.approx(175 / 3) and metrics["average_zh"] == pytest.approx(50)
    # English categories: multi-doc QA (100 + 0)/2 = 50, code 75 -> leaderboard Avg 62.5
    assert metrics["en/multi_doc_qa"] == 50 and metrics["en/code"] == 75 and metrics["en/leaderboard_avg"] == 62.5
    # Chinese: multi-doc QA is dureader alone (100), single-doc QA 0, code (shared) 75 -> Avg 175/3
    assert metrics["zh/multi_doc_qa"] == pytest.approx(100) and metrics["zh/single_doc_qa"] == 0
    assert metrics["zh/code"] == 75
    assert metrics["zh/leaderboard_avg"] == pytest.approx(175 / 3)
    assert "average" not in metrics and task.primary_metric == "average_en"
    assert lb.LongBench(subtasks=["dureader"]).primary_metric == "average_zh"  # no English task ran


def test_leaderboard_avg_reproduces_the_official_readme():
    """GPT-3.5-Turbo-16k's per-task scores from LongBench/README.md give its leaderboard rows: English Avg 44.0
    (single-doc 39.8, multi-doc 38.7, summarization 26.5, few-shot 67.1, code 54.1, synthetic 37.8) and Chinese
    Avg 44.5 (61.2, 28.7, 16.0, 29.2, 54.1, 77.5). The README rounds unrounded scores, hence the 0.1 tolerance."""
    scores = {
        "narrativeqa": 23.6, "qasper": 43.3, "multifieldqa_en": 52.3, "multifieldqa_zh": 61.2, "hotpotqa": 51.6,
        "2wikimqa": 37.7, "musique": 26.9, "dureader": 28.7, "gov_report": 29.5, "qmsum": 23.4, "multi_news": 26.7,
        "vcsum": 16.0, "trec": 68.0, "triviaqa": 91.4, "samsum": 41.7, "lsht": 29.2, "passage_count": 4.5,
        "passage_retrieval_en": 71.0, "passage_retrieval_zh": 77.5, "lcc": 54.7, "repobench-p": 53.6,
    }  # fmt: skip
    metrics = lb.LongBench().aggregate([{"subtask": name, "score": score} for name, score in scores.items()])
    official = {
        "en": {"single_doc_qa": 39.8, "multi_doc_qa": 38.7, "summarization": 26.5, "few_shot": 67.1, "code": 54.1,
               "synthetic": 37.8, "leaderboard_avg": 44.0},
        "zh": {"single_doc_qa": 61.2, "multi_doc_qa": 28.7, "summarization": 16.0, "few_shot": 29.2, "code": 54.1,
               "synthetic": 77.5, "leaderboard_avg": 44.5},
    }  # fmt: skip
    for language, values in official.items():
        for key, value in values.items():
            assert metrics[f"{language}/{key}"] == pytest.approx(value, abs=0.1), (language, key)
    # the papers' "Avg.": the plain mean of the 16 English task scores
    assert metrics["average_en"] == pytest.approx(sum(scores[name] for name in lb.EN_TASKS) / 16)


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
    assert metrics["average_en"] == metrics["multi_news"] == metrics["en/summarization"] == rows[0]["score"]


def test_hub_path_reads_the_official_zip(tmp_path, monkeypatch, longbench_dir):
    import zipfile

    import huggingface_hub

    archive = tmp_path / "data.zip"  # the layout of the hub's data.zip: data/<task>.jsonl
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(longbench_dir / "data" / "multi_news.jsonl", "data/multi_news.jsonl")
    asked = []

    def download(repo_id, filename, repo_type, local_files_only=False):
        asked.append((repo_id, filename, repo_type, local_files_only))
        return str(archive)  # as if cached

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    task = lb.LongBench(subtasks=["multi_news"], limit=3)
    task.check(SPEC, Full())
    assert task.count() == 3
    records = list(task.records("multi_news"))
    assert asked == [("THUDM/LongBench", "data.zip", "dataset", True)]  # the cache was asked, once
    local = list(lb.read_jsonl(longbench_dir / "data" / "multi_news.jsonl", limit=3))
    assert records == local
    # the member's sha256 is the local file's: the same data gives the same fingerprint
    local_task = lb.LongBench(subtasks=["multi_news"], data_dir=str(longbench_dir))
    local_task.check(SPEC, Full())
    assert task.describe()["data_sha256"] == local_task.describe()["data_sha256"]
    with pytest.raises(ConfigError) as caught:
        lb.LongBench(subtasks=["qasper"]).check(SPEC, Full())  # not in that zip
    assert caught.value.key == "task.dataset"


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


def test_v2_hub_path_reads_the_official_data_json(monkeypatch, shared_data, tmp_path):
    import huggingface_hub

    records = list(v2.read_jsonl(shared_data / "longbench_v2_short" / "data_short.jsonl", limit=3))
    (tmp_path / "data.json").write_text(json.dumps(records))
    asked = []

    def download(repo_id, filename, repo_type, local_files_only=False):
        asked.append((repo_id, filename))
        return str(tmp_path / "data.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    task = v2.LongBenchV2(limit=2)
    task.check(SPEC, Full())
    assert [r["_id"] for r in task.records()] == [r["_id"] for r in records[:2]] and task.count() == 2
    assert asked == [("THUDM/LongBench-v2", "data.json")]
    expected = hashlib.sha256((tmp_path / "data.json").read_bytes()).hexdigest()
    assert task.describe()["data_sha256"] == {"data.json": expected}


V2_RECORD = {"_id": "q1", "domain": "d", "sub_domain": "s", "difficulty": "easy", "length": "short",
             "question": "Which?", "choice_A": "a", "choice_B": "b", "choice_C": "c", "choice_D": "d", "answer": "A",
             "context": "A document."}  # fmt: skip


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
    assert metrics["unparsed"] == 25 and metrics["empty_outputs"] == 0


def test_v2_empty_outputs_are_dropped_as_officially_or_scored_as_wrong():
    cases = [("A", "The correct answer is (A)"), ("B", ""), ("C", "The correct answer is (D)"), ("D", "")]
    samples = [Sample(str(i), [1], 8, reference={"answer": answer}, meta={}) for i, (answer, _) in enumerate(cases)]
    for drop, accuracy in ((True, 50), (False, 25)):
        task = v2.LongBenchV2(drop_empty_outputs=drop)
        rows = [task.score(sample, generation(text)) for sample, (_, text) in zip(samples, cases, strict=True)]
        assert [row["empty_output"] for row in rows] == [False, True, False, True]
        metrics = task.aggregate(rows)
        # dropped: 1 right of the 2 with an output -> 50; kept: 1 right of 4 -> 25; half the outputs are empty
        assert metrics["accuracy"] == accuracy and metrics["empty_outputs"] == 50
    assert v2.LongBenchV2().drop_empty_outputs  # the official default
    # only an output that is exactly empty counts (the official `output == ''`), not whitespace
    assert not v2.LongBenchV2().score(samples[0], generation(" \n"))["empty_output"]


class ScriptedEngine:
    """An engine stand-in that answers `generate` with the given texts in turn."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer, self.texts, self.calls = tokenizer, list(texts), 0

    def generate(self, prompt_ids, max_new_tokens, question_ids=(), stop_ids=(), *rest) -> Generation:
        self.calls += 1
        return generation(self.texts.pop(0), tokens=2)


def test_v2_cot_records_the_reasoning_and_skips_the_answer_after_an_empty_one(tokenizer):
    task = v2.LongBenchV2(cot=True, max_length=512)
    sample = Sample("q1", [1, 2], 8, reference=V2_RECORD, meta={})
    engine = ScriptedEngine(tokenizer, [" Step one. ", "The correct answer is (A)"])
    row = task.score(sample, task.evaluate(engine, sample))
    assert engine.calls == 2 and row["reasoning"] == "Step one." and row["correct"] == 1.0
    assert row["answer_tokens"] == 2 and not row["empty_output"]
    # an empty reasoning ends the question, as officially (no answer pass); it is then dropped
    engine = ScriptedEngine(tokenizer, [""])
    row = task.score(sample, task.evaluate(engine, sample))
    assert engine.calls == 1 and row["empty_output"] and task.aggregate([row])["empty_outputs"] == 100


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

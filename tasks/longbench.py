"""LongBench (v1) and LongBench-E: 21 long-context tasks with the official prompts, budgets and metrics.

Protocol (after `LongBench/pred.py` and `eval.py` of THUDM/LongBench; see docs/tasks.md):
- Prompt: the official per-task template (`TEMPLATES`, equal to `config/dataset2prompt.json`), filled with
  the record's `context` and `input`.
- Budget: the official new-token budget per task (`MAX_NEW_TOKENS`, = `config/dataset2maxlen.json`).
- Truncation: when the prompt is longer than `max_length` tokens, keep its first `max_length // 2` and last
  `max_length - max_length // 2` tokens (the middle of the context goes). `max_length` counts the prompt's
  own tokens, not the chat template around it, as officially. Default: the model's positions minus the
  task's budget minus the chat template's tokens, so every sample fits.
- Chat template: used when `chat_template=true` and the tokenizer has one, except for trec, triviaqa,
  samsum, lsht, lcc and repobench-p (few-shot and code completion), which the official code feeds raw.
- Decoding: greedy (the engine's), until EOS or the budget. Post-processing and metrics: `longbench_metrics`.
- Two-phase (`two_phase=true`, ArkVale's protocol): everything after the template's `{context}` (the
  instruction, the question, and the chat template's closing tokens) goes to `Sample.question_ids`, which
  the engine feeds through decode after the compressed context. Tokens are identical in both protocols.
- `variant=e`: LongBench-E, the 13 tasks with `_e` files; scores are also split by the record's `length`
  (words, or characters for Chinese) into 0-4k, 4-8k and 8k+.

Data: `data_dir` is a folder with the official `<task>.jsonl` files (directly or under `data/`); empty loads
the official `data.zip` of the `dataset` hub repo (THUDM/LongBench). `datasets>=4` cannot run that repo's
loading script, so the zip is fetched with `huggingface_hub` and read directly: the same files.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvbench.cache import ModelSpec
from kvbench.engine import Generation
from kvbench.errors import ConfigError, require
from kvbench.method import Method
from kvbench.task import Sample, Task, mean
from kvbench.tasks.longbench_metrics import TASK_METRIC, score_prediction

_MULTI_DOC_QA = (
    "Answer the question based on the given passages. Only give me the answer and do not "
    "output any other words.\n\n"
    "The following are given passages.\n"
    "{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not "
    "output any other words.\n\n"
    "Question: {input}\n"
    "Answer:"
)

# The official prompt of each task (config/dataset2prompt.json, typos included), in the official order.
TEMPLATES: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\n"
        "Story: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be "
        'answered based on the information in the article, write "unanswerable". If the question '
        'is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any '
        "explanation.\n\n"
        "Article: {context}\n\n"
        " Answer the question based on the above article as concisely as you can, using a single "
        "phrase or sentence if possible. If the question cannot be answered based on the "
        'information in the article, write "unanswerable". If the question is a yes/no question, '
        'answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\n'
        "Question: {input}\n\n"
        "Answer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n"
        "{context}\n\n"
        "Now, answer the following question based on the above text, only give me the answer and "
        "do not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n"
        "{context}\n\n"
        "现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n"
        "问题：{input}\n"
        "回答："
    ),
    "hotpotqa": _MULTI_DOC_QA,
    "2wikimqa": _MULTI_DOC_QA,
    "musique": _MULTI_DOC_QA,
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n"
        "{context}\n\n"
        "Now, write a one-page summary of the report.\n\n"
        "Summary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\n"
        "Transcript:\n"
        "{context}\n\n"
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\n"
        "Answer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\n"
        "News:\n"
        "{context}\n\n"
        "Now, write a one-page summary of all the news.\n\n"
        "Summary:"
    ),
    "vcsum": ("下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结："),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output "
        "any other words. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "lsht": ("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there are "
        "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
        "total?\n\n"
        "{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output "
        "format should only contain the number, such as 1, 2, 3, and so on.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n"
        "{context}\n\n"
        "The following is an abstract.\n\n"
        "{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer format "
        'must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n"
        "{context}\n\n"
        "下面是一个摘要\n\n"
        "{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n'
        "答案是："
    ),
    "lcc": ("Please complete the code given below. \n{context}Next line of code:\n"),
    "repobench-p": ("Please complete the code given below. \n{context}{input}Next line of code:\n"),
}

# Official new-token budget per task (config/dataset2maxlen.json).
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

CATEGORIES: dict[str, tuple[str, ...]] = {
    "single_doc_qa": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi_doc_qa": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few_shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}

TASKS: tuple[str, ...] = tuple(TEMPLATES)
E_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip
# "Chat models are better off without" the chat template on these (official pred.py).
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# Samples per task in the official v1 test files (for count() without reading the hub zip).
OFFICIAL_COUNTS: dict[str, int] = {name: 200 for name in TASKS} | {
    "multifieldqa_en": 150,
    "lcc": 500,
    "repobench-p": 500,
}
E_BUCKETS: tuple[tuple[str, int], ...] = (("0-4k", 4000), ("4-8k", 8000), ("8k+", 2**62))
VARIANTS = ("v1", "e")
MIN_MAX_LENGTH = 32  # below this the kept head and tail are too short to hold an instruction


# ----- prompt encoding shared by the long-context tasks -----
_MARKER = "\u2063KVBENCH-CONTENT\u2063"  # a string no chat template or prompt contains


def chat_wrapper(tokenizer) -> tuple[str, str] | None:
    """The chat template's text before and after a single user message (None if there is no template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARKER}], add_generation_prompt=True, tokenize=False
    )
    if rendered.count(_MARKER) != 1:  # a template that rewrites the content cannot be split
        raise ConfigError("task.chat_template", True, "false for this tokenizer (its template alters text)")
    before, after = rendered.split(_MARKER)
    return before, after


@dataclass
class EncodedPrompt:
    """`prompt_ids` then `question_ids` is the model's input; `question_ids` is empty in one phase."""

    prompt_ids: list[int]
    question_ids: list[int]
    input_tokens: int  # the prompt's own tokens before truncation (no chat template)
    dropped_tokens: int  # removed from the middle by truncation
    wrapper_tokens: int  # chat template or special tokens around the prompt


def tokenize_regions(
    tokenizer, before: str, context: str, question: str, after: str, special: bool
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Tokenize `before + context + question + after` once and split the ids back into those four parts.

    One tokenization of the whole text (as the official code does) keeps the tokens the same wherever the
    split falls; a token belongs to the part where it starts. Tokens the tokenizer adds itself (BOS/EOS,
    empty offsets) join `before`/`after`. Slow tokenizers (no offsets) tokenize the parts one by one.
    """
    if getattr(tokenizer, "is_fast", False):
        text = before + context + question + after
        encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]
        context_start, question_start = len(before), len(before) + len(context)
        after_start = question_start + len(question)
        lead = 0
        while lead < len(ids) and offsets[lead][1] <= context_start:
            lead += 1
        end = len(ids)
        while end > lead and (offsets[end - 1][0] >= after_start or offsets[end - 1] == (0, 0)):
            end -= 1
        split = lead
        while split < end and offsets[split][0] < question_start:
            split += 1
        return ids[:lead], ids[lead:split], ids[split:end], ids[end:]
    parts = [tokenizer(part, add_special_tokens=False)["input_ids"] for part in (before, context, question, after)]
    if special:
        added = tokenizer("", add_special_tokens=True)["input_ids"]
        parts[0] = [token for token in added if token == tokenizer.bos_token_id] + parts[0]
        parts[3] = parts[3] + [token for token in added if token != tokenizer.bos_token_id]
    return parts[0], parts[1], parts[2], parts[3]


def middle_truncate(context: list[int], question: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the first `max_length // 2` and the last `max_length - max_length // 2` tokens of
    `context + question`, and say which of the kept tokens came from each part."""
    total = len(context) + len(question)
    if max_length <= 0 or total <= max_length:
        return context, question
    head, tail = max_length // 2, max_length - max_length // 2
    joined = context + question
    kept = list(range(head)) + list(range(total - tail, total))
    return [joined[i] for i in kept if i < len(context)], [joined[i] for i in kept if i >= len(context)]


def encode_prompt(
    tokenizer,
    context_part: str,
    question_part: str,
    *,
    use_chat: bool,
    two_phase: bool,
    max_length: int = 0,
    max_total: int = 0,
) -> EncodedPrompt:
    """Token ids for a prompt made of a context part and a question part, wrapped in the chat template
    when `use_chat`, and middle-truncated to at most `max_length` prompt tokens (the template's tokens
    not counted, as officially) and at most `max_total` tokens with them (0 = no such limit)."""
    wrapper = chat_wrapper(tokenizer) if use_chat else None
    before, after = wrapper or ("", "")
    # The chat template's text carries its own special tokens; a raw prompt gets the tokenizer's (BOS).
    pre, context, question, post = tokenize_regions(
        tokenizer, before, context_part, question_part, after, special=wrapper is None
    )
    wrapper_tokens = len(pre) + len(post)
    limits = [max_length] if max_length else []
    if max_total:
        limits.append(max_total - wrapper_tokens)
    if limits and min(limits) < 2:
        raise ConfigError("task.max_length", min(limits), f"room for the prompt ({wrapper_tokens} chat tokens)")
    input_tokens = len(context) + len(question)
    context, question = middle_truncate(context, question, min(limits) if limits else 0)
    dropped = input_tokens - len(context) - len(question)
    if two_phase:
        return EncodedPrompt(pre + context, question + post, input_tokens, dropped, wrapper_tokens)
    return EncodedPrompt(pre + context + question + post, [], input_tokens, dropped, wrapper_tokens)


def encode_to_fit(
    tokenizer,
    context_part: str,
    question_part: str,
    *,
    use_chat: bool,
    two_phase: bool,
    max_length: int,
    positions: int | None,
    answer_tokens: int,
    what: str = "",
) -> EncodedPrompt:
    """`encode_prompt` under the model's limit: by default the prompt gets what the answer leaves of the
    model's `positions` (known once `check()` ran); an explicit `max_length` plus the chat template must
    still fit with the answer."""
    if not max_length and positions is None:
        raise ConfigError("task.max_length", 0, "a token budget (or call check(model, method) first to read the model)")
    encoded = encode_prompt(
        tokenizer,
        context_part,
        question_part,
        use_chat=use_chat,
        two_phase=two_phase,
        max_length=max_length,
        max_total=0 if max_length else positions - answer_tokens,
    )
    if positions is not None:
        total = len(encoded.prompt_ids) + len(encoded.question_ids) + answer_tokens
        require(
            total <= positions,
            "task.max_length",
            max_length,
            f"at most {positions - answer_tokens - encoded.wrapper_tokens}{what} "
            f"(the chat template adds {encoded.wrapper_tokens} tokens, the answer {answer_tokens})",
        )
    return encoded


def stop_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def newline_id(tokenizer) -> int:
    """The token of "\n" as the official code finds it (last id of the encoded newline)."""
    return tokenizer.encode("\n", add_special_tokens=False)[-1]


def parse_jsonl(lines: Iterable[str], limit: int = 0) -> Iterator[dict[str, Any]]:
    """Records of JSON lines (blank lines skipped), at most `limit` of them (0 = all), parsed lazily."""
    produced = 0
    for line in lines:
        if not line.strip():
            continue
        if limit and produced >= limit:
            return
        yield json.loads(line)
        produced += 1


def read_jsonl(path: Path, limit: int = 0) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        yield from parse_jsonl(handle, limit)


@dataclass
class LongBench(Task):
    """`variant`: v1 (21 tasks) or e (LongBench-E, 13 tasks, scores by length bucket).
    `subtasks`: which tasks (empty = every task of the variant); `limit`: samples per task (0 = all).
    `max_length`: prompt tokens kept by middle truncation (0 = as many as fit the model).
    `max_new_tokens`: 0 = the official budget of each task. `data_dir`: local `<task>.jsonl` files."""

    variant: str = "v1"
    subtasks: list[str] = field(default_factory=list)
    data_dir: str = ""
    dataset: str = "THUDM/LongBench"
    max_length: int = 0
    max_new_tokens: int = 0
    chat_template: bool = True
    two_phase: bool = False

    primary_metric: ClassVar[str] = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.subtasks = list(self.subtasks)
        require(self.variant in VARIANTS, "task.variant", self.variant, f"one of {VARIANTS}")
        allowed = E_TASKS if self.variant == "e" else TASKS
        for name in self.subtasks:
            require(name in allowed, "task.subtasks", name, f"tasks of variant {self.variant}: {allowed}")
        require(len(set(self.subtasks)) == len(self.subtasks), "task.subtasks", self.subtasks, "no repeats")
        require(
            self.max_length == 0 or self.max_length >= MIN_MAX_LENGTH,
            "task.max_length",
            self.max_length,
            f"0 (fit the model) or at least {MIN_MAX_LENGTH} tokens",
        )
        require(self.max_new_tokens >= 0, "task.max_new_tokens", self.max_new_tokens, "0 (official) or >= 1")
        if self.data_dir:
            for name in self.task_names():
                require(
                    self._local_file(name) is not None,
                    "task.data_dir",
                    self.data_dir,
                    f"a folder holding {self.file_name(name)}.jsonl (or data/{self.file_name(name)}.jsonl)",
                )
        self._positions: int | None = None

    # ----- what runs -----
    def task_names(self) -> list[str]:
        return self.subtasks or list(E_TASKS if self.variant == "e" else TASKS)

    def file_name(self, name: str) -> str:
        return f"{name}_e" if self.variant == "e" else name

    def budget(self, name: str) -> int:
        return self.max_new_tokens or MAX_NEW_TOKENS[name]

    def check(self, model: ModelSpec, method: Method) -> None:
        self._positions = model.max_positions
        for name in self.task_names():
            budget = self.budget(name)
            if self.max_length:
                require(
                    self.max_length + budget <= model.max_positions,
                    "task.max_length",
                    self.max_length,
                    f"at most {model.max_positions - budget} tokens for {name} ({model.name} has "
                    f"{model.max_positions} positions, {budget} go to the answer)",
                )
            else:
                require(
                    model.max_positions - budget >= 2 * MIN_MAX_LENGTH,
                    "task.max_new_tokens",
                    budget,
                    f"well under {model.name}'s {model.max_positions} positions",
                )

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["subtasks"] = self.task_names()
        described["max_new_tokens_per_task"] = {name: self.budget(name) for name in self.task_names()}
        return described

    # ----- data -----
    def _local_file(self, name: str) -> Path | None:
        folder, file = Path(self.data_dir), f"{self.file_name(name)}.jsonl"
        for path in (folder / file, folder / "data" / file):
            if path.is_file():
                return path
        return None

    def records(self, name: str) -> Iterator[dict[str, Any]]:
        if self.data_dir:
            path = self._local_file(name)
            assert path is not None  # checked in __post_init__
            yield from read_jsonl(path, self.limit)
            return
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(self.dataset, "data.zip", repo_type="dataset")
        member = f"{self.file_name(name)}.jsonl"
        with zipfile.ZipFile(archive) as zipped:
            names = [item for item in zipped.namelist() if item == member or item.endswith("/" + member)]
            if not names:
                raise ConfigError("task.dataset", self.dataset, f"a hub dataset whose data.zip holds {member}")
            with zipped.open(names[0]) as handle:
                yield from parse_jsonl(io.TextIOWrapper(handle, encoding="utf-8"), self.limit)

    def count(self) -> int | None:
        total = 0
        for name in self.task_names():
            path = self._local_file(name) if self.data_dir else None
            if path is not None:
                available = sum(1 for _ in read_jsonl(path))
            elif self.variant == "v1":
                available = OFFICIAL_COUNTS[name]
            else:
                return None  # LongBench-E's sizes are not listed here; the hub zip would have to be read
            total += min(available, self.limit) if self.limit else available
        return total

    # ----- samples -----
    def prompt_parts(self, name: str, record: dict[str, Any]) -> tuple[str, str]:
        """The filled template cut right after `{context}`: (context part, question part)."""
        template = TEMPLATES[name]
        head, tail = template.split("{context}")
        return head + record["context"], tail.replace("{input}", record["input"])

    def encode(self, tokenizer, name: str, record: dict[str, Any]) -> EncodedPrompt:
        context_part, question_part = self.prompt_parts(name, record)
        return encode_to_fit(
            tokenizer,
            context_part,
            question_part,
            use_chat=self.chat_template and name not in NO_CHAT_TASKS,
            two_phase=self.two_phase,
            max_length=self.max_length,
            positions=self._positions,
            answer_tokens=self.budget(name),
            what=f" for {name}",
        )

    def samples(self, tokenizer) -> Iterator[Sample]:
        stops = stop_ids(tokenizer)
        for name in self.task_names():
            for index, record in enumerate(self.records(name)):
                encoded = self.encode(tokenizer, name, record)
                meta = {
                    "subtask": name,
                    "record_id": record.get("_id", ""),
                    "length": record.get("length"),
                    "prompt_tokens": len(encoded.prompt_ids) + len(encoded.question_ids),
                    "question_tokens": len(encoded.question_ids),
                    "input_tokens": encoded.input_tokens,
                    "truncated_tokens": encoded.dropped_tokens,
                }
                reference = {"answers": list(record["answers"]), "all_classes": record.get("all_classes")}
                # Official samsum decoding: stop at a newline too, but never on the first new token.
                newline = name == "samsum"
                yield Sample(
                    f"{self.file_name(name)}-{index:04d}",
                    encoded.prompt_ids,
                    self.budget(name),
                    question_ids=encoded.question_ids,
                    stop_ids=[*stops, newline_id(tokenizer)] if newline else stops,
                    min_new_tokens=1 if newline else 0,
                    reference=reference,
                    meta=meta,
                )

    # ----- scores -----
    def score(self, sample: Sample, output: Generation) -> dict[str, Any]:
        name = sample.meta["subtask"]
        answers, classes = sample.reference["answers"], sample.reference["all_classes"]
        return {
            "id": sample.id,
            **sample.meta,
            "metric": TASK_METRIC[name],
            "answers": answers,
            "prediction": output.text,
            "generated_tokens": len(output.token_ids),
            "score": 100 * score_prediction(name, output.text, answers, classes),
        }

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Per task: mean score (x100). `average`: the mean over tasks; categories likewise.
        LongBench-E adds `<task>@<bucket>` and `average@<bucket>` for the length buckets."""
        per_task = {
            name: mean([row["score"] for row in rows if row["subtask"] == name])
            for name in TASKS
            if any(row["subtask"] == name for row in rows)
        }
        metrics: dict[str, float] = dict(per_task)
        metrics["average"] = mean(list(per_task.values()))
        for category, members in CATEGORIES.items():
            present = [per_task[name] for name in members if name in per_task]
            if present:
                metrics[f"avg_{category}"] = mean(present)
        if self.variant == "e":
            for bucket, _ in E_BUCKETS:
                bucket_scores = []
                for name in per_task:
                    cell = [row["score"] for row in rows if row["subtask"] == name and bucket_of(row) == bucket]
                    if cell:
                        metrics[f"{name}@{bucket}"] = mean(cell)
                        bucket_scores.append(metrics[f"{name}@{bucket}"])
                if bucket_scores:
                    metrics[f"average@{bucket}"] = mean(bucket_scores)
        return metrics


def bucket_of(row: dict[str, Any]) -> str:
    """LongBench-E's length bucket of a record (its `length`: words, or characters for Chinese)."""
    return next(name for name, upper in E_BUCKETS if row["length"] < upper)

"""LongBench (v1) and LongBench-E: 21 long-context tasks with the official prompts, budgets and metrics.

Protocol (after `LongBench/pred.py` and `eval.py` of THUDM/LongBench; see docs/tasks.md):
- Prompt: the official per-task template (`TEMPLATES`, equal to `config/dataset2prompt.json`), filled with
  the record's `context` and `input`.
- Budget: the official new-token budget per task (`MAX_NEW_TOKENS`, = `config/dataset2maxlen.json`).
- Truncation: when the prompt is longer than `max_length` tokens, keep its first `max_length // 2` and last
  `max_length - max_length // 2` tokens (the middle of the context goes). `max_length` counts the prompt's
  own tokens, not the chat template around it, as officially. Default (`max_length=0`): the official length
  for the model's context (`V1_MAX_LENGTHS`: 3,500 / 7,500 / 15,500 / 31,500 for 4k / 8k / 16k / 32k
  models), i.e. the largest of them that leaves the longest answer room within the model's positions.
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
loading script, so the zip is fetched with `huggingface_hub` (read from its cache when there) and read
directly: the same files. `check()` reads every file the run uses before the model loads: a line that is not
a JSON record with the needed fields is reported with its file and line number, and each file's sha256 goes
into `describe()` (the run's identity), so a corrected file makes a new run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
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

TASKS: tuple[str, ...] = tuple(TEMPLATES)
E_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip
# "Chat models are better off without" the chat template on these (official pred.py).
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# The 5 Chinese tasks; the other 16 (14 English, 2 code) are the "English" set KV-compression papers average.
ZH_TASKS: tuple[str, ...] = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
EN_TASKS: tuple[str, ...] = tuple(name for name in TASKS if name not in ZH_TASKS)
# The official leaderboard's six categories per language (LongBench/README.md): each language's Avg is the mean
# of its six category means, and code completion (lcc, repobench-p) counts in both languages.
LEADERBOARD: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "single_doc_qa": ("narrativeqa", "qasper", "multifieldqa_en"),
        "multi_doc_qa": ("hotpotqa", "2wikimqa", "musique"),
        "summarization": ("gov_report", "qmsum", "multi_news"),
        "few_shot": ("trec", "triviaqa", "samsum"),
        "synthetic": ("passage_count", "passage_retrieval_en"),
        "code": ("lcc", "repobench-p"),
    },
    "zh": {
        "single_doc_qa": ("multifieldqa_zh",),
        "multi_doc_qa": ("dureader",),
        "summarization": ("vcsum",),
        "few_shot": ("lsht",),
        "synthetic": ("passage_retrieval_zh",),
        "code": ("lcc", "repobench-p"),
    },
}
# Official prompt lengths (tokens kept by middle truncation) of LongBench/config/model2maxlen.json: 3,500 for
# 4k-context models, 7,500 for 8k, 15,500 for 16k, 31,500 for 32k. `resolve_max_length` picks among them.
V1_MAX_LENGTHS: tuple[int, ...] = (3500, 7500, 15500, 31500)
REQUIRED_FIELDS: tuple[str, ...] = ("context", "input", "answers")
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


def encode_message(tokenizer, text: str, chat_template: bool) -> list[int]:
    """Token ids of `text` as one user message in the chat template (if asked and there is one), else as
    plain text with the tokenizer's special tokens."""
    wrapper = chat_wrapper(tokenizer) if chat_template else None
    if wrapper:
        return tokenizer(wrapper[0] + text + wrapper[1], add_special_tokens=False)["input_ids"]
    return tokenizer(text, add_special_tokens=True)["input_ids"]


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
    tokenizer, context_part: str, question_part: str, *, use_chat: bool, two_phase: bool, max_length: int = 0
) -> EncodedPrompt:
    """Token ids for a prompt made of a context part and a question part, wrapped in the chat template
    when `use_chat`, and middle-truncated to at most `max_length` prompt tokens (0 = no limit); the
    template's tokens are not counted, as officially."""
    wrapper = chat_wrapper(tokenizer) if use_chat else None
    before, after = wrapper or ("", "")
    # The chat template's text carries its own special tokens; a raw prompt gets the tokenizer's (BOS).
    pre, context, question, post = tokenize_regions(
        tokenizer, before, context_part, question_part, after, special=wrapper is None
    )
    input_tokens = len(context) + len(question)
    context, question = middle_truncate(context, question, max_length)
    dropped = input_tokens - len(context) - len(question)
    wrapper_tokens = len(pre) + len(post)
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
    """`encode_prompt` truncated to `max_length` (the task's value as resolved by `check()`); once the model's
    `positions` are known, the prompt with its chat template must leave room for the answer."""
    require(max_length > 0, "task.max_length", max_length, "resolved: call check(model, method) first")
    encoded = encode_prompt(
        tokenizer, context_part, question_part, use_chat=use_chat, two_phase=two_phase, max_length=max_length
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


def resolve_max_length(max_length: int, lengths: Sequence[int], model: ModelSpec, answer_tokens: int) -> int:
    """The prompt length truncation uses: `max_length` if given (it must leave the answer room), else the
    largest official length that does (the official tables pick by context window: 3,500 for 4k models
    ...). Raises the one-line error when neither fits."""
    room = model.max_positions - answer_tokens
    why = f"{model.name} has {model.max_positions} positions, {answer_tokens} go to the answer"
    if max_length:
        require(max_length <= room, "task.max_length", max_length, f"at most {room} tokens ({why})")
        return max_length
    official = max((length for length in lengths if length <= room), default=None)
    require(
        official is not None,
        "task.max_length",
        0,
        f"an explicit value of at most {room}: no official length {list(lengths)} fits ({why})",
    )
    return official


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


# ----- data checks before the model loads, and the data's fingerprint for the run's identity -----
def check_record(record: Any, required: Sequence[str]) -> None:
    """Raise ValueError unless `record` is a JSON object with the `required` fields."""
    if not isinstance(record, dict):
        raise ValueError(f"a JSON object, not {type(record).__name__}")
    missing = [key for key in required if key not in record]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")


def scan_jsonl(
    lines: Iterable[bytes], required: Sequence[str], keep: Callable[[dict[str, Any]], bool] = lambda _: True
) -> tuple[int, str]:
    """(records that `keep` accepts, sha256 of the bytes) of a JSON-lines file, every line checked;
    ValueError names the first bad line (1-based, as editors count)."""
    digest, count = hashlib.sha256(), 0
    for number, line in enumerate(lines, 1):
        digest.update(line)
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            check_record(record, required)
        except UnicodeDecodeError:
            raise ValueError(f"line {number} is not UTF-8") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"line {number} is not JSON ({error.msg} at column {error.colno})") from None
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
        count += keep(record)
    return count, digest.hexdigest()


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off: HF_HUB_OFFLINE (read when huggingface_hub is imported)
    or `datasets`' own HF_DATASETS_OFFLINE."""
    from huggingface_hub import constants

    datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or datasets_offline


def hub_unreachable(url: str) -> str | None:
    """None when the hub answers one HEAD request for `url` (any status), else the error's name. One try on
    the hub client's own session (its proxies, endpoint): a download retries connection errors five times,
    about 25 s, before failing."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(url, timeout=10)
    except Exception as error:  # the transport's error types differ between huggingface_hub versions
        return type(error).__name__
    return None


def hub_file(repo: str, filename: str, local_form: str) -> Path:
    """A file of the hub dataset `repo`: from the Hugging Face cache when it is there (no network), else
    downloaded. When neither works (offline, hub unreachable, no such file), one ConfigError line says how to
    pass local files (`local_form`), before the model loads, instead of the hub client's retries and traceback."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", local_files_only=True))
    except EntryNotFoundError:  # LocalEntryNotFoundError: not cached
        pass
    advice = f"pass task.data_dir=<a folder with {local_form}>"
    if hub_offline():
        raise ConfigError("task.data_dir", "", f"{repo}/{filename} is not cached and the hub is offline; {advice}")
    problem = hub_unreachable(hf_hub_url(repo, filename, repo_type="dataset"))
    if problem:
        raise ConfigError(
            "task.data_dir", "", f"{repo}/{filename} is not cached and the hub is unreachable ({problem}); {advice}"
        )
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except (EntryNotFoundError, OSError) as error:  # no such repo or file, or the connection broke
        reason = f"{repo}/{filename} is not cached and cannot be downloaded ({type(error).__name__})"
        raise ConfigError("task.data_dir", "", f"{reason}; {advice}") from None


@dataclass
class LongBench(Task):
    """`variant`: v1 (21 tasks) or e (LongBench-E, 13 tasks, scores by length bucket).
    `subtasks`: which tasks (empty = every task of the variant); `limit`: samples per task (0 = all).
    `max_length`: prompt tokens kept by middle truncation (0 = the official length for the model, resolved by
    `check()`). `max_new_tokens`: 0 = the official budget of each task. `data_dir`: local `<task>.jsonl` files."""

    variant: str = "v1"
    subtasks: list[str] = field(default_factory=list)
    data_dir: str = ""
    dataset: str = "THUDM/LongBench"
    max_length: int = 0
    max_new_tokens: int = 0
    chat_template: bool = True
    two_phase: bool = False

    primary_metric: ClassVar[str] = "average_en"

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
            f"0 (the official length for the model) or at least {MIN_MAX_LENGTH} tokens",
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
        # Chinese-only runs have no English mean; the instance attribute shadows the class default.
        if not any(name in EN_TASKS for name in self.task_names()):
            self.primary_metric = "average_zh"
        self._positions: int | None = None
        self._max_length = self.max_length  # the official default is resolved by check()
        self._archive: Path | None = None  # the hub's data.zip, once fetched
        self._counts: dict[str, int] | None = None  # records per task, once the data was checked
        self._sha256: dict[str, str] = {}  # file name -> sha256 of its bytes

    # ----- what runs -----
    def task_names(self) -> list[str]:
        return self.subtasks or list(E_TASKS if self.variant == "e" else TASKS)

    def file_name(self, name: str) -> str:
        return f"{name}_e" if self.variant == "e" else name

    def budget(self, name: str) -> int:
        return self.max_new_tokens or MAX_NEW_TOKENS[name]

    def check(self, model: ModelSpec, method: Method) -> None:
        """Resolve `max_length` for the model, then check every data file the run reads (before weights load)."""
        self._positions = model.max_positions
        answer = max(self.budget(name) for name in self.task_names())  # the longest answer must fit too
        self._max_length = resolve_max_length(self.max_length, V1_MAX_LENGTHS, model, answer)
        self.check_data()

    def describe(self) -> dict[str, Any]:
        """The settings, with what `check()` resolved: `max_length` as truncation uses it, and the sha256 of
        each data file read, so that a changed file makes a new run."""
        described = super().describe()
        described["max_length"] = self._max_length
        described["subtasks"] = self.task_names()
        described["max_new_tokens_per_task"] = {name: self.budget(name) for name in self.task_names()}
        described["data_sha256"] = dict(self._sha256)
        return described

    # ----- data -----
    def _local_file(self, name: str) -> Path | None:
        folder, file = Path(self.data_dir), f"{self.file_name(name)}.jsonl"
        for path in (folder / file, folder / "data" / file):
            if path.is_file():
                return path
        return None

    def _hub_archive(self) -> Path:
        if self._archive is None:
            self._archive = hub_file(
                self.dataset, "data.zip", "the official <task>.jsonl files (its data.zip unpacked)"
            )
        return self._archive

    def _member(self, zipped: zipfile.ZipFile, name: str) -> str:
        """The zip member of a task (`data/<task>.jsonl` in the official zip)."""
        member = f"{self.file_name(name)}.jsonl"
        names = [item for item in zipped.namelist() if item == member or item.endswith("/" + member)]
        require(bool(names), "task.dataset", self.dataset, f"a hub dataset whose data.zip holds {member}")
        return names[0]

    def check_data(self) -> None:
        """Read every file the run uses once: each line must be a JSON record with the fields the task reads
        (a bad one is reported with its file and line), and each file's sha256 goes into `describe()`."""
        required = (*REQUIRED_FIELDS, "length") if self.variant == "e" else REQUIRED_FIELDS
        counts: dict[str, int] = {}
        for name in self.task_names():
            file = f"{self.file_name(name)}.jsonl"
            if self.data_dir:
                path = self._local_file(name)
                assert path is not None  # checked in __post_init__
                with open(path, "rb") as handle:
                    try:
                        counts[name], self._sha256[file] = scan_jsonl(handle, required)
                    except ValueError as error:
                        raise ConfigError("task.data_dir", self.data_dir, f"{path} {error}") from None
                continue
            archive = self._hub_archive()
            with zipfile.ZipFile(archive) as zipped, zipped.open(self._member(zipped, name)) as handle:
                try:
                    counts[name], self._sha256[file] = scan_jsonl(handle, required)
                except ValueError as error:
                    raise ConfigError("task.dataset", self.dataset, f"{archive}:{file} {error}") from None
        self._counts = counts

    def records(self, name: str) -> Iterator[dict[str, Any]]:
        if self.data_dir:
            path = self._local_file(name)
            assert path is not None  # checked in __post_init__
            yield from read_jsonl(path, self.limit)
            return
        with zipfile.ZipFile(self._hub_archive()) as zipped, zipped.open(self._member(zipped, name)) as handle:
            yield from parse_jsonl(io.TextIOWrapper(handle, encoding="utf-8"), self.limit)

    def count(self) -> int:
        if self._counts is None:
            self.check_data()
        assert self._counts is not None
        return sum(min(available, self.limit) if self.limit else available for available in self._counts.values())

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
            max_length=self._max_length,
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
        """Per task: the mean score (x100). Over the tasks that ran (see docs/tasks.md):
        `average_en` / `average_zh`: the mean of the English (16, code included) / Chinese (5) task scores;
        `en/<category>`, `zh/<category>`: the official leaderboard's category means, and `en/leaderboard_avg`,
        `zh/leaderboard_avg`: the mean of that language's category means (its official "Avg").
        LongBench-E adds `<task>@<bucket>` and `average_en@<bucket>` for the length buckets."""
        per_task = {
            name: mean([row["score"] for row in rows if row["subtask"] == name])
            for name in TASKS
            if any(row["subtask"] == name for row in rows)
        }
        metrics: dict[str, float] = dict(per_task)
        for language, members in (("en", EN_TASKS), ("zh", ZH_TASKS)):
            scores = [per_task[name] for name in members if name in per_task]
            if not scores:
                continue  # no leaderboard for a language that did not run (code alone is not Chinese)
            metrics[f"average_{language}"] = mean(scores)
            categories = {}
            for category, tasks in LEADERBOARD[language].items():
                present = [per_task[name] for name in tasks if name in per_task]
                if present:
                    categories[category] = metrics[f"{language}/{category}"] = mean(present)
            metrics[f"{language}/leaderboard_avg"] = mean(list(categories.values()))
        if self.variant == "e":
            for bucket, _ in E_BUCKETS:
                bucket_scores = []
                for name in per_task:
                    cell = [row["score"] for row in rows if row["subtask"] == name and bucket_of(row) == bucket]
                    if cell:
                        metrics[f"{name}@{bucket}"] = mean(cell)
                        bucket_scores.append(metrics[f"{name}@{bucket}"])
                if bucket_scores:  # every LongBench-E task is English
                    metrics[f"average_en@{bucket}"] = mean(bucket_scores)
        return metrics


def bucket_of(row: dict[str, Any]) -> str:
    """LongBench-E's length bucket of a record (its `length`: words, or characters for Chinese)."""
    return next(name for name, upper in E_BUCKETS if row["length"] < upper)

"""LongBench v2: 503 four-choice questions over long contexts (8k to 2M words), scored by accuracy.

Protocol (after `pred.py` and `result.py` of THUDM/LongBench, the v2 code):
- Prompt: the official zero-shot template (`ZERO_SHOT`, = `prompts/0shot.txt`) with the stripped context,
  question and choices, in the chat template (the official runs go through a chat API).
- `cot=true`: the official two-step chain of thought: `COT` (`prompts/0shot_cot.txt`) generates up to
  `cot_max_new_tokens` of reasoning, then `COT_ANSWER` (`prompts/0shot_cot_ans.txt`, which omits the
  document) asks for the letter given that reasoning, with `max_new_tokens`.
- Truncation: as LongBench v1, the middle of the prompt's tokens goes (first half and last half kept);
  `max_length` counts the prompt without the chat template. 0 = the official length for the model's context:
  120,000 for 128k models, 200,000 for 200k ones (`config/model2maxlen.json`), and v1's 3,500 to 31,500 for
  smaller models, which v2's table does not cover: the largest that leaves the answer room in the model.
- Decoding: greedy (the official runs sample at temperature 0.1; the engine is greedy).
- Answer: "The correct answer is (X)", else "The correct answer is X", after removing `*`; anything else
  counts as wrong (and is counted in `unparsed`).
- Empty outputs: the official `pred.py` skips a question whose output is empty (`output == ''`, the reasoning
  or the answer with `cot`), so it counts in no score; `drop_empty_outputs=true` (default) does the same,
  false scores it as wrong. `empty_outputs` reports their share either way.
- Metrics (percent): `accuracy`, and by difficulty (easy/hard) and length class (short/medium/long).
  The official `result.py` files "medium" questions under "long" (its medium branch re-tests "short");
  here each class gets its own number.
- `two_phase=true`: everything after the document (question, choices, instruction) goes through decode.

Data: `data_dir` is a folder with the official `data.json`, or JSON-lines files with the same fields
(e.g. the 180 "short" questions); empty reads `data.json` of the hub dataset `dataset` (THUDM/LongBench-v2,
the file `datasets` loads), from the Hugging Face cache when it is there. `check()` reads the files before the
model loads: a bad record is reported with its file and line, and each file's sha256 goes into `describe()`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvbench.cache import ModelSpec
from kvbench.engine import Engine, Generation
from kvbench.errors import ConfigError, require
from kvbench.method import Method
from kvbench.task import Sample, Task, mean
from kvbench.tasks.longbench import (
    V1_MAX_LENGTHS,
    EncodedPrompt,
    check_record,
    encode_prompt,
    encode_to_fit,
    hub_file,
    read_jsonl,
    resolve_max_length,
    scan_jsonl,
    stop_ids,
)

_CHOICES = "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
# The official prompts (prompts/0shot.txt, 0shot_cot.txt, 0shot_cot_ans.txt); `$...$` are the slots.
ZERO_SHOT = (
    "Please read the following text and answer the question below.\n\n"
    "<text>\n$DOC$\n</text>\n\n"
    + _CHOICES
    + 'Format your response as follows: "The correct answer is (insert answer here)".'
)
COT = (
    "Please read the following text and answer the questions below.\n\n"
    "<text>\n$DOC$\n</text>\n\n" + _CHOICES + "Let’s think step by step:"
)
COT_ANSWER = (
    "Please read the following text and answer the questions below.\n\n"
    "The text is too long and omitted here.\n\n" + _CHOICES + "Let’s think step by step: $COT$\n\n"
    "Based on the above, what is the single, most likely answer choice? "
    'Format your response as follows: "The correct answer is (insert answer here)".'
)

DIFFICULTIES = ("easy", "hard")
LENGTHS = ("short", "medium", "long")
REQUIRED_FIELDS = (
    "_id", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context",
)  # fmt: skip
# Official prompt lengths by model context (config/model2maxlen.json): 120,000 for 128k models, 200,000 for
# the 200k one. v2 lists no smaller model; those get v1's lengths (3,500 for 4k ... 31,500 for 32k).
MAX_LENGTHS: tuple[int, ...] = (*V1_MAX_LENGTHS, 120_000, 200_000)


def extract_answer(response: str) -> str | None:
    """The chosen letter, as the official code reads it: "(X)" after the phrase, else a bare letter."""
    response = response.replace("*", "")
    found = re.search(r"The correct answer is \(([A-D])\)", response) or re.search(
        r"The correct answer is ([A-D])", response
    )
    return found.group(1) if found else None


def scan_json_list(data: bytes, required: Sequence[str], keep: Callable[[dict[str, Any]], bool]) -> tuple[int, str]:
    """(records that `keep` accepts, sha256 of the bytes) of a JSON list of records (the official data.json);
    ValueError says where it is broken."""
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"is not JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(records, list):
        raise ValueError("is not a JSON list of records")
    for index, record in enumerate(records):
        try:
            check_record(record, required)
        except ValueError as error:
            raise ValueError(f"record {index}: {error}") from None
    return sum(keep(record) for record in records), hashlib.sha256(data).hexdigest()


def fill(template: str, record: dict[str, Any]) -> str:
    """Put the stripped question and choices into a template's slots (the document is placed apart)."""
    text = template.replace("$Q$", record["question"].strip())
    for letter in "ABCD":
        text = text.replace(f"$C_{letter}$", record[f"choice_{letter}"].strip())
    return text


@dataclass
class CotGeneration(Generation):
    """A chain-of-thought answer: `token_ids` and `measurement` are the reasoning pass (the one that reads
    the long context through the cache); `text` is the short answer pass; `reasoning` its input."""

    reasoning: str = ""
    answer_tokens: int = 0


@dataclass
class LongBenchV2(Task):
    """`cot`: the official two-step chain of thought. `difficulties`/`lengths`: keep only these classes
    (empty = all). `limit`: questions (0 = all). `max_length`: prompt tokens kept (0 = the official length for
    the model, resolved by `check()`). `drop_empty_outputs`: leave questions with an empty output out of the
    scores, as the official code does."""

    data_dir: str = ""
    dataset: str = "THUDM/LongBench-v2"
    cot: bool = False
    max_length: int = 0
    max_new_tokens: int = 128
    cot_max_new_tokens: int = 1024
    chat_template: bool = True
    two_phase: bool = False
    difficulties: list[str] = field(default_factory=list)
    lengths: list[str] = field(default_factory=list)
    drop_empty_outputs: bool = True

    primary_metric: ClassVar[str] = "accuracy"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.difficulties, self.lengths = list(self.difficulties), list(self.lengths)
        for value in self.difficulties:
            require(value in DIFFICULTIES, "task.difficulties", value, f"some of {DIFFICULTIES}")
        for value in self.lengths:
            require(value in LENGTHS, "task.lengths", value, f"some of {LENGTHS}")
        require(self.max_length == 0 or self.max_length >= 32, "task.max_length", self.max_length, "0 or >= 32")
        require(self.max_new_tokens >= 1, "task.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        require(self.cot_max_new_tokens >= 1, "task.cot_max_new_tokens", self.cot_max_new_tokens, "an integer >= 1")
        if self.data_dir:
            require(
                bool(self._local_files()),
                "task.data_dir",
                self.data_dir,
                "a folder holding data.json or *.jsonl files of LongBench v2 records",
            )
        self._positions: int | None = None
        self._max_length = self.max_length  # the official default is resolved by check()
        self._hub_data: Path | None = None  # the hub's data.json, once fetched
        self._count: int | None = None  # questions after the filters, once the data was checked
        self._sha256: dict[str, str] = {}  # file name -> sha256 of its bytes

    def budget(self) -> int:
        """New tokens of the pass that reads the context."""
        return self.cot_max_new_tokens if self.cot else self.max_new_tokens

    def check(self, model: ModelSpec, method: Method) -> None:
        """Resolve `max_length` for the model, then check the data files (before weights load)."""
        self._positions = model.max_positions
        room = model.max_positions - self.budget()
        key = "task.cot_max_new_tokens" if self.cot else "task.max_new_tokens"
        require(room >= 64, key, self.budget(), f"well under {model.name}'s {model.max_positions} positions")
        self._max_length = resolve_max_length(self.max_length, MAX_LENGTHS, model, self.budget())
        self.check_data()

    def describe(self) -> dict[str, Any]:
        """The settings, with what `check()` resolved: `max_length` as truncation uses it, and the sha256 of
        each data file read, so that a changed file makes a new run."""
        described = super().describe()
        described["max_length"] = self._max_length
        described["data_sha256"] = dict(self._sha256)
        return described

    # ----- data -----
    def _local_files(self) -> list[Path]:
        folder = Path(self.data_dir)
        if (folder / "data.json").is_file():
            return [folder / "data.json"]
        return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []

    def _files(self) -> list[Path]:
        """The files read: the local ones, or the hub's data.json."""
        if self.data_dir:
            return self._local_files()
        if self._hub_data is None:
            self._hub_data = hub_file(self.dataset, "data.json", "data.json (the official file) or *.jsonl records")
        return [self._hub_data]

    def _wanted(self, record: dict[str, Any]) -> bool:
        return (not self.difficulties or record["difficulty"] in self.difficulties) and (
            not self.lengths or record["length"] in self.lengths
        )

    def check_data(self) -> None:
        """Read every data file once: each record must be JSON with the fields the task reads (a bad one is
        reported with its file and line or index), and each file's sha256 goes into `describe()`."""
        key, value = ("task.data_dir", self.data_dir) if self.data_dir else ("task.dataset", self.dataset)
        count = 0
        for path in self._files():
            try:
                if path.suffix == ".json":
                    found, self._sha256[path.name] = scan_json_list(path.read_bytes(), REQUIRED_FIELDS, self._wanted)
                else:
                    with open(path, "rb") as handle:
                        found, self._sha256[path.name] = scan_jsonl(handle, REQUIRED_FIELDS, self._wanted)
            except ValueError as error:
                raise ConfigError(key, value, f"{path} {error}") from None
            count += found
        self._count = count

    def _all_records(self) -> Iterator[dict[str, Any]]:
        for path in self._files():
            if path.suffix == ".json":
                with open(path, encoding="utf-8") as handle:
                    yield from json.load(handle)
            else:
                yield from read_jsonl(path)

    def records(self) -> Iterator[dict[str, Any]]:
        produced = 0
        for record in self._all_records():
            if not self._wanted(record):
                continue
            if self.limit and produced >= self.limit:
                return
            yield record
            produced += 1

    def count(self) -> int:
        if self._count is None:
            self.check_data()
        assert self._count is not None
        return min(self.limit, self._count) if self.limit else self._count

    # ----- samples -----
    def encode(self, tokenizer, record: dict[str, Any]) -> EncodedPrompt:
        head, tail = (COT if self.cot else ZERO_SHOT).split("$DOC$")
        return encode_to_fit(
            tokenizer,
            head + record["context"].strip(),
            fill(tail, record),
            use_chat=self.chat_template,
            two_phase=self.two_phase,
            max_length=self._max_length,
            positions=self._positions,
            answer_tokens=self.budget(),
        )

    def samples(self, tokenizer) -> Iterator[Sample]:
        stops = stop_ids(tokenizer)
        for record in self.records():
            encoded = self.encode(tokenizer, record)
            meta = {key: record[key] for key in ("domain", "sub_domain", "difficulty", "length") if key in record}
            meta |= {
                "prompt_tokens": len(encoded.prompt_ids) + len(encoded.question_ids),
                "question_tokens": len(encoded.question_ids),
                "input_tokens": encoded.input_tokens,
                "truncated_tokens": encoded.dropped_tokens,
            }
            reference = {"answer": record["answer"], "question": record["question"]}
            reference |= {f"choice_{letter}": record[f"choice_{letter}"] for letter in "ABCD"}
            yield Sample(
                str(record["_id"]),
                encoded.prompt_ids,
                self.budget(),
                question_ids=encoded.question_ids,
                stop_ids=stops,
                reference=reference,
                meta=meta,
            )

    def evaluate(self, engine: Engine, sample: Sample) -> Generation:
        if not self.cot:
            return super().evaluate(engine, sample)
        first = engine.generate(sample.prompt_ids, self.cot_max_new_tokens, sample.question_ids, sample.stop_ids)
        if first.text == "" and self.drop_empty_outputs:  # the official code skips the question right here
            return CotGeneration(
                token_ids=first.token_ids, text="", measurement=first.measurement, stopped=first.stopped
            )
        reasoning = first.text.strip()
        # The official answer prompt omits the document, so it needs no truncation.
        prompt = fill(COT_ANSWER, sample.reference).replace("$COT$", reasoning)
        ids = encode_prompt(engine.tokenizer, prompt, "", use_chat=self.chat_template, two_phase=False).prompt_ids
        second = engine.generate(ids, self.max_new_tokens, (), sample.stop_ids)
        return CotGeneration(  # by keyword: Generation's own fields come first and may grow
            token_ids=first.token_ids,
            text=second.text,
            measurement=first.measurement,
            stopped=first.stopped,
            reasoning=reasoning,
            answer_tokens=len(second.token_ids),
        )

    # ----- scores -----
    def score(self, sample: Sample, output: Generation) -> dict[str, Any]:
        response = output.text.strip()
        chosen = extract_answer(response)
        row = {
            "id": sample.id,
            **sample.meta,
            "answer": sample.reference["answer"],
            "response": response,
            "pred": chosen,
            "correct": float(chosen == sample.reference["answer"]),
            "empty_output": output.text == "",  # as the official `output == ''` test, before any strip
            "generated_tokens": len(output.token_ids),
        }
        if isinstance(output, CotGeneration):
            row |= {"reasoning": output.reasoning, "answer_tokens": output.answer_tokens}
        return row

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Percentages over the scored questions (all, or those with an output when `drop_empty_outputs`);
        `empty_outputs`: the share of questions with an empty output, among all."""
        scored = [row for row in rows if not (self.drop_empty_outputs and row["empty_output"])]
        metrics = {
            "accuracy": 100 * mean([row["correct"] for row in scored]),
            "unparsed": 100 * mean([float(row["pred"] is None) for row in scored]),
            "empty_outputs": 100 * mean([float(row["empty_output"]) for row in rows]),
        }
        for key, classes in (("difficulty", DIFFICULTIES), ("length", LENGTHS)):
            for value in classes:
                cell = [row["correct"] for row in scored if row.get(key) == value]
                if cell:
                    metrics[f"accuracy_{value}"] = 100 * mean(cell)
        return metrics

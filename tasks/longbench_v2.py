"""LongBench v2: 503 four-choice questions over long contexts (8k to 2M words), scored by accuracy.

Protocol (after `pred.py` and `result.py` of THUDM/LongBench, the v2 code):
- Prompt: the official zero-shot template (`ZERO_SHOT`, = `prompts/0shot.txt`) with the stripped context,
  question and choices, in the chat template (the official runs go through a chat API).
- `cot=true`: the official two-step chain of thought: `COT` (`prompts/0shot_cot.txt`) generates up to
  `cot_max_new_tokens` of reasoning, then `COT_ANSWER` (`prompts/0shot_cot_ans.txt`, which omits the
  document) asks for the letter given that reasoning, with `max_new_tokens`.
- Truncation: as LongBench v1, the middle of the prompt's tokens goes (first half and last half kept);
  `max_length` counts the prompt without the chat template; 0 = what the model's positions allow.
- Decoding: greedy (the official runs sample at temperature 0.1; the engine is greedy).
- Answer: "The correct answer is (X)", else "The correct answer is X", after removing `*`; anything else
  counts as wrong (and is counted in `unparsed`).
- Metrics (percent): `accuracy`, and by difficulty (easy/hard) and length class (short/medium/long).
  The official `result.py` files "medium" questions under "long" (its medium branch re-tests "short");
  here each class gets its own number.
- `two_phase=true`: everything after the document (question, choices, instruction) goes through decode.

Data: `data_dir` is a folder with the official `data.json`, or JSON-lines files with the same fields
(e.g. the 180 "short" questions); empty loads `dataset` (THUDM/LongBench-v2) through `datasets`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvbench.cache import ModelSpec
from kvbench.engine import Engine, Generation
from kvbench.errors import require
from kvbench.method import Method
from kvbench.task import Sample, Task, mean
from kvbench.tasks.longbench import EncodedPrompt, encode_prompt, encode_to_fit, read_jsonl, stop_ids

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
OFFICIAL_COUNT = 503


def extract_answer(response: str) -> str | None:
    """The chosen letter, as the official code reads it: "(X)" after the phrase, else a bare letter."""
    response = response.replace("*", "")
    found = re.search(r"The correct answer is \(([A-D])\)", response) or re.search(
        r"The correct answer is ([A-D])", response
    )
    return found.group(1) if found else None


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
    (empty = all). `limit`: questions (0 = all). `max_length`: prompt tokens kept (0 = fit the model)."""

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

    def budget(self) -> int:
        """New tokens of the pass that reads the context."""
        return self.cot_max_new_tokens if self.cot else self.max_new_tokens

    def check(self, model: ModelSpec, method: Method) -> None:
        self._positions = model.max_positions
        room = model.max_positions - self.budget()
        key = "task.cot_max_new_tokens" if self.cot else "task.max_new_tokens"
        require(room >= 64, key, self.budget(), f"well under {model.name}'s {model.max_positions} positions")
        if self.max_length:
            require(
                self.max_length <= room,
                "task.max_length",
                self.max_length,
                f"at most {room} ({model.name} has {model.max_positions} positions, {self.budget()} go to the answer)",
            )

    # ----- data -----
    def _local_files(self) -> list[Path]:
        folder = Path(self.data_dir)
        if (folder / "data.json").is_file():
            return [folder / "data.json"]
        return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []

    def _all_records(self) -> Iterator[dict[str, Any]]:
        if not self.data_dir:
            from datasets import load_dataset

            yield from load_dataset(self.dataset, split="train")
            return
        for path in self._local_files():
            if path.suffix == ".json":
                with open(path, encoding="utf-8") as handle:
                    yield from json.load(handle)
            else:
                yield from read_jsonl(path)

    def records(self) -> Iterator[dict[str, Any]]:
        produced = 0
        for record in self._all_records():
            if self.difficulties and record["difficulty"] not in self.difficulties:
                continue
            if self.lengths and record["length"] not in self.lengths:
                continue
            if self.limit and produced >= self.limit:
                return
            yield record
            produced += 1

    def count(self) -> int | None:
        if self.data_dir:
            return sum(1 for _ in self.records())
        if self.difficulties or self.lengths:
            return None
        return min(self.limit, OFFICIAL_COUNT) if self.limit else OFFICIAL_COUNT

    # ----- samples -----
    def encode(self, tokenizer, record: dict[str, Any]) -> EncodedPrompt:
        head, tail = (COT if self.cot else ZERO_SHOT).split("$DOC$")
        return encode_to_fit(
            tokenizer,
            head + record["context"].strip(),
            fill(tail, record),
            use_chat=self.chat_template,
            two_phase=self.two_phase,
            max_length=self.max_length,
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
        reasoning = first.text.strip()
        # The official answer prompt omits the document, so it needs no truncation.
        prompt = fill(COT_ANSWER, sample.reference).replace("$COT$", reasoning)
        ids = encode_prompt(engine.tokenizer, prompt, "", use_chat=self.chat_template, two_phase=False).prompt_ids
        second = engine.generate(ids, self.max_new_tokens, (), sample.stop_ids)
        return CotGeneration(
            first.token_ids, second.text, first.measurement, reasoning, answer_tokens=len(second.token_ids)
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
            "generated_tokens": len(output.token_ids),
        }
        if isinstance(output, CotGeneration):
            row |= {"reasoning": output.reasoning, "answer_tokens": output.answer_tokens}
        return row

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        metrics = {
            "accuracy": 100 * mean([row["correct"] for row in rows]),
            "unparsed": 100 * mean([float(row["pred"] is None) for row in rows]),
        }
        for key, classes in (("difficulty", DIFFICULTIES), ("length", LENGTHS)):
            for value in classes:
                cell = [row["correct"] for row in rows if row.get(key) == value]
                if cell:
                    metrics[f"accuracy_{value}"] = 100 * mean(cell)
        return metrics

"""GSM8K: grade-school math word problems with chain-of-thought answers (1,319 test problems).

Cobbe et al., "Training Verifiers to Solve Math Word Problems", arXiv 2110.14168 (openai/grade-school-math).
A few hundred generated tokens per problem from a short prompt, so a cache that compresses during
decoding is what the answer depends on. Protocol:
- Prompt: the question followed by "Please reason step by step, and put your final answer within
  \\boxed{}." (zero-shot chain of thought, as Qwen2.5-Math evaluates instruction models), in the model's
  chat template when it has one. Greedy decoding up to `max_new_tokens`, stopping at the end of the turn.
- Answer: the last `\\boxed{...}` read as an integer (AIME's reader: "1,000", "$18", "18.00" all count);
  without a box, the last number in the response (Qwen2.5-Math's fallback, which models that do not box
  still get credit from). A boxed answer that is not an integer is wrong (no fallback then).
- Reference: the integer after "#### " in the dataset's solution (thousands separators removed).
- Metrics (percent): `accuracy` (exact match of the integers), `boxed` (share with a boxed answer),
  `truncated` (share that hit the token limit); the generated lengths.

Data: `data_dir` is a folder holding `data_file` (JSON lines with `question` and `answer`, the official
`test.jsonl` or Qwen2.5-Math's copy in ../shared/data/gsm8k); empty loads `dataset`/`subset`/`split`
through `datasets`. Records are read and validated in `check()`, before any weights load, and the data's
sha256 is part of the run's identity.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kvbench.cache import ModelSpec
from kvbench.engine import Generation
from kvbench.errors import ConfigError, require
from kvbench.method import Method
from kvbench.task import Sample, Task, file_or_hub_records, mean
from kvbench.tasks.aime import PROMPT_RESERVE, last_boxed, to_integer
from kvbench.tasks.longbench import encode_message, stop_ids

DEFAULT_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def reference_answer(solution: str) -> int | None:
    """The integer after the last "#### " of a GSM8K solution; None if there is none."""
    if "####" not in solution:
        return None
    return to_integer(solution.rsplit("####", 1)[1].strip())


def extract_answer(response: str) -> tuple[int | None, str | None]:
    """(answer, where it came from: "boxed", "last_number" or None)."""
    boxed = last_boxed(response)
    if boxed is not None:
        return to_integer(boxed), "boxed"
    numbers = _NUMBER.findall(response)
    if not numbers:
        return None, None
    return to_integer(numbers[-1].rstrip(",")), "last_number"


def normalize(record: Any, index: int, where: str, key: str, value: str) -> dict[str, Any]:
    """{id, question, answer (int)} from a GSM8K record; a `ConfigError` naming `where` otherwise."""
    fields = record if isinstance(record, dict) else {}
    question, solution = fields.get("question"), fields.get("answer")
    answer = reference_answer(solution) if isinstance(solution, str) else None
    if not isinstance(question, str) or answer is None:
        raise ConfigError(key, value, f"{where} is not a record with a question and a '#### <integer>' answer")
    return {"id": str(fields.get("idx", index)), "question": question, "answer": answer}


@dataclass
class GSM8K(Task):
    """`data_dir`: a folder with `data_file`; empty loads `dataset` (`subset`, `split`) through `datasets`.
    `limit`: problems (0 = all)."""

    data_dir: str = ""
    data_file: str = "test.jsonl"
    dataset: str = "openai/gsm8k"
    subset: str = "main"
    split: str = "test"
    prompt: str = DEFAULT_PROMPT
    chat_template: bool = True
    max_new_tokens: int = 512

    primary_metric: ClassVar[str] = "accuracy"

    def __post_init__(self) -> None:
        super().__post_init__()
        require("{question}" in self.prompt, "task.prompt", self.prompt, "a template containing {question}")
        require(self.max_new_tokens >= 1, "task.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if self.data_dir:
            path = Path(self.data_dir) / self.data_file
            require(path.is_file(), "task.data_dir", self.data_dir, f"a folder containing {self.data_file}")
        self._records: list[dict[str, Any]] | None = None
        self._data_sha256 = ""

    def check(self, model: ModelSpec, method: Method) -> None:
        require(
            self.max_new_tokens + PROMPT_RESERVE <= model.max_positions,
            "task.max_new_tokens",
            self.max_new_tokens,
            f"at most {model.max_positions - PROMPT_RESERVE} ({model.name} has {model.max_positions} positions; "
            f"{PROMPT_RESERVE} are kept for the prompt)",
        )
        self.records()  # missing or corrupt data is reported before any weights load

    def describe(self) -> dict[str, Any]:
        self.records()
        return {**super().describe(), "data_sha256": self._data_sha256}

    # ----- data -----
    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            self._records, self._data_sha256 = file_or_hub_records(
                self.data_dir,
                self.data_file,
                (self.dataset, self.subset),
                self.split,
                "../shared/data/gsm8k",
                normalize,
            )
        return self._records

    def count(self) -> int | None:
        return len(self.records()[: self.limit or None])

    # ----- samples -----
    def encode(self, tokenizer, question: str) -> list[int]:
        return encode_message(tokenizer, self.prompt.replace("{question}", question), self.chat_template)

    def samples(self, tokenizer) -> Iterator[Sample]:
        stops = stop_ids(tokenizer)
        for record in self.records()[: self.limit or None]:
            ids = self.encode(tokenizer, record["question"])
            yield Sample(
                record["id"],
                ids,
                self.max_new_tokens,
                stop_ids=stops,
                reference=record["answer"],
                meta={"prompt_tokens": len(ids)},
            )

    # ----- scores -----
    def score(self, sample: Sample, output: Generation) -> dict[str, Any]:
        answer, source = extract_answer(output.text)
        return {
            "id": sample.id,
            **sample.meta,
            "reference": sample.reference,
            "answer": answer,
            "answer_from": source,
            "correct": float(answer == sample.reference),
            "generated_tokens": len(output.token_ids),
            "truncated": float(not output.stopped),
            "prediction": output.text,
        }

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return {
            "accuracy": 100 * mean([row["correct"] for row in rows]),
            "boxed": 100 * mean([float(row["answer_from"] == "boxed") for row in rows]),
            "truncated": 100 * mean([row["truncated"] for row in rows]),
            "generated_tokens_mean": mean([float(row["generated_tokens"]) for row in rows]),
            "generated_tokens_max": float(max((row["generated_tokens"] for row in rows), default=0)),
        }

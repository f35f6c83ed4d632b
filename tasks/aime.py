"""AIME (2024, 2025): 30 competition problems per year, each with an integer answer in 0..999.

Long generation with a short prompt: the cache grows during decode, which is what decode-time eviction is
tested on. Protocol:
- Prompt: the problem followed by "Please reason step by step, and put your final answer within
  \\boxed{}." (the DeepSeek-R1 / Qwen2.5-Math instruction), in the model's chat template when it has one.
- Decoding: greedy by default, up to `max_new_tokens` (default 32768; 0 = whatever the model's positions
  leave). `temperature > 0` samples (with `top_p`), `samples_per_problem` times per problem, each sample
  seeded from `seed`, the problem and the repeat, so a run repeats exactly; pass@1 averages over them.
  With greedy decoding every repeat gives the same answer, so `samples_per_problem > 1` needs sampling.
- Answer: the content of the last `\\boxed{...}` (nested braces handled), read as an integer (`to_integer`),
  so "025" equals 25 and `\\dfrac{66}{2}` equals 33. No boxed answer, or one that is not an integer, is wrong.
- Metrics (percent): `pass@1` = mean over problems of the share of correct samples; `boxed` = share of
  samples with a boxed answer; `truncated` = share that did not end on a stop token (the task's or the
  model's own), i.e. hit the token limit. Each row records `generated_tokens` (the cache's growth during decode).

Data: `data_dir` is a folder holding `data_file` (JSON lines with problem/answer fields; the loader also
accepts Problem/Answer/question and ID/id); empty loads `dataset`/`split` through `datasets`. `check()`
reads and validates every record before any weights load (missing data, a corrupt line: a `ConfigError`
naming the file and line), and `describe()` carries `data_sha256` (of the file, or of the hub rows), so a
changed data file is a different run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

from kvbench.cache import ModelSpec
from kvbench.engine import Generation, Sampling
from kvbench.errors import ConfigError, require
from kvbench.method import Method
from kvbench.task import Sample, Task, file_or_hub_records, mean
from kvbench.tasks.longbench import encode_message, stop_ids

DEFAULT_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
PROMPT_RESERVE = 512  # check() assumes prompts up to this many tokens; samples() checks the real length


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included; None if absent
    or left open (generation stopped inside it). `\\boxed 5` (no braces) gives its single token."""
    found = list(re.finditer(r"\\(?:boxed|fbox)\s*", text))
    if not found:
        return None
    rest = text[found[-1].end() :]
    if not rest.startswith("{"):
        bare = re.match(r"[^\s$]+", rest)
        return bare.group(0) if bare else None
    depth = 0
    for index, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:index]
    return None


# Formatting commands whose argument is the answer itself (`\textbf{33}`), or a unit when it holds no digit
# (`33 \text{ degrees}`, `\mathrm{cm}`).
_WRAPPERS = (
    r"text|textbf|textit|textrm|textnormal|texttt|textsf|mathbf|mathrm|mathit|mathsf|mathtt|mathnormal|"
    r"boldsymbol|bm|mbox|operatorname"
)
_UNIT = re.compile(rf"\\(?:{_WRAPPERS})\s*\{{[^{{}}\d]*\}}")
_WRAPPED = re.compile(rf"\\(?:{_WRAPPERS})\s*\{{([^{{}}]*)\}}")
_STYLE = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle|boldmath|bf|rm|it)(?![A-Za-z])")
_DEGREES_PERCENT_DOLLARS = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°|\\?%|\\?\$")
# `\frac{66}{2}`, `\dfrac`, `\tfrac`, and LaTeX's single-digit arguments (`\frac12`); becomes "66/2".
_FRACTION = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
# Thousands separators: "1,000", "1{,}000", "1\,000" (only before exactly three digits).
_THOUSANDS = re.compile(r"(?<=\d)(?:,|\{,\}|\\,|\\!|\\ )(?=\d{3}(?!\d))")
_LATEX_SPACE = re.compile(r"\\[,!;: ]|~")
# Unit words after the number ("33 degrees", "33 cm"): two letters or more, so "3 x" stays unreadable.
_UNIT_WORDS = re.compile(r"(?<=\d)\s+[A-Za-z]{2,}[A-Za-z\s]*$")
_NUMBER = re.compile(r"([+-]?\d+)(?:\.0*|/(\d+))?")


def to_integer(answer: str | None) -> int | None:
    """An AIME answer as an integer, or None when it is not one.

    Strips formatting (`\\textbf{33}`, `\\mathbf`, `\\displaystyle`), units (`33 \\text{ degrees}`, `45^\\circ`,
    `\\%`, `\\$`), spacing and thousands separators; keeps the value after the last "=" ("m+n=25"); reads a
    fraction whose value is an integer (`\\dfrac{66}{2}` -> 33). Never rounds: "33.5", `\\frac{1}{2}` and
    "3 3" (two numbers) are None, while "025" -> 25 and "25.0" -> 25."""
    if answer is None:
        return None
    text = _UNIT.sub("", answer)
    while (unwrapped := _WRAPPED.sub(r"\1", text)) != text:  # innermost first, so nesting unwraps in turns
        text = unwrapped
    text = _DEGREES_PERCENT_DOLLARS.sub("", _STYLE.sub("", text))
    text = _FRACTION.sub(lambda m: f"{m[1] or m[2]}/{m[3] or m[4]}", text)
    text = text.rsplit("=", 1)[-1]  # "m+n=25": the value after the last "="
    text = _LATEX_SPACE.sub(" ", _THOUSANDS.sub("", text)).strip()
    text = _UNIT_WORDS.sub("", text)
    if re.search(r"\d\s+\d", text):  # "3 3" is two numbers, not 33
        return None
    found = _NUMBER.fullmatch(re.sub(r"\s+", "", text))
    if not found:
        return None
    numerator, denominator = int(found[1]), int(found[2] or 1)
    if denominator == 0:
        return None
    value = Fraction(numerator, denominator)
    return int(value) if value.denominator == 1 else None


def extract_answer(response: str) -> int | None:
    return to_integer(last_boxed(response))


def normalize(record: Any, index: int, where: str, key: str, value: str) -> dict[str, Any]:
    """{id, problem, answer (int)} from a record with any casing of problem/question, answer and id;
    a `ConfigError` naming `where` when the record is not one."""
    fields = {name.lower(): item for name, item in record.items()} if isinstance(record, dict) else {}
    problem = fields.get("problem") or fields.get("question")
    answer = str(fields.get("answer", "")).strip()
    if not isinstance(problem, str) or not re.fullmatch(r"\d+", answer):
        raise ConfigError(key, value, f"{where} is not a record with a problem and an integer answer")
    return {"id": str(fields.get("id", index)), "problem": problem, "answer": int(answer)}


@dataclass
class AIME(Task):
    """`data_dir`: a folder with `data_file`; empty loads `dataset`/`split` through `datasets`.
    `samples_per_problem`: n generations per problem, averaged into pass@1. `limit`: problems (0 = all)."""

    data_dir: str = ""
    data_file: str = "aime24.jsonl"
    dataset: str = "Maxwell-Jia/AIME_2024"
    split: str = "train"
    prompt: str = DEFAULT_PROMPT
    chat_template: bool = True
    max_new_tokens: int = 32768
    samples_per_problem: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    primary_metric: ClassVar[str] = "pass@1"

    def __post_init__(self) -> None:
        super().__post_init__()
        require("{problem}" in self.prompt, "task.prompt", self.prompt, "a template containing {problem}")
        require(self.max_new_tokens >= 0, "task.max_new_tokens", self.max_new_tokens, "0 (fill) or >= 1")
        require(self.samples_per_problem >= 1, "task.samples_per_problem", self.samples_per_problem, ">= 1")
        require(self.temperature >= 0, "task.temperature", self.temperature, "0 (greedy) or a positive number")
        require(0 < self.top_p <= 1, "task.top_p", self.top_p, "a number in (0, 1]")
        require(
            self.samples_per_problem == 1 or self.temperature > 0,
            "task.samples_per_problem",
            self.samples_per_problem,
            "1 with greedy decoding (repeats would be identical), or set task.temperature > 0",
        )
        if self.data_dir:
            path = Path(self.data_dir) / self.data_file
            require(path.is_file(), "task.data_dir", self.data_dir, f"a folder containing {self.data_file}")
        self._positions: int | None = None
        self._records: list[dict[str, Any]] | None = None
        self._data_sha256 = ""

    def check(self, model: ModelSpec, method: Method) -> None:
        self._positions = model.max_positions
        if self.max_new_tokens:
            require(
                self.max_new_tokens + PROMPT_RESERVE <= model.max_positions,
                "task.max_new_tokens",
                self.max_new_tokens,
                f"at most {model.max_positions - PROMPT_RESERVE} ({model.name} has {model.max_positions} "
                f"positions; {PROMPT_RESERVE} are kept for the prompt), or 0 to fill them",
            )
        self.records()  # after the fit checks: missing or corrupt data is reported before any weights load

    def describe(self) -> dict[str, Any]:
        # The data's hash is part of the run's identity: a corrected data file makes a new run.
        self.records()
        return {**super().describe(), "data_sha256": self._data_sha256}

    # ----- data -----
    def records(self) -> list[dict[str, Any]]:
        """Every record as {id, problem, answer (int)}, whatever the source's field names; read once."""
        if self._records is None:
            self._records, self._data_sha256 = file_or_hub_records(
                self.data_dir, self.data_file, (self.dataset,), self.split, "../shared/data/aime", normalize
            )
        return self._records

    def problems(self) -> Iterator[dict[str, Any]]:
        """The first `limit` records (0 = all)."""
        yield from self.records()[: self.limit or None]

    def count(self) -> int | None:
        return len(self.records()[: self.limit or None]) * self.samples_per_problem

    # ----- samples -----
    def encode(self, tokenizer, problem: str) -> list[int]:
        return encode_message(tokenizer, self.prompt.replace("{problem}", problem), self.chat_template)

    def budget(self, prompt_tokens: int) -> int:
        if self.max_new_tokens:
            if self._positions is not None:
                room = self._positions - prompt_tokens
                require(self.max_new_tokens <= room, "task.max_new_tokens", self.max_new_tokens, f"<= {room}")
            return self.max_new_tokens
        if self._positions is None:
            raise ConfigError("task.max_new_tokens", 0, "a token count (or call check(model, method) first)")
        return self._positions - prompt_tokens

    def samples(self, tokenizer) -> Iterator[Sample]:
        stops = stop_ids(tokenizer)
        for index, record in enumerate(self.problems()):
            ids = self.encode(tokenizer, record["problem"])
            for repeat in range(self.samples_per_problem):
                seed = self.seed * 1_000_003 + index * 1_009 + repeat
                sampling = Sampling(self.temperature, self.top_p, seed) if self.temperature > 0 else None
                yield Sample(
                    f"{record['id']}#{repeat}",
                    ids,
                    self.budget(len(ids)),
                    stop_ids=stops,
                    reference=record["answer"],
                    meta={"problem_id": record["id"], "repeat": repeat, "prompt_tokens": len(ids)},
                    sampling=sampling,
                )

    # ----- scores -----
    def score(self, sample: Sample, output: Generation) -> dict[str, Any]:
        boxed = last_boxed(output.text)
        answer = to_integer(boxed)
        return {
            "id": sample.id,
            **sample.meta,
            "reference": sample.reference,
            "boxed": boxed,
            "answer": answer,
            "correct": float(answer == sample.reference),
            "generated_tokens": len(output.token_ids),
            # The engine also stops on the model's own end ids (e.g. Llama-3.1's 128001/128008), which
            # sample.stop_ids does not list: only `stopped` knows whether the generation ended.
            "truncated": float(not output.stopped),
            "prediction": output.text,
        }

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        by_problem: dict[str, list[float]] = {}
        for row in rows:
            by_problem.setdefault(row["problem_id"], []).append(row["correct"])
        return {
            "pass@1": 100 * mean([mean(scores) for scores in by_problem.values()]),
            "boxed": 100 * mean([float(row["boxed"] is not None) for row in rows]),
            "truncated": 100 * mean([row["truncated"] for row in rows]),
            "generated_tokens_mean": mean([float(row["generated_tokens"]) for row in rows]),
            "generated_tokens_max": float(max((row["generated_tokens"] for row in rows), default=0)),
        }

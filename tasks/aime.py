"""AIME (2024, 2025): 30 competition problems per year, each with an integer answer in 0..999.

Long generation with a short prompt: the cache grows during decode, which is what decode-time eviction is
tested on. Protocol:
- Prompt: the problem followed by "Please reason step by step, and put your final answer within
  \\boxed{}." (the DeepSeek-R1 / Qwen2.5-Math instruction), in the model's chat template when it has one.
- Decoding: greedy by default, up to `max_new_tokens` (default 32768; 0 = whatever the model's positions
  leave). `temperature > 0` samples (with `top_p`), `samples_per_problem` times per problem, each sample
  seeded from `seed`, the problem and the repeat, so a run repeats exactly; pass@1 averages over them.
  With greedy decoding every repeat gives the same answer, so `samples_per_problem > 1` needs sampling.
- Answer: the content of the last `\\boxed{...}` (nested braces handled), read as an integer, so "025"
  equals 25. No boxed answer, or one that is not an integer, is wrong.
- Metrics (percent): `pass@1` = mean over problems of the share of correct samples; `boxed` = share of
  samples with a boxed answer; `truncated` = share that hit the token limit. Each row records
  `generated_tokens` (the cache's growth during decode).

Data: `data_dir` is a folder holding `data_file` (JSON lines with problem/answer fields; the loader also
accepts Problem/Answer/question and ID/id); empty loads `dataset`/`split` through `datasets`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kvbench.cache import ModelSpec
from kvbench.engine import Generation, Sampling
from kvbench.errors import ConfigError, require
from kvbench.method import Method
from kvbench.task import Sample, Task, mean
from kvbench.tasks.longbench import chat_wrapper, read_jsonl, stop_ids

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


def to_integer(answer: str | None) -> int | None:
    """An AIME answer as an integer: strips LaTeX wrappers and spacing; "025" -> 25, "1,000" -> 1000."""
    if answer is None:
        return None
    text = re.sub(r"\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", lambda m: m.group(1) or m.group(2) or "", answer)
    text = text.replace("\\!", "").replace("\\,", "").replace("$", "").replace(" ", "")
    text = re.sub(r"\^\{?\\circ\}?|\\%|%", "", text)
    if "=" in text:  # "m+n=25": the value after the last "="
        text = text.rsplit("=", 1)[1]
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    found = re.fullmatch(r"[+-]?\d+(?:\.0*)?", text)
    return int(float(text)) if found else None


def extract_answer(response: str) -> int | None:
    return to_integer(last_boxed(response))


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

    # ----- data -----
    def problems(self) -> Iterator[dict[str, Any]]:
        """Records as {id, problem, answer (int)}, whatever the source's field names."""
        if self.data_dir:
            source: Any = read_jsonl(Path(self.data_dir) / self.data_file)
        else:
            from datasets import load_dataset

            source = load_dataset(self.dataset, split=self.split)
        for index, record in enumerate(source):
            if self.limit and index >= self.limit:
                return
            fields = {key.lower(): value for key, value in record.items()}
            problem = fields.get("problem") or fields.get("question")
            if problem is None or "answer" not in fields:
                raise ConfigError("task.dataset", self.dataset, "records with problem and answer fields")
            yield {"id": str(fields.get("id", index)), "problem": problem, "answer": int(str(fields["answer"]))}

    def count(self) -> int | None:
        # Every AIME year has 30 problems (I and II); a local file is counted.
        problems = sum(1 for _ in read_jsonl(Path(self.data_dir) / self.data_file)) if self.data_dir else 30
        return (min(problems, self.limit) if self.limit else problems) * self.samples_per_problem

    # ----- samples -----
    def encode(self, tokenizer, problem: str) -> list[int]:
        text = self.prompt.replace("{problem}", problem)
        wrapper = chat_wrapper(tokenizer) if self.chat_template else None
        if wrapper:
            return tokenizer(wrapper[0] + text + wrapper[1], add_special_tokens=False)["input_ids"]
        return tokenizer(text, add_special_tokens=True)["input_ids"]

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
        finished = bool(output.token_ids) and output.token_ids[-1] in sample.stop_ids
        return {
            "id": sample.id,
            **sample.meta,
            "reference": sample.reference,
            "boxed": boxed,
            "answer": answer,
            "correct": float(answer == sample.reference),
            "generated_tokens": len(output.token_ids),
            "truncated": float(not finished),
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

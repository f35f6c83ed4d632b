"""Passkey retrieval: a number hidden at a chosen depth of filler text; the model must repeat it.

The format follows the passkey test of Mohtashami & Jaggi ("Landmark Attention", 2023), also used by
ArkVale's Table 1. Samples are generated from a seed, so the task needs no files.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvbench.cache import ModelSpec
from kvbench.engine import Generation
from kvbench.errors import require
from kvbench.method import Method
from kvbench.task import Sample, Task, mean
from kvbench.tasks.longbench import encode_message

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class Passkey(Task):
    """`context_lengths` are prompt lengths in tokens; `depths` are where the key sits (0 = start).

    `prompt_style`: `plain` (a completion prompt; the default, which the embedded model answers at every
    depth up to ~7k tokens with the full cache) or `chat` (the model's chat template).
    """

    context_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    samples_per_cell: int = 1
    digits: int = 5
    max_new_tokens: int = 8
    prompt_style: str = "plain"
    seed: int = 0

    primary_metric: ClassVar[str] = "accuracy"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(len(self.context_lengths) > 0, "task.context_lengths", [], "a non-empty list of token counts")
        require(len(self.depths) > 0, "task.depths", [], "a non-empty list of fractions between 0 and 1")
        for length in self.context_lengths:
            require(length >= 64, "task.context_lengths", length, "token counts >= 64")
        for depth in self.depths:
            require(0 <= depth <= 1, "task.depths", depth, "fractions between 0 and 1")
        require(self.samples_per_cell >= 1, "task.samples_per_cell", self.samples_per_cell, "an integer >= 1")
        require(1 <= self.digits <= 20, "task.digits", self.digits, "an integer in [1, 20]")
        require(self.max_new_tokens >= 1, "task.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        require(self.prompt_style in ("plain", "chat"), "task.prompt_style", self.prompt_style, "plain or chat")

    def check(self, model: ModelSpec, method: Method) -> None:
        longest = max(self.context_lengths) + self.max_new_tokens
        require(
            longest <= model.max_positions,
            "task.context_lengths",
            max(self.context_lengths),
            f"at most {model.max_positions - self.max_new_tokens} tokens "
            f"({model.name} has {model.max_positions} positions, {self.max_new_tokens} go to the answer)",
        )

    def count(self) -> int:
        total = len(self.context_lengths) * len(self.depths) * self.samples_per_cell
        return min(total, self.limit) if self.limit else total

    def samples(self, tokenizer) -> Iterator[Sample]:
        rng = random.Random(self.seed)
        produced = 0
        for length in self.context_lengths:
            for depth in self.depths:
                for repeat in range(self.samples_per_cell):
                    if self.limit and produced >= self.limit:
                        return
                    key = str(rng.randrange(10 ** (self.digits - 1), 10**self.digits))
                    ids = self._prompt_ids(tokenizer, length, depth, key)
                    meta = {"context_length": length, "depth": depth, "prompt_tokens": len(ids)}
                    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
                    sample_id = f"len{length}-depth{depth}-{repeat}"
                    yield Sample(sample_id, ids, self.max_new_tokens, stop_ids=stops, reference=key, meta=meta)
                    produced += 1

    def _prompt_ids(self, tokenizer, length: int, depth: float, key: str) -> list[int]:
        def render(fillers: int) -> list[int]:
            before = round(fillers * depth)
            text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (fillers - before)
            if self.prompt_style == "chat":  # the question as the user's turn, the answer the assistant's
                has_template = bool(getattr(tokenizer, "chat_template", None))
                require(has_template, "task.prompt_style", "chat", "plain: this tokenizer has no chat template")
                return encode_message(tokenizer, text + QUESTION.replace(" The pass key is", ""), chat_template=True)
            return tokenizer(text + QUESTION, add_special_tokens=True)["input_ids"]

        # Grow the filler until the prompt reaches `length` tokens (filler units are ~25 tokens).
        per_filler = len(tokenizer(FILLER * 8)["input_ids"]) / 8
        fillers = max(0, int((length - len(render(0))) / per_filler))
        while fillers > 0 and len(render(fillers)) > length:
            fillers -= 1
        return render(fillers)

    def score(self, sample: Sample, output: Generation) -> dict[str, Any]:
        found = re.search(r"\d+", output.text)
        answer = found.group(0) if found else ""
        return {
            "id": sample.id,
            **sample.meta,
            "reference": sample.reference,
            "prediction": output.text,
            "correct": float(answer == sample.reference),
        }

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        metrics = {"accuracy": mean([row["correct"] for row in rows])}
        for length in sorted({row["context_length"] for row in rows}):
            cell = [row["correct"] for row in rows if row["context_length"] == length]
            metrics[f"accuracy@{length}"] = mean(cell)
        return metrics

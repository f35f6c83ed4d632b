"""The task contract: a dataclass of settings (filled by Hydra) that yields samples and scores outputs.

A task file subclasses `Task`: `samples()` builds token-level inputs, `score()` turns one output into a
prediction row with its metric values, `aggregate()` turns rows into the run's metrics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvbench.cache import ModelSpec
from kvbench.engine import Engine, Generation, Request, Sampling, Scored
from kvbench.errors import ConfigError, require
from kvbench.method import Method


@dataclass
class Sample:
    """One input. With `continuation_ids` the engine scores those tokens instead of generating."""

    id: str
    prompt_ids: list[int]
    max_new_tokens: int = 0
    question_ids: list[int] = field(default_factory=list)  # two-phase protocol: fed through decode
    continuation_ids: list[int] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    min_new_tokens: int = 0  # stop tokens are refused before this many new tokens
    reference: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    sampling: Sampling | None = None  # None: greedy


@dataclass
class Task:
    """Base of every task. `limit`: evaluate at most this many samples (0 = all)."""

    limit: int = 0

    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    def __post_init__(self) -> None:
        require(self.limit >= 0, "task.limit", self.limit, "an integer >= 0 (0 = all samples)")

    def check(self, model: ModelSpec, method: Method) -> None:
        """Checks that need the model's shape or the method, before weights load."""

    def samples(self, tokenizer) -> Iterator[Sample]:
        raise NotImplementedError

    def count(self) -> int | None:
        """How many samples `samples()` yields, for the progress bar (None if unknown)."""
        return None

    def evaluate(self, engine: Engine, sample: Sample) -> Generation | Scored:
        if sample.continuation_ids:
            return engine.score_continuation(sample.prompt_ids, sample.continuation_ids)
        return engine.generate(
            sample.prompt_ids,
            sample.max_new_tokens,
            sample.question_ids,
            sample.stop_ids,
            sample.sampling,
            sample.min_new_tokens,
        )

    def evaluate_batch(self, engine: Engine, samples: list[Sample]) -> list[Generation | Scored]:
        """Outputs for several samples: generations decode together in one batch (`kvbench.batch_size`).

        A task that overrides `evaluate` (e.g. a two-pass protocol), a scoring sample, or samples with
        different sampling settings run one at a time.
        """
        together = (
            type(self).evaluate is Task.evaluate
            and not any(s.continuation_ids for s in samples)
            and len({(s.sampling.temperature, s.sampling.top_p) if s.sampling else None for s in samples}) == 1
        )
        if len(samples) == 1 or not together:
            return [self.evaluate(engine, sample) for sample in samples]
        requests = [
            Request(s.prompt_ids, s.max_new_tokens, s.question_ids, s.stop_ids, s.sampling, s.min_new_tokens)
            for s in samples
        ]
        return list(engine.generate_batch(requests))

    def score(self, sample: Sample, output: Generation | Scored) -> dict[str, Any]:
        """One prediction row: whatever identifies the sample, the prediction, and its metric values."""
        raise NotImplementedError

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """The run's metrics; `primary_metric` must be among them."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def hub_data_missing(error: OSError, data_dir: str, dataset: str, local_file: str, example_dir: str) -> ConfigError:
    """The one-line error for hub data that is neither cached nor downloadable (offline: ConnectionError;
    no such dataset: FileNotFoundError), saying how to point the task at local files instead."""
    reason = " ".join([f"{type(error).__name__}:", *str(error).splitlines()[:1]])
    return ConfigError(
        "task.data_dir",
        data_dir,
        f"{dataset} is not cached here and could not be downloaded ({reason}); "
        f"pass task.data_dir=<folder holding {local_file}> (e.g. task.data_dir={example_dir})",
    )


# (record, its index, where it came from, the config key and value to blame) -> the task's record, or a
# ConfigError naming `where`.
Normalize = Callable[[Any, int, str, str, str], dict[str, Any]]


def jsonl_records(path: Path, data_dir: str, normalize: Normalize) -> tuple[list[dict[str, Any]], str]:
    """Every non-blank line of a local JSONL file through `normalize`, and the file's SHA-256 (part of a run's
    identity: a corrected file makes a new run). A line that is not JSON is a `ConfigError` on task.data_dir
    naming the file and line."""
    data = path.read_bytes()
    records = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError as error:  # JSONDecodeError or UnicodeDecodeError
            reason = getattr(error, "msg", str(error))
            raise ConfigError("task.data_dir", data_dir, f"{where} is not valid JSON: {reason}") from error
        records.append(normalize(record, len(records), where, "task.data_dir", data_dir))
    return records, hashlib.sha256(data).hexdigest()


def hub_records(rows: list[Any], dataset: str, normalize: Normalize) -> tuple[list[dict[str, Any]], str]:
    """Hub rows through `normalize`, and the SHA-256 of the rows as loaded, canonically serialized (any edit
    of the dataset changes it)."""
    canonical = json.dumps(rows, sort_keys=True, default=str, ensure_ascii=False)
    records = [
        normalize(row, index, f"{dataset} row {index}", "task.dataset", dataset) for index, row in enumerate(rows)
    ]
    return records, hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def file_or_hub_records(
    data_dir: str, data_file: str, hub: tuple[str, ...], split: str, example_dir: str, normalize: Normalize
) -> tuple[list[dict[str, Any]], str]:
    """A task's records and their SHA-256: `data_file` in `data_dir` (JSON lines), or without a folder the
    `split` of `hub` (the dataset's name, then its configuration if it has one) through `datasets`."""
    if data_dir:
        return jsonl_records(Path(data_dir) / data_file, data_dir, normalize)
    from datasets import load_dataset

    try:
        rows = list(load_dataset(*hub, split=split))
    except OSError as error:
        where = f"{hub[0]} ({', '.join([*hub[1:], f'split {split}'])})"
        raise hub_data_missing(error, data_dir, where, data_file, example_dir) from error
    return hub_records(rows, hub[0], normalize)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")

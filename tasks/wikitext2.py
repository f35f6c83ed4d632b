"""WikiText-2 perplexity (raw, test split), measured with the method's cache in effect.

Protocols:
- `stream` (default): the text is cut into consecutive windows of `prefix_tokens + continuation_tokens`.
  The prefix is prefilled (and compressed by the method); each continuation token is then predicted and
  fed through the cache one at a time, so evicted or quantized tokens shape every prediction (as
  StreamingLLM measures perplexity). Perplexity = exp(total NLL / continuation tokens).
- `sliding`: the usual number for the dense model: windows of `window` tokens every `stride` tokens, each
  scoring only the tokens past the previous window, no cache. Only meaningful for `method=full`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kvbench.cache import ModelSpec
from kvbench.engine import Engine, Measurement, Scored, perplexity
from kvbench.errors import require
from kvbench.method import Method
from kvbench.task import Sample, Task

LOCAL_FILE = "wiki.test.raw"


@dataclass
class WikiText2(Task):
    """`data_dir`: a folder with `wiki.test.raw`; empty loads `wikitext`/`wikitext-2-raw-v1` via `datasets`.
    `limit`: windows to evaluate in the stream protocol (0 = the whole text)."""

    data_dir: str = ""
    protocol: str = "stream"
    prefix_tokens: int = 1024
    continuation_tokens: int = 256
    window: int = 2048
    stride: int = 1024
    max_tokens: int = 0  # sliding protocol: score only the first N tokens (0 = all)
    limit: int = 4

    primary_metric: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.protocol in ("stream", "sliding"), "task.protocol", self.protocol, "stream or sliding")
        if self.data_dir:
            path = Path(self.data_dir) / LOCAL_FILE
            require(path.is_file(), "task.data_dir", self.data_dir, f"a folder containing {LOCAL_FILE}")
        require(self.prefix_tokens >= 1, "task.prefix_tokens", self.prefix_tokens, "an integer >= 1")
        require(
            self.continuation_tokens >= 2,
            "task.continuation_tokens",
            self.continuation_tokens,
            "an integer >= 2",
        )
        require(0 < self.stride <= self.window, "task.stride", self.stride, f"in (0, window={self.window}]")

    def check(self, model: ModelSpec, method: Method) -> None:
        if self.protocol == "sliding":
            require(
                not method.compresses,
                "task.protocol",
                self.protocol,
                "'stream' for a compressing method ('sliding' runs without a cache: use method=full)",
            )
            require(self.window <= model.max_positions, "task.window", self.window, f"<= {model.max_positions}")
        length = self.prefix_tokens + self.continuation_tokens
        require(
            length <= model.max_positions,
            "task.prefix_tokens",
            self.prefix_tokens,
            f"prefix + continuation <= the model's {model.max_positions} positions",
        )

    def text(self) -> str:
        if self.data_dir:
            return (Path(self.data_dir) / LOCAL_FILE).read_text(encoding="utf-8")
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "".join(rows)  # each row keeps its newline, so this is the raw test file

    def samples(self, tokenizer) -> Iterator[Sample]:
        ids = tokenizer(self.text(), add_special_tokens=False)["input_ids"]
        if self.protocol == "sliding":
            yield Sample("sliding", ids[: self.max_tokens] if self.max_tokens else ids)
            return
        size = self.prefix_tokens + self.continuation_tokens
        for index, start in enumerate(range(0, len(ids) - size + 1, size)):
            if self.limit and index >= self.limit:
                return
            window = ids[start : start + size]
            yield Sample(
                f"window{index}",
                window[: self.prefix_tokens],
                continuation_ids=window[self.prefix_tokens :],
                meta={"start_token": start},
            )

    def count(self) -> int | None:
        return 1 if self.protocol == "sliding" else (self.limit or None)

    def evaluate(self, engine: Engine, sample: Sample) -> Scored:
        if self.protocol == "sliding":
            nll, tokens = engine.sliding_window_nll(sample.prompt_ids, self.window, self.stride)
            return Scored(nll, tokens, Measurement(prompt_tokens=len(sample.prompt_ids)))
        return super().evaluate(engine, sample)

    def score(self, sample: Sample, output: Scored) -> dict[str, Any]:
        return {
            "id": sample.id,
            **sample.meta,
            "nll_sum": output.nll_sum,
            "tokens": output.tokens,
            "perplexity": perplexity(output.nll_sum, output.tokens),
        }

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        nll = sum(row["nll_sum"] for row in rows)
        tokens = sum(row["tokens"] for row in rows)
        return {"perplexity": perplexity(nll, tokens), "scored_tokens": float(tokens)}

"""WikiText-2 perplexity (raw, test split), measured with the method's cache in effect.

Text: the test split's rows joined by blank lines, `"\\n\\n".join(rows)`, as GPTQ, AWQ and QuaRot build it;
the hub path joins the `datasets` rows, the `data_dir` path rebuilds the same rows from the official
`wiki.test.raw` (one row per line, a blank line `" "` being the empty row), so both give the identical string.
It is tokenized once, with the tokenizer's own special tokens (a BOS first for Llama), as those papers do.

Protocols:
- `stream` (default): the text is cut into consecutive windows of `prefix_tokens + continuation_tokens`.
  The prefix is prefilled (and compressed by the method); each continuation token is then predicted and
  fed through the cache one at a time, so evicted or quantized tokens shape every prediction (as
  StreamingLLM measures perplexity). Perplexity = exp(total NLL / continuation tokens).
- `sliding`: the usual number for the dense model, no cache (`sliding_window_nll`). Only meaningful for
  `method=full`.

`limit` (stream) and `max_tokens` (sliding) evaluate a prefix of the text: such a run is a smoke test, and
its metrics say so (`smoke_test: 1`). `limit: 0` and `max_tokens: 0` score the whole test set.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kvbench.attention import SHARED_KV_KWARG
from kvbench.cache import ModelSpec
from kvbench.engine import Engine, Scored, perplexity
from kvbench.errors import ConfigError, require
from kvbench.method import Method
from kvbench.task import Sample, Task, hub_data_missing

LOCAL_FILE = "wiki.test.raw"
HUB_DATASET = ("wikitext", "wikitext-2-raw-v1")


def rows_of_raw_file(raw: str) -> list[str]:
    """The hub's rows from `wiki.test.raw`: each line with its newline, and the blank lines (a single space
    in the raw file) as the empty rows the hub has there."""
    lines = raw.split("\n")
    if lines[-1] == "":  # the file ends with a newline, which closes its last line
        lines.pop()
    return ["" if line == " " else line + "\n" for line in lines]


def join_rows(rows: Sequence[str]) -> str:
    """The evaluated text: rows joined by blank lines (`"\\n\\n".join(test["text"])` of GPTQ/QuaRot)."""
    return "\n\n".join(rows)


def window_spans(tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[begin, end) of each window of the sliding protocol.

    stride < window: windows start every `stride` tokens until one reaches the end (the last may be short).
    stride == window: consecutive whole windows; a shorter tail is dropped, as GPTQ-style code does."""
    if stride == window:
        return [(begin, begin + window) for begin in range(0, tokens - window + 1, window)]
    spans = []
    for begin in range(0, tokens, stride):
        spans.append((begin, min(begin + window, tokens)))
        if begin + window >= tokens:
            break
    return spans


def sliding_window_nll(engine: Engine, token_ids: Sequence[int], window: int, stride: int) -> tuple[float, int]:
    """(summed NLL, scored tokens) of dense forwards over `window_spans`, no kvbench cache.

    Each window scores the tokens no earlier window scored, and never its own first token (nothing precedes
    it there). With stride < window this is the HF perplexity guide's protocol: a window scores the tokens past
    the previous window's end, with the overlap as context, so every token but the text's first is scored once.
    With stride == window (GPTQ, QuaRot) each window scores its tokens from the 2nd on: window - 1 per window.
    """
    spans = window_spans(len(token_ids), window, stride)
    if not spans or spans[-1][1] < 2:
        raise ValueError(f"{len(token_ids)} tokens hold no window of {window} tokens to score")
    nll, counted, scored_end = 0.0, 0, 0
    for begin, end in spans:
        first = max(scored_end, begin + 1)  # first token this window scores
        ids = torch.tensor([token_ids[begin:end]], device=engine.device)
        with torch.inference_mode():  # no kvbench cache: plain causal attention (layers that share KV use the dict)
            logits = engine.model(input_ids=ids, use_cache=False, **{SHARED_KV_KWARG: {}}).logits[0]
        # Logit i predicts token i + 1 of the window.
        predictions = logits[first - begin - 1 : end - begin - 1].float()
        targets = ids[0, first - begin : end - begin]
        nll += float(torch.nn.functional.cross_entropy(predictions, targets, reduction="sum"))
        counted += targets.numel()
        scored_end = end
    return nll, counted


@dataclass
class WikiText2(Task):
    """`data_dir`: a folder with `wiki.test.raw`; empty loads `wikitext`/`wikitext-2-raw-v1` via `datasets`.
    `limit`: windows to evaluate in the stream protocol (0 = the whole text). `max_tokens`: the sliding
    protocol scores only the first N tokens (0 = all). Either one set makes the run a smoke test."""

    data_dir: str = ""
    protocol: str = "stream"
    prefix_tokens: int = 1024
    continuation_tokens: int = 256
    window: int = 2048
    stride: int = 1024
    max_tokens: int = 0
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
        require(
            self.max_tokens == 0 or self.max_tokens >= (self.window if self.stride == self.window else 2),
            "task.max_tokens",
            self.max_tokens,
            "0 (all) or enough for one window (stride == window: whole windows only)",
        )
        self._text: str | None = None

    def check(self, model: ModelSpec, method: Method) -> None:
        if self.protocol == "sliding":
            require(
                not method.compresses,
                "task.protocol",
                self.protocol,
                "'stream' for a compressing method ('sliding' runs without a cache: use method=full)",
            )
            require(self.window <= model.max_positions, "task.window", self.window, f"<= {model.max_positions}")
        else:
            require(
                self.prefix_tokens + self.continuation_tokens <= model.max_positions,
                "task.prefix_tokens",
                self.prefix_tokens,
                f"prefix + continuation <= the model's {model.max_positions} positions",
            )
        self.text()  # after the fit checks: missing data is reported before any weights load
        if self.smoke_test():
            print(f"kvbench: warning: wikitext2 smoke test, {self.scope()}", file=sys.stderr)

    def describe(self) -> dict[str, Any]:
        # The text's hash is part of the run's identity: a corrected data file makes a new run. Both sources
        # give the same text, hence the same hash.
        return {**super().describe(), "data_sha256": hashlib.sha256(self.text().encode("utf-8")).hexdigest()}

    # ----- data -----
    def text(self) -> str:
        """The evaluated text (see the module's docstring), read once."""
        if self._text is None:
            self._text = join_rows(self._file_rows() if self.data_dir else self._hub_rows())
        return self._text

    def _file_rows(self) -> list[str]:
        path = Path(self.data_dir) / LOCAL_FILE
        data = path.read_bytes()
        try:
            return rows_of_raw_file(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise ConfigError("task.data_dir", self.data_dir, f"{path} line {line} is not UTF-8") from error

    def _hub_rows(self) -> list[str]:
        from datasets import load_dataset

        try:
            return list(load_dataset(*HUB_DATASET, split="test")["text"])
        except OSError as error:
            dataset = "/".join(HUB_DATASET)
            raise hub_data_missing(error, self.data_dir, dataset, LOCAL_FILE, "../shared/data/wikitext2") from error

    def smoke_test(self) -> bool:
        """Whether only a prefix of the text is evaluated."""
        return bool(self.limit if self.protocol == "stream" else self.max_tokens)

    def scope(self) -> str:
        """What a smoke test scores, and how to score everything."""
        if self.protocol == "stream":
            windows = f"{self.limit} window{'s' if self.limit > 1 else ''}"
            scored = f"{windows} x {self.continuation_tokens} = {self.limit * self.continuation_tokens}"
            return f"scores only {scored} tokens (task.limit={self.limit}); task.limit=0 scores the whole test set"
        return f"scores only the first {self.max_tokens} tokens; task.max_tokens=0 scores the whole test set"

    # ----- samples -----
    def samples(self, tokenizer) -> Iterator[Sample]:
        # The tokenizer's own special tokens (Llama's BOS) open the text, as in GPTQ, QuaRot and the HF guide.
        ids = tokenizer(self.text())["input_ids"]
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
            nll, tokens = sliding_window_nll(engine, sample.prompt_ids, self.window, self.stride)
            return Scored(nll, tokens, None)  # dense forwards, no cache: nothing of the engine's to measure
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
        return {
            "perplexity": perplexity(nll, tokens),
            "scored_tokens": float(tokens),
            "smoke_test": float(self.smoke_test()),  # 1: a prefix of the test set, not a reportable number
        }

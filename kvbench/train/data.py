"""The training corpus: documents from local files or a `datasets` hub id, tokenized into one stream
(each document closed by the tokenizer's EOS), cut into pieces of `seq_len` tokens, every `val_every`-th
piece held out for validation. The order of training pieces is a pure function of (seed, step), so a
resumed run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from kvbench.errors import ConfigError, require
from kvbench.train.config import DataSettings

TEXT_SUFFIXES = (".txt", ".raw")
# Folders contribute these; a .json file (one object, or a list of objects) only when named itself.
FOLDER_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
# The harness's WikiText-2 evaluation text: training on it would make its perplexity meaningless.
EVALUATION_FILES = ("wiki.test.raw",)


def corpus_files(paths: list[str]) -> list[Path]:
    """The files `data.paths` names: files as given, folders by their .txt/.raw/.jsonl files (sorted, recursive)."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        require(path.exists(), "data.paths", entry, "existing files or folders (this one does not exist)")
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in FOLDER_SUFFIXES)
            require(bool(found), "data.paths", entry, f"a folder holding {', '.join(FOLDER_SUFFIXES)} files")
            files.extend(found)
        else:
            allowed = (*FOLDER_SUFFIXES, ".json")
            require(path.suffix in allowed, "data.paths", entry, f"files ending in {', '.join(allowed)}")
            files.append(path)
    for file in files:
        require(
            file.name not in EVALUATION_FILES,
            "data.paths",
            str(file),
            "no WikiText-2 test text: it is the harness's evaluation set",
        )
    return files


def _field(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ConfigError("data.text_field", text_field, f"a text field of every record ({where} has none)")
    return record[text_field]


def read_documents(path: Path, text_field: str) -> list[str]:
    """A .txt/.raw file is one document; a .jsonl line or a .json object is one, read from `text_field`."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in TEXT_SUFFIXES:
        return [text]
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError("data.paths", str(path), f"valid JSON ({error.msg}, line {error.lineno})") from None
        records = records if isinstance(records, list) else [records]
        return [_field(record, text_field, str(path)) for record in records]
    documents = []
    # JSON Lines are split on "\n" only: str.splitlines would also split at U+2028 and other separators,
    # which JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            allowed = f"valid JSON on every line (line {number}: {error.msg})"
            raise ConfigError("data.paths", str(path), allowed) from None
        documents.append(_field(record, text_field, f"{path}:{number}"))
    return documents


def hub_documents(data: DataSettings) -> list[str]:
    """The `text_field` column of a `datasets` split (`datasets` is imported only here)."""
    import datasets

    try:
        rows = datasets.load_dataset(data.hub_id, data.hub_config or None, split=data.split)
    except Exception as error:  # offline, unknown id or config, missing split: all end the same way
        raise ConfigError("data.hub_id", data.hub_id, f"a dataset `datasets` can load ({error})") from None
    require(
        data.text_field in rows.column_names,
        "data.text_field",
        data.text_field,
        f"a column of {data.hub_id}: {', '.join(rows.column_names)}",
    )
    return list(rows[data.text_field])


def documents(data: DataSettings) -> list[str]:
    if data.hub_id:
        return hub_documents(data)
    return [doc for path in corpus_files(data.paths) for doc in read_documents(path, data.text_field)]


def token_stream(docs: list[str], tokenizer, max_tokens: int = 0) -> torch.Tensor:
    """All documents as one int64 stream, each followed by the EOS token (so the model learns where text ends)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    texts = [doc for doc in docs if doc.strip()]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    for doc_ids in encoded:
        ids.extend(doc_ids)
        ids.append(eos)
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[: max_tokens or None], dtype=torch.int64)


@dataclass
class Pieces:
    """Pieces of `seq_len` tokens: [N, seq_len] for training, [M, seq_len] held out."""

    train: torch.Tensor
    val: torch.Tensor


def split_pieces(stream: torch.Tensor, seq_len: int, val_every: int) -> Pieces:
    """Cut the stream into whole pieces (the tail shorter than a piece is dropped); every `val_every`-th
    piece is held out, so the validation text is spread over the whole corpus, disjoint from training."""
    count = len(stream) // seq_len
    pieces = stream[: count * seq_len].view(count, seq_len)
    held_out = torch.arange(count) % val_every == val_every - 1
    return Pieces(train=pieces[~held_out].contiguous(), val=pieces[held_out].contiguous())


def load_pieces(data: DataSettings, tokenizer, seq_len: int) -> Pieces:
    """The corpus `data` names as training and validation pieces; too little text is bad input."""
    stream = token_stream(documents(data), tokenizer, data.max_tokens)
    key, value = ("data.hub_id", data.hub_id) if data.hub_id else ("data.paths", data.paths)
    needed = data.val_every * seq_len  # one validation piece and val_every - 1 training pieces
    require(
        len(stream) >= needed,
        key,
        value,
        f"a corpus of at least data.val_every x train.seq_len = {needed} tokens (it has {len(stream)})",
    )
    return split_pieces(stream, seq_len, data.val_every)


class BatchOrder:
    """Which training pieces each micro-batch takes: epoch after epoch, each a permutation of all pieces
    seeded by (seed, epoch). Sample g of the run is piece perm(g // N)[g % N], so the batches depend only
    on the seed and the step, never on what ran before (resume draws the same ones)."""

    def __init__(self, num_pieces: int, seed: int) -> None:
        self.num_pieces, self.seed = num_pieces, seed

    @lru_cache(maxsize=2)  # noqa: B019 (one order per run; the cache dies with it)
    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_pieces, generator=generator)

    def indices(self, first_sample: int, count: int) -> torch.Tensor:
        samples = range(first_sample, first_sample + count)
        return torch.stack([self._permutation(g // self.num_pieces)[g % self.num_pieces] for g in samples])

    def micro_batch(self, step: int, micro: int, batch: int, grad_accum: int) -> torch.Tensor:
        """Piece indices of micro-batch `micro` of optimizer step `step` (0-based)."""
        return self.indices((step * grad_accum + micro) * batch, batch)

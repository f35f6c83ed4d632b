"""Checkpoints and the loss log of a training run in `out_dir`.

`out_dir/checkpoint/` is what `model=hf model.path=out_dir/checkpoint` loads (safetensors, config with
`kvbench_kv_sharing`, tokenizer) plus `trainer_state.pt` (step, optimizer, RNG states, elapsed time, the
config). It is written whole into a temporary folder first and then swapped in by two renames; a kill
between them leaves `checkpoint.prev`, which the next load takes back. `loss.jsonl` has one line per
optimizer step; on resume it is cut back to the checkpoint's step, so each step appears once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"  # the settings that produced the checkpoint, readable without torch
LOSS_LOG = "loss.jsonl"


def checkpoint_dir(out_dir: Path) -> Path:
    """The checkpoint folder, after taking back one a kill left half-swapped."""
    current, previous = out_dir / CHECKPOINT, out_dir / f"{CHECKPOINT}.prev"
    if not current.exists() and previous.exists():
        os.replace(previous, current)
    return current


def has_checkpoint(out_dir: Path) -> bool:
    return (checkpoint_dir(out_dir) / TRAINER_STATE).is_file()


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    out_dir: Path, model: PreTrainedModel, tokenizer, state: dict[str, Any], config: dict[str, Any]
) -> Path:
    """Write model, tokenizer (if any), trainer `state` and `config` to a temporary folder, then swap it in."""
    final, previous = checkpoint_dir(out_dir), out_dir / f"{CHECKPOINT}.prev"
    staging = out_dir / f".{CHECKPOINT}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    torch.save(state, staging / TRAINER_STATE)
    (staging / TRAIN_CONFIG).write_text(json.dumps(config, indent=1))
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def saved_config(out_dir: Path) -> dict[str, Any]:
    return json.loads((checkpoint_dir(out_dir) / TRAIN_CONFIG).read_text())


def load_checkpoint(out_dir: Path, model: PreTrainedModel) -> dict[str, Any]:
    """Load the checkpoint's weights into `model` and return its trainer state."""
    folder = checkpoint_dir(out_dir)
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # save_pretrained stores a tied output head once, as the embedding.
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{folder} does not match the model: missing {missing}, unexpected {unexpected}")
    return torch.load(folder / TRAINER_STATE, weights_only=True)


def read_loss_log(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / LOSS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cut_loss_log(out_dir: Path, through_step: int) -> None:
    """Keep the lines of steps up to `through_step` (the checkpoint's): those after it are redone."""
    kept = [row for row in read_loss_log(out_dir) if row["step"] <= through_step]
    staging = out_dir / f".{LOSS_LOG}.tmp"
    staging.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(staging, out_dir / LOSS_LOG)


def append_loss(out_dir: Path, row: dict[str, Any]) -> None:
    with open(out_dir / LOSS_LOG, "a") as log:
        log.write(json.dumps(row) + "\n")

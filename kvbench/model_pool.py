"""One loaded model per worker process, reused by the runs of a sweep that share its config.

Hydra's basic launcher runs a sweep's jobs one after another in one process, and a joblib worker runs
many jobs too: without this, every method and budget would load the same weights again (seconds on a
CPU for the embedded model, minutes for an 8B model from disk). Nothing in a run changes the model (the
method lives in the cache object the engine builds per generation), so one copy serves them all.

Only the most recent model is kept: a sweep over several models frees one before the next loads, so the
peak memory of a run is what it was without the pool.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvbench.models import ModelConfig

Loader = Callable[["ModelConfig"], tuple[Any, Any]]


@dataclass
class Loaded:
    """A model and tokenizer, how long loading them took, and whether this call reused them."""

    model: Any
    tokenizer: Any
    load_s: float  # seconds the load took when it happened (0 is never recorded: a load takes time)
    reused: bool


_key: str | None = None
_loaded: Loaded | None = None


def model_key(cfg: ModelConfig) -> str:
    """Every field of the model config: two runs share a model only if they would load the same one."""
    return repr(sorted(asdict(cfg).items()))


def get(cfg: ModelConfig, load: Loader) -> Loaded:
    """The model for `cfg`: the one kept from the previous run if its config is the same, else `load(cfg)`."""
    global _key, _loaded
    key = model_key(cfg)
    if _loaded is not None and _key == key:
        return Loaded(_loaded.model, _loaded.tokenizer, _loaded.load_s, reused=True)
    release()
    began = time.perf_counter()
    model, tokenizer = load(cfg)
    _key, _loaded = key, Loaded(model, tokenizer, time.perf_counter() - began, reused=False)
    return _loaded


def release() -> None:
    """Drop the kept model (and its device memory) before another loads."""
    global _key, _loaded
    had_model = _loaded is not None
    _key, _loaded = None, None
    if not had_model:
        return
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

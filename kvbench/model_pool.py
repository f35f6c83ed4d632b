"""One loaded model per worker process, reused by the runs of a sweep that share its config, and the next
model of the sweep read into host memory while the current one's runs go on.

Hydra's basic launcher runs a sweep's jobs one after another in one process, and a joblib worker runs
many jobs too: without this, every method and budget would load the same weights again (seconds on a
CPU for the embedded model, minutes for an 8B model from disk). Nothing in a run changes the model (the
method lives in the cache object the engine builds per generation), so one copy serves them all.

Prefetch (WarmServe's prewarming, applied to a sweep): when a later job of the sweep uses another model, a
background thread loads that model on the CPU (host memory) while the current model's runs go on; the
run that needs it takes it, moved to its device, instead of loading. At most one model is prefetched, so host
memory holds at most two models: the current one (on a GPU, only its device copy) and the next. A failed
prefetch fails no run: the run that needs the model loads it as if nothing had been prefetched.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvbench.models import ModelConfig

Loader = Callable[["ModelConfig"], tuple[Any, Any]]


@dataclass
class Loaded:
    """A model and tokenizer, how long getting them took, and whether this call reused or prefetched them."""

    model: Any
    tokenizer: Any
    load_s: float  # seconds the run waited for its model (load, or prefetch wait + move to the device)
    reused: bool
    prefetched: bool = False  # taken from a background read started during an earlier run
    prefetch_wait_s: float = 0.0  # of load_s: waiting for the background read to finish
    prefetch_s: float = 0.0  # the background read's own duration (mostly hidden behind earlier runs)
    prefetch_error: str | None = None  # why a prefetch of this model was not used (then it loaded here)


@dataclass
class _Prefetch:
    """A model being read into host memory by a background thread; `done` is set when it ends either way."""

    key: str
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    model: Any = None
    tokenizer: Any = None
    read_s: float = 0.0
    error: str | None = None


_key: str | None = None
_loaded: Loaded | None = None
_prefetch: _Prefetch | None = None


def model_key(cfg: ModelConfig) -> str:
    """Every field of the model config: two runs share a model only if they would load the same one."""
    return repr(sorted(asdict(cfg).items()))


def get(cfg: ModelConfig, load: Loader) -> Loaded:
    """The model for `cfg`: the one kept from the previous run if its config is the same, the prefetched one
    if it was read ahead, else `load(cfg)`."""
    global _key, _loaded
    key = model_key(cfg)
    if _loaded is not None and _key == key:
        return dataclasses.replace(_loaded, reused=True, prefetched=False, prefetch_wait_s=0.0, prefetch_s=0.0)
    release(keep_prefetch=True)
    _keep_this_worker()
    began = time.perf_counter()
    taken, error = _take_prefetch(key, cfg)
    if taken is not None:
        model, tokenizer, wait_s, read_s = taken
        _key, _loaded = key, Loaded(model, tokenizer, time.perf_counter() - began, False, True, wait_s, read_s)
        return _loaded
    model, tokenizer = load(cfg)
    _key, _loaded = key, Loaded(model, tokenizer, time.perf_counter() - began, reused=False, prefetch_error=error)
    return _loaded


def prefetch(cfg: ModelConfig | None, load: Loader) -> bool:
    """Start reading `cfg`'s model into host memory in a background thread, unless it is the kept model,
    already prefetched, or a random-weight shape model. Returns whether a read started.

    Shape models are made, not read: their random init draws from torch's global generator, which the run
    in progress also uses (sampling), so initializing one in another thread would change both.
    """
    global _prefetch
    if cfg is None or cfg.source == "shape":
        return False
    key = model_key(cfg)
    if key == _key or (_prefetch is not None and _prefetch.key == key):
        return False
    try:
        host_cfg = _host_config(cfg)
    except Exception as error:  # e.g. a device this machine lacks: the next run reports it, not this one
        print(f"kvbench: not prefetching model {_describe(cfg)} ({error})", file=sys.stderr, flush=True)
        return False
    _drop_prefetch()  # one model ahead at most: a guess that was not taken gives way to the new one
    _keep_this_worker()
    _prefetch = _Prefetch(key)
    print(f"kvbench: reading model {_describe(cfg)} into host memory for a later run", file=sys.stderr, flush=True)
    threading.Thread(target=_read, args=(_prefetch, host_cfg, load), name="kvbench-prefetch", daemon=True).start()
    return True


def release(keep_prefetch: bool = False) -> None:
    """Drop the kept model (and its device memory) before another loads; the prefetched one too unless kept."""
    global _key, _loaded
    had_model = _loaded is not None
    _key, _loaded = None, None
    if not keep_prefetch:
        _drop_prefetch()
    if not had_model:
        return
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _keep_this_worker() -> None:
    """Lift joblib's leak guard in this process. A loky worker shuts itself down once its memory has grown
    by 300 MB since its first job, and the worker replacing it starts empty: a prefetched model (or memory
    a model switch left with the allocator) would trigger it and cost both models. The pool holds at most
    two models: bounded, not a leak. (A module constant of loky's, read at each check; absent: no-op.)"""
    loky = sys.modules.get("joblib.externals.loky.process_executor")
    if loky is not None and hasattr(loky, "_MAX_MEMORY_LEAK_SIZE"):
        loky._MAX_MEMORY_LEAK_SIZE = sys.maxsize


def _describe(cfg: ModelConfig) -> str:
    return f"{cfg.name} ({cfg.path})" if cfg.path else cfg.name


def _host_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` loaded on the CPU in the dtype its own device would get (`auto` means bf16 on a GPU)."""
    from kvbench.models import resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    return dataclasses.replace(cfg, device="cpu", dtype=str(dtype).removeprefix("torch."))


def _read(job: _Prefetch, host_cfg: ModelConfig, load: Loader) -> None:
    began = time.perf_counter()
    try:
        job.model, job.tokenizer = load(host_cfg)
    except Exception as error:  # any failure only means that the run needing this model loads it itself
        job.error = f"{type(error).__name__}: {error}"
    job.read_s = time.perf_counter() - began
    job.done.set()


def _take_prefetch(key: str, cfg: ModelConfig) -> tuple[tuple[Any, Any, float, float] | None, str | None]:
    """The prefetched model for `key` on `cfg`'s device (with the wait and read seconds), or None and why."""
    global _prefetch
    job = _prefetch
    if job is None or job.key != key:
        return None, None
    _prefetch = None
    waited = time.perf_counter()
    job.done.wait()
    wait_s = time.perf_counter() - waited
    error = job.error
    if error is None:
        try:
            from kvbench.models import resolve_device

            model = job.model.to(resolve_device(cfg.device))
            return (model, job.tokenizer, wait_s, job.read_s), None
        except Exception as move_error:
            error = f"moving it to {cfg.device}: {type(move_error).__name__}: {move_error}"
            job.model = None
            gc.collect()
    print(f"kvbench: prefetching model {_describe(cfg)} failed ({error}); loading it now", file=sys.stderr, flush=True)
    return None, error


def _drop_prefetch() -> None:
    """Forget the prefetched model; a read still going is waited for, so no third model ever builds up."""
    global _prefetch
    job, _prefetch = _prefetch, None
    if job is not None:
        job.done.wait()
        job.model = job.tokenizer = None

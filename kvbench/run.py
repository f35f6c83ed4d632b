"""One run: validate -> load model -> build method -> task samples -> engine -> score -> record."""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from kvbench import model_pool
from kvbench.config import RunConfig, build, check_results_dir, next_sweep_model
from kvbench.models import load_model, model_spec, resolve_device
from kvbench.records import PREDICTIONS, RECORD, environment, read_record, run_dir, write_json_atomic

# The engine (torch, transformers) is imported in `execute`, once the config passed: the CLI imports this
# module before it knows whether the input is good.
if TYPE_CHECKING:
    import torch

    from kvbench.cache import ModelSpec
    from kvbench.engine import Measurement

# Settings left out of a run's identity: where it is written and how failures are handled do not change
# its result; `prefill_chunk` is in under its own key; `warmup` stays out so runs recorded before this list
# keep their directories. Any other setting (a new one too) defines the run: better a needless rerun than
# a wrong skip.
NOT_IDENTITY = ("results_dir", "prefill_chunk", "warmup", "retry_errors", "debug", "prefetch_next_model")
RETRY_HINT = "kvbench.retry_errors=true"


def identity(config: RunConfig) -> dict[str, Any]:
    """What defines a run's result (not where it is written, nor debug switches)."""
    settings = {k: v for k, v in asdict(config.settings).items() if k not in NOT_IDENTITY}
    if settings["engine"] != "compiled":  # it changes nothing elsewhere; out, earlier runs keep their directories
        settings.pop("compile_scope")
    if not settings["inductor_options"]:  # added later: out when empty, so earlier runs keep their directories
        settings.pop("inductor_options")
    return {
        "names": config.names,
        "model": asdict(config.model),
        "method": config.method.describe(),
        "task": config.task.describe(),
        "prefill_chunk": config.settings.prefill_chunk,
        **settings,
    }


def batched(samples: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` samples (the last may be shorter)."""
    batch: list[Any] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def summarize(measurements: list[Measurement], device: torch.device) -> dict[str, Any]:
    """Run-level measurements from per-sample ones (means, and maxima where a peak matters).

    Every sample of a decode batch carries the batch's decode time and steps, so batch-level times are
    counted once per batch (each sample contributes 1 / batch_size of them).
    """
    count = max(len(measurements), 1)
    prefilled = [m for m in measurements if not m.prefill_shared]
    decode_s = sum(m.decode_s / m.batch_size for m in measurements)
    steps = sum(m.decode_steps / m.batch_size for m in measurements)
    tokens = sum(m.decode_tokens for m in measurements)
    device_bytes = sum(m.kv_bytes_device for m in measurements)
    dense_bytes = sum(m.dense_kv_bytes for m in measurements)
    summary = {
        "samples": len(measurements),
        "path": ",".join(sorted({m.engine for m in measurements})) or None,
        "batch_size_max": max((m.batch_size for m in measurements), default=0),
        "prompt_tokens_mean": sum(m.prompt_tokens for m in measurements) / count,
        "prompt_tokens_max": max((m.prompt_tokens for m in measurements), default=0),
        # per sequence prefilled: a sample whose identical request was prefilled for it took none
        "prefill_s_mean": sum(m.prefill_s for m in prefilled) / max(1, len(prefilled)),
        "decode_ms_per_token": 1000 * decode_s / steps if steps else None,  # per decode step of a batch
        "decode_tokens_per_s": tokens / decode_s if decode_s > 0 else None,  # over the batch
        "compile_s": sum(m.compile_s / m.batch_size for m in measurements),
        "kv_bytes_device": device_bytes / count,
        "kv_bytes_device_max": max((m.kv_bytes_device for m in measurements), default=0),
        "kv_bytes_device_peak": max((m.kv_bytes_device_peak for m in measurements), default=0),
        "kv_bytes_host": sum(m.kv_bytes_host for m in measurements) / count,
        "dense_kv_bytes": dense_bytes / count,
        "compression_ratio": dense_bytes / device_bytes if device_bytes else None,
        "peak_memory_bytes": max((m.peak_memory_bytes for m in measurements), default=0),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
    }
    if not measurements:  # a task scored without the engine (WikiText-2's sliding windows): nothing measured
        return dict.fromkeys(summary) | {"samples": 0}
    return summary


def execute(config: RunConfig, spec: ModelSpec, directory: Path) -> dict[str, Any]:
    """Load, generate, score. Returns the record's result fields; exceptions propagate to `run`."""
    from kvbench.engine import Engine, Generation

    settings = config.settings
    # The model kept from the sweep's previous run when it has the same config (`load_model` looked up
    # here, at call time, so tests can replace it).
    loaded = model_pool.get(config.model, load_model)
    if settings.prefetch_next_model:  # the sweep's next model, read in the background while this one runs
        model_pool.prefetch(next_sweep_model(), load_model)
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = Engine.for_run(model, tokenizer, config.method, spec, settings)
    if settings.warmup:
        engine.warmup()
    rows, measurements = [], []
    method_stats: dict[str, float] = {}
    # The bar as a context manager: closed (its line ended) before an exception or Ctrl-C is reported.
    with (
        open(directory / PREDICTIONS, "w") as predictions,
        tqdm(total=config.task.count(), desc=directory.name) as progress,
    ):
        for batch in batched(config.task.samples(tokenizer), settings.batch_size):
            for sample, output in zip(batch, config.task.evaluate_batch(engine, batch), strict=True):
                m = output.measurement
                row = config.task.score(sample, output)
                if isinstance(output, Generation):
                    row["generated_tokens"] = len(output.token_ids)
                if m is not None:
                    row.update({f"m_{k}": v for k, v in asdict(m).items() if k != "method_stats"})
                    measurements.append(m)
                    for key, value in m.method_stats.items():
                        method_stats[key] = method_stats.get(key, 0) + value
                predictions.write(json.dumps(row, default=str) + "\n")
                predictions.flush()
                rows.append(row)
            progress.update(len(batch))
            progress.set_postfix(config.task.aggregate(rows), refresh=False)
    summary = summarize(measurements, engine.device) | {"samples": len(rows)}
    summary["model_reused"] = loaded.reused
    summary["model_load_s"] = 0.0 if loaded.reused else loaded.load_s  # what this run spent loading
    summary["model_prefetched"] = loaded.prefetched  # read in the background during earlier runs
    summary["model_prefetch_wait_s"] = loaded.prefetch_wait_s  # of model_load_s: waiting for that read
    summary["model_prefetch_s"] = loaded.prefetch_s  # that read's own duration
    summary["model_prefetch_error"] = loaded.prefetch_error  # a prefetch that failed (then loaded here)
    return {"metrics": config.task.aggregate(rows), "measurements": summary, "method_stats": method_stats}


def run(cfg: DictConfig, names: dict[str, str] | None = None) -> Path:
    """Run one configuration unless a complete record for it exists. Returns the run directory."""
    config = build(cfg, names)
    spec = model_spec(config.model)  # the model's config only: no weights load before every check passed
    config.method.check(spec)
    config.task.check(spec, config.method)
    device = resolve_device(config.model.device)
    check_results_dir(config.settings.results_dir)
    directory = run_dir(config.settings.results_dir, config.names, identity(config))
    previous = read_record(directory)
    if previous and previous["status"] == "ok":
        print(f"kvbench: complete already, skipping: {directory}")
        print_summary(previous, directory)  # its results, as when it ran
        return directory
    if previous and not config.settings.retry_errors:
        print(
            f"kvbench: failed before ({previous['status']}: {previous['error']}), skipping: {directory}; "
            f"pass {RETRY_HINT} to retry",
            file=sys.stderr,
        )
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    record: dict[str, Any] = {
        **config.names,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "method_params": config.method.describe(),
        "task_params": config.task.describe(),
        "primary_metric": config.task.primary_metric,
        "higher_is_better": config.task.higher_is_better,
        "environment": environment(device),
        "started_at": datetime.now(timezone.utc).isoformat(),
        "warnings": [],
    }
    began = time.perf_counter()
    try:
        record.update(execute(config, spec, directory), status="ok", error=None)
    except KeyboardInterrupt:
        raise  # no record: the run stays incomplete and a rerun redoes it
    except Exception as error:
        if config.settings.debug:
            raise
        import torch

        oom = isinstance(error, torch.OutOfMemoryError)
        record.update(status="oom" if oom else "error", error=f"{type(error).__name__}: {error}")
        record["traceback"] = traceback.format_exc()
    if record["status"] == "ok":
        note_compression(record, config.method.compresses)
    record["wall_s"] = time.perf_counter() - began
    record["finished_at"] = datetime.now(timezone.utc).isoformat()
    write_json_atomic(directory / RECORD, record)
    print_summary(record, directory)
    return directory


def note_compression(record: dict[str, Any], compresses: bool) -> None:
    """Record whether the cache held fewer device bytes than a dense one, and warn when a compressing
    method did not: a budget at or above the context keeps every token, and the run silently measures a
    full cache at 1.00x."""
    m = record["measurements"]
    if m.get("kv_bytes_device") is None:  # nothing measured
        return
    m["compressed"] = m["kv_bytes_device"] < m["dense_kv_bytes"]
    if compresses and not m["compressed"]:
        params = record.get("method_params") or {}
        if params.get("storage") == "simulated":  # quantize-dequantize into float buffers: float bytes, by design
            why = "its storage is simulated (codes dequantized into float buffers)"
        elif "budget" in params:
            why = f"its budget is probably at or above the context (prompts up to {m['prompt_tokens_max']} tokens)"
        else:
            why = "at these settings it keeps as many bytes as a dense cache"
        record["warnings"].append(
            f"{record['method']} compressed nothing: device KV bytes ({_human_bytes(m['kv_bytes_device'])}) "
            f"reach the dense cache's ({_human_bytes(m['dense_kv_bytes'])}); {why}"
        )


def _human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def print_summary(record: dict[str, Any], directory: Path) -> None:
    title = f"{record['task']} | {record['model']} | {record['method']} | status: {record['status']}"
    lines = [title, "-" * len(title)]
    if record["status"] != "ok":
        lines.append(f"error: {record['error']}")
    for name, value in (record.get("metrics") or {}).items():
        lines.append(f"{name:<28}{value:.4g}" if isinstance(value, float) else f"{name:<28}{value}")
    m = record.get("measurements") or {}
    if m.get("kv_bytes_device") is not None:
        lines += [
            f"{'kv bytes (device, mean)':<28}{_human_bytes(m['kv_bytes_device'])}",
            f"{'kv bytes (host, mean)':<28}{_human_bytes(m['kv_bytes_host'])}",
            f"{'dense kv bytes (mean)':<28}{_human_bytes(m['dense_kv_bytes'])}",
            f"{'compression (measured)':<28}{m['compression_ratio'] or 0:.2f}x",
            f"{'prefill s (mean)':<28}{m['prefill_s_mean']:.3f}",
            f"{'decode ms/step':<28}{m['decode_ms_per_token'] or 0:.1f} ({m['path']}, batch {m['batch_size_max']})",
            f"{'decode tokens/s':<28}{m['decode_tokens_per_s'] or 0:.1f}",
            f"{'peak memory':<28}{_human_bytes(m['peak_memory_bytes'])} ({m['peak_memory_kind']})",
        ]
    elif m:
        lines.append(f"{'measurements':<28}none: the task scored its samples without the engine's cache")
    lines += [f"warning: {warning}" for warning in record.get("warnings", [])]
    lines.append(f"run directory: {directory}")
    if record["status"] != "ok":
        lines.append(f"a rerun skips this failed run: pass {RETRY_HINT} to retry it")
    print("\n".join(lines))

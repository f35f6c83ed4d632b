"""Decode speed and memory of every method on real-shape models, through the engine's static-shape path.

    PYTHONPATH=. python benchmarks/speed.py --out speed.jsonl                  # the full sweep (one H100)
    PYTHONPATH=. python benchmarks/speed.py --quick --out speed.jsonl          # one shape, 8k, batch 1

Random bf16 weights (costs do not depend on them), random prompt token ids, `--new-tokens` greedy tokens
(stop tokens refused, so every sequence runs the same number of steps). A batch's sequences share one
random prompt, which the engine prefills once and copies into each sequence's cache
(`Measurement.prefill_shared`): a decode step reads the bytes distinct prompts would (each sequence its
own copy), though every sequence makes the same data-dependent choices, and a batch of 64 at 32k no longer
spends minutes prefilling; `--distinct-prompts` gives each sequence its own (benchmarks/README.md, "One
prompt a batch"). Per row: prefill seconds per sequence prefilled
(`prefills` of them), decode ms per step (CUDA events, after compile/capture/warm-up, which are reported
apart), tokens/s over the batch, measured KV bytes on the device and host, the allocator's peak, and the
floor: (weight bytes read per step + the bytes the method's decode reads) / measured copy bandwidth. A
method's decode reads every tensor its cache holds on the device (keys, values, positions, scores,
digests), a layer sharing another's keys and values reads them again (CLA), and scoring methods read the
keys a second time for the attention each slot received (`cache_bytes_read`). A method that reads from host
memory in its step (ArkVale's recalls: `host_bytes_read` in its stats) has a second floor, those bytes over the
measured pinned host-to-device bandwidth (`host_floor_ms`); `floor_with_host_ms` is the larger of the two (the
bound if recalls overlapped compute perfectly, as the paper's side stream aims to) and `x_floor_with_host` the
step against it. Writes (ArkVale's per-token backup to host, the recalled rows into device memory) are not
counted, so both stay lower bounds.

Batch `max` (in `--batches` or a row's BATCH): the largest batch predicted to fit, from the batch-1 row of the
same method and context (run first if the plan has none): each sequence adds its measured cache bytes to
everything else in that row's allocator peak, within 92% of the device's memory, of the host's available
memory for host backups (ArkVale), of `--kv-limit-gib` if given (the paper's KV pool) and of `--batch-limit`
(64: a tiny cache would otherwise ask for hundreds of sequences, each prefilled on its own under
`--distinct-prompts`). A batch that still
runs out of memory is retried at 85% of its size, twice at most; the row's `largest_batch` says what was
predicted, what bounded it and what was tried.

A row that runs out of time is a row too: past `--row-time-limit-s`, or when the process is told to stop
(SIGTERM, as `timeout` sends), the row in progress is written with status "timeout" or "terminated", its
elapsed seconds and `where`, the innermost frames it was in (compiling, prefilling or decoding), and a
terminated run starts no new row. A GPU session's device time is short: a row cut off still says where
the time went. A time-out can strike inside torch's own Python code and leave the process unable to run
any torch operation (`torch_fails`): then the run starts no new row either and exits with an error.

A grid longer than one GPU session runs in parts: `--resume` skips every row of the plan that `--out`
already holds from the same commit, device and settings (`run_settings`), finished (`finishes`): "ok", or
out of memory (batch `max`: on every size it tried, or not even one sequence fits); errors, time-outs and
terminated rows run again. Each run starts no new row after `--time-limit-s` and says how many rows of the
plan are left.

Imports only torch, transformers and kvbench (the GPU machine has no hydra or datasets). One JSON line per
row to `--out`, with device, versions and commit, its plan entry (`run`, as `--runs` writes it) and the run's
`settings`; a table at the end.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import signal
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

import kvbench
import kvbench.methods
import kvbench.tasks
from kvbench import kernels, quant_kernels
from kvbench.cache import ModelSpec
from kvbench.engine import Engine, Request, Timer, parse_inductor_options
from kvbench.errors import ConfigError
from kvbench.method import Method
from kvbench.methods.arkvale import ArkVale
from kvbench.methods.cla import CLA
from kvbench.methods.full import Full
from kvbench.methods.h2o import H2O
from kvbench.methods.kivi import KIVI
from kvbench.methods.quarot import QuaRot
from kvbench.methods.scissorhands import Scissorhands
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.snapstream import SnapStream
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.methods.zipcache import ZipCache
from kvbench.models import ModelConfig, load_model, model_spec
from kvbench.records import environment

# What a row's `size` means: tokens per layer and KV head for eviction methods, bits per element for the
# quantizers, layers per KV group for CLA; `full` and ZipCache (its paper's 4/2 bits, 40% low) take none.
SIZED_BY = {
    "full": None,
    "streamingllm": "budget",
    "snapkv": "budget",
    "h2o": "budget",
    "arkvale": "budget",
    "scissorhands": "budget",
    "snapstream": "budget",
    "kivi": "bits",
    "quarot": "bits",
    "rtn": "bits",
    "zipcache": None,
    "cla": "sharing",
}
# Methods that read the keys a second time each step for the attention every slot received.
READS_KEYS_TWICE = {"h2o", "scissorhands"}


def cache_bytes_read(method_name: str, method: Method, spec: ModelSpec, stored: int) -> int:
    """The cache bytes a decode step reads, of the `stored` bytes the cache holds on the device: each layer
    reads the keys and values of the layer it attends over (`Method.kv_producer`), so a producer's are read
    once for itself and once for each layer sharing them (CLA: a cache half the size, read as often as the
    dense one); methods that score by received attention read the keys once more (keys are half of K + V).
    Every storing layer holds the same bytes (a sharing method's producers are alike)."""
    producers = [method.kv_producer(idx, spec) for idx in range(spec.num_layers)]
    read = stored * len(producers) // len(set(producers))
    if method_name in READS_KEYS_TWICE:
        read += read // 2
    return read


# Where a row's `compile_s` goes, from torch's own compile timers (`torch._dynamo.utils.compilation_time_metrics`,
# seconds per event, nested): Dynamo's whole compile of a frame, the backend it calls, Inductor inside that, and
# Inductor's wait for its kernels (Triton's compiles in worker processes).
COMPILE_TIMERS = {
    "dynamo": "_compile.compile_inner",
    "backend": "OutputGraph.call_user_compiler",
    "inductor": "compile_fx_inner",
    "kernels": "async_compile.wait",
}


def compile_parts(compile_s: float) -> dict[str, float | int]:
    """A row's compile seconds by part, from torch's compile timers, which hold this row's compiles only
    (`torch._dynamo.reset`, at the row's start and the engine's, clears them): `graphs` (frames Dynamo
    compiled); `trace_s` (Dynamo's tracing and guards: its compile without the backend), `backend_s`
    (AOTAutograd and Inductor, or their on-disk caches) and `outside_s` (the rest of `compile_s`: the warm-up
    steps, Inductor's first-call autotuning among them, and the CUDA-graph captures), which sum to `compile_s`;
    and within `backend_s`, `inductor_s` (Inductor's compile, its wait for kernels included; absent where its
    cache served the graph) and `kernel_compile_s` (that wait: Triton's compiles in worker processes, or their
    loading from the cache). A timer torch does not have counts as zero; a difference below zero (float
    rounding) as zero."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    total = {part: sum(metrics.get(name, [])) for part, name in COMPILE_TIMERS.items()}
    return {
        "graphs": len(metrics.get(COMPILE_TIMERS["dynamo"], [])),
        "trace_s": max(0.0, total["dynamo"] - total["backend"]),
        "backend_s": total["backend"],
        "outside_s": max(0.0, compile_s - total["dynamo"]),
        "inductor_s": total["inductor"],
        "kernel_compile_s": total["kernels"],
    }


MAX_BATCH = 0  # a plan's batch 0: the largest batch that fits (`largest_batch`)
MEMORY_MARGIN = 0.92  # share of device (or available host) memory a predicted batch may fill: allocator slack
RETRY_SHRINK, RETRIES = 0.85, 2  # a predicted batch that runs out of memory is retried this much smaller


class CutOff(BaseException):
    """A row stopped from outside. A BaseException, so that no `except Exception` on the way (Inductor's
    autotuning, the engine's, transformers') swallows it before the row in progress is written (the timer
    fires once: a swallowed cut-off would leave the row without a limit), and dynamo passes it through
    unwrapped (an Exception raised while it traces comes back as InternalTorchDynamoError)."""


class RowTimeout(CutOff):
    """The row ran past `--row-time-limit-s`."""


class Terminated(CutOff):
    """The process was told to stop (SIGTERM)."""


def terminate(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


@contextmanager
def row_deadline(seconds: float | None) -> Iterator[None]:
    """Raise RowTimeout in the main thread once `seconds` have passed (Python code runs the handler at its
    next bytecode: Inductor's compile and the engine's loops are Python, a kernel launch returns at once)."""
    if not seconds:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise RowTimeout(f"row time limit of {seconds:g} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def largest_batch(
    one: dict, device_bytes: int, host_bytes: int, kv_limit_bytes: int | None, batch_limit: int
) -> tuple[int, str]:
    """(batch, what bounds it) predicted from `one`, a batch-1 row of the same method and context.

    Each sequence of a batch adds its cache: `kv_bytes_device` on the device, `kv_bytes_host` on the host.
    Everything else in the row's allocator peak stays as it is: weights, one sequence's prefill (a method
    holds the whole prompt until it compresses; the engine prefills one sequence at a time), the step's
    workspace."""
    per_sequence, host_per_sequence = one["kv_bytes_device"], one["kv_bytes_host"]
    fixed = one["peak_allocated_bytes"] - per_sequence
    limits = {"device memory": int((MEMORY_MARGIN * device_bytes - fixed) // per_sequence)}
    if host_per_sequence:
        limits["host memory"] = int(MEMORY_MARGIN * host_bytes // host_per_sequence)
    if kv_limit_bytes is not None:
        limits["kv limit"] = kv_limit_bytes // per_sequence
    limits["batch limit"] = batch_limit  # small caches would otherwise predict hundreds of sequences
    bound = min(limits, key=limits.get)
    return max(1, limits[bound]), bound


def device_memory(device: torch.device, override_gib: float | None) -> int:
    if override_gib is not None:
        return int(override_gib * 2**30)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_host_memory() -> int:
    """MemAvailable: what pinned host backups can take without swapping."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def make_method(name: str, size: int, recall_cap: float | None = None) -> Method:
    return {
        "full": lambda: Full(),
        "streamingllm": lambda: StreamingLLM(budget=size),
        "snapkv": lambda: SnapKV(budget=size),
        "h2o": lambda: H2O(budget=size),
        "arkvale": lambda: ArkVale(budget=size, recall_cap=recall_cap),
        "scissorhands": lambda: Scissorhands(budget=size),
        "snapstream": lambda: SnapStream(budget=size),
        "kivi": lambda: KIVI(bits=size),
        "quarot": lambda: QuaRot(bits=size),
        "rtn": lambda: QuaRot(bits=size, rotate=False),
        "zipcache": lambda: ZipCache(),
        "cla": lambda: CLA(sharing=size),
    }[name]()


def seconds_per_copy(target: torch.Tensor, source: torch.Tensor, device: torch.device) -> float:
    """Mean seconds of `target.copy_(source)` over 10 copies after 3 to warm up."""
    for _ in range(3):
        target.copy_(source, non_blocking=True)
    with Timer(device) as timer:
        for _ in range(10):
            target.copy_(source, non_blocking=True)
    return timer.seconds / 10


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    size = 2 * 1024**3 if device.type == "cuda" else 256 * 1024**2
    source = torch.empty(size, dtype=torch.uint8, device=device)
    return 2 * size / seconds_per_copy(torch.empty_like(source), source, device)


def host_read_bandwidth(device: torch.device) -> float:
    """Bytes per second of a copy from pinned host memory to the device (the link ArkVale's recalls cross),
    counting the bytes read; on a CPU, a copy within host memory (where its "host" backup sits)."""
    size = 256 * 1024**2
    source = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return size / seconds_per_copy(torch.empty(size, dtype=torch.uint8, device=device), source, device)


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Every parameter is read once a step, except an untied input embedding (only B rows are looked up)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def run_row(
    model,
    spec,
    method_name: str,
    budget: int,
    context: int,
    batch: int,
    engine_name: str,
    args,
    bandwidth: float,
    host_bandwidth: float,
) -> dict:
    method = make_method(method_name, budget, args.arkvale_recall_cap)
    engine_name, _, scope = engine_name.partition("-")  # "compiled-step": a row's own compile scope
    scope = scope or args.compile_scope
    # A fresh dynamo cache per row: each row compiles its own step anyway, and a long sweep in one process
    # would otherwise pile guards on one code object up to dynamo's recompile limit. What the previous row's
    # compiled code still held (its CUDA graphs' memory pools) goes back to the device with it.
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    engine = Engine(
        model,
        None,
        method,
        spec,
        prefill_chunk=args.prefill_chunk,
        engine=engine_name,
        fuse=not args.unfused,
        compile_scope=scope,
        inductor_options=args.inductor_options if engine_name == "compiled" else None,
    )
    generator = torch.Generator().manual_seed(context + batch)
    distinct = batch if args.distinct_prompts else 1
    prompts = [torch.randint(0, spec_vocab(model), (context,), generator=generator).tolist() for _ in range(distinct)]
    requests = [Request(prompts[i % distinct], args.new_tokens, min_new_tokens=args.new_tokens) for i in range(batch)]
    row = {"method": method_name, "budget": budget if SIZED_BY[method_name] else None, "context": context}
    row.update(
        size_means=SIZED_BY[method_name],
        batch=batch,
        engine=engine_name,
        fused_projections=engine_name != "eager" and not args.unfused,
        inductor_options=args.inductor_options if engine_name == "compiled" else {},
        compile_scope=scope if engine_name == "compiled" else None,
        recall_cap=args.arkvale_recall_cap if method_name == "arkvale" else None,
    )
    started = time.perf_counter()
    try:
        with row_deadline(args.row_time_limit_s):
            generations = engine.generate_batch(requests)
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return {**row, "status": "oom", **failure(error)}
    except CutOff as error:  # where it was is the measurement
        status = "timeout" if isinstance(error, RowTimeout) else "terminated"
        return {**row, "status": status, "elapsed_s": time.perf_counter() - started, **failure(error)}
    except Exception as error:  # a failed row is data; the sweep goes on
        return {**row, "status": "error", **failure(error)}
    m = generations[0].measurement
    prefilled = [g.measurement for g in generations if not g.measurement.prefill_shared]
    cache_read = cache_bytes_read(method_name, method, spec, m.kv_bytes_device * batch)
    floor_s = (weight_bytes_per_step(model) + cache_read) / bandwidth
    # Host reads over the generation's decode steps: every sequence takes new_tokens - 1 of them (stops are
    # refused; the first token comes from the prefill), and the stats are each sequence's mean.
    host_read = m.method_stats.get("host_bytes_read", 0.0) * batch / max(1, args.new_tokens - 1)
    host_floor_s = host_read / host_bandwidth
    floor_with_host_s = max(floor_s, host_floor_s)
    decode_ms = 1000 * m.decode_s / m.decode_steps if m.decode_steps else None
    tokens = sum(g.measurement.decode_tokens for g in generations)
    row.update(
        status="ok",
        prefill_s=sum(p.prefill_s for p in prefilled) / len(prefilled),  # the first is always prefilled
        prefills=len(prefilled),
        decode_ms_per_step=decode_ms,
        tokens_per_s=tokens / m.decode_s if m.decode_s else None,
        decode_steps=m.decode_steps,
        compile_s=m.compile_s,
        compile_parts=compile_parts(m.compile_s),
        kv_bytes_device=m.kv_bytes_device * batch,
        kv_bytes_host=m.kv_bytes_host * batch,
        kv_bytes_device_peak=m.kv_bytes_device_peak,
        peak_allocated_bytes=m.peak_memory_bytes,
        floor_ms=1000 * floor_s,
        x_floor=decode_ms / (1000 * floor_s) if decode_ms else None,
        host_read_bytes_per_step=host_read,
        host_floor_ms=1000 * host_floor_s,
        floor_with_host_ms=1000 * floor_with_host_s,
        x_floor_with_host=decode_ms / (1000 * floor_with_host_s) if decode_ms else None,
        method_stats=m.method_stats,
        measurement=asdict(m),
    )
    del engine, generations
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


ERROR_DETAIL_CHARS = 8000
WHERE_FRAMES = 12


# kvbench's own code, wherever it was imported from (a checkout, or the GPU copy with methods/ and tasks/ inside)
KVBENCH_DIRS = tuple(
    Path(folder).resolve() for package in (kvbench, kvbench.methods, kvbench.tasks) for folder in package.__path__
)


def short_path(filename: str) -> str:
    """An installed package's file from its package down (torch/_dynamo/variables/builder.py: which part of
    torch was running), anything else as its folder and name (kvbench/engine.py)."""
    parts = Path(filename).parts
    installed = [i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")]
    return "/".join(parts[installed[-1] + 1 :] if installed else parts[-2:])


def failure(error: BaseException) -> dict[str, str | list[str] | None]:
    """A failed row's error: its first line for the table, the end of the whole message (where Inductor
    puts the kernel source line that failed to compile), `where`, the innermost frames of its traceback,
    and `in_kvbench`, the innermost of kvbench's own (which names the engine's phase: prefill, compile,
    decode), each as "path:line function" (`short_path`), for whoever reads the row later, off the GPU."""
    message = f"{type(error).__name__}: {error}"
    frames = [
        (
            f"{short_path(f.filename)}:{f.lineno} {f.name}",
            any(Path(f.filename).resolve().is_relative_to(folder) for folder in KVBENCH_DIRS),
        )
        for f in traceback.extract_tb(error.__traceback__)
    ]
    return {
        "error": message.splitlines()[0],
        "error_detail": message[-ERROR_DETAIL_CHARS:],
        "where": [frame for frame, _ in frames[-WHERE_FRAMES:]],
        "in_kvbench": next((frame for frame, ours in reversed(frames) if ours), None),
    }


def spec_vocab(model: torch.nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "llama-2-7b"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument(
        "--batches", type=parse_batch, nargs="+", default=[1, 4, MAX_BATCH], help="sizes, or max (largest that fits)"
    )
    parser.add_argument("--kv-limit-gib", type=float, default=None, help="batch max: device KV bytes at most this")
    parser.add_argument("--batch-limit", type=int, default=64, help="batch max: at most this many sequences")
    parser.add_argument("--device-memory-gib", type=float, default=None, help="batch max: device memory to plan for")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4], help="quantizers' sizes")
    parser.add_argument("--sharing", type=int, nargs="+", default=[2], help="CLA's layers per KV group")
    parser.add_argument("--commit", default="", help="stamp rows with this commit (the GPU copy has no .git)")
    parser.add_argument("--methods", nargs="+", default=list(SIZED_BY), choices=list(SIZED_BY))
    parser.add_argument("--engine", default="compiled", choices=["eager", "graph", "compiled"])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="SHAPE:METHOD:SIZE:CONTEXT:BATCH[:ENGINE[-SCOPE]]",  # BATCH: a number or max
        help="these rows in this order, not the grid (size 0: methods that take none; compiled-step: whole step)",
    )
    parser.add_argument("--unfused", action="store_true", help="keep separate q/k/v and gate/up products")
    parser.add_argument(
        "--inductor-option",
        dest="inductor_options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="compiled rows: Inductor config values for the step, e.g. combo_kernels=1 (torch._inductor.config)",
    )
    parser.add_argument(
        "--compile-scope", default="layer", choices=["layer", "step"], help="engine=compiled: what is compiled"
    )
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="a prompt of its own for each sequence of a batch (default: one, prefilled once and copied)",
    )
    parser.add_argument(
        "--arkvale-recall-cap",
        type=float,
        default=None,
        help="pin ArkVale's pages recalled per step and layer; a fraction is a rate (random weights recall every page)",
    )
    parser.add_argument(
        "--quant-launch",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="override fields of the 4-bit kernels' launch (kvbench.quant_kernels.LaunchConfig), e.g. zero_row_sums=1",
    )
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--time-limit-s", type=float, default=480, help="start no new row after this long")
    parser.add_argument(
        "--row-time-limit-s", type=float, default=None, help="cut a row off after this long (written as a timeout row)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip the plan's rows that --out holds, finished, from this commit"
    )
    parser.add_argument("--quick", action="store_true", help="llama-3.1-8b, 8k, batch 1, budget 2048")
    parser.add_argument("--device", default="cuda", help="cpu runs the same code (for checking the script)")
    parser.add_argument("--out", default="benchmarks/results/speed.jsonl")
    args = parser.parse_args()
    use_quant_launch(args.quant_launch)
    try:
        args.inductor_options = parse_inductor_options(args.inductor_options)
    except ValueError as error:
        parser.error(str(error))
    if args.quick:
        args.shapes, args.contexts, args.batches, args.budgets = ["llama-3.1-8b"], [8192], [1], [2048]

    began = time.perf_counter()
    device = torch.device(args.device)
    bandwidth, host_bandwidth = copy_bandwidth(device), host_read_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, host to device {host_bandwidth / 1e9:.1f} GB/s", flush=True)
    plan = parse_runs(args.runs) if args.runs else grid(args)
    for _, method_name, size, *_ in plan:  # bad hyper-parameters stop the run before any model loads
        try:
            make_method(method_name, size, args.arkvale_recall_cap)
        except ConfigError as error:
            raise SystemExit(f"{method_name} at size {size}: {error}") from None
    sweep = Sweep(args, bandwidth, run_settings(args, device), host_bandwidth)
    if args.resume:
        commit = sweep.settings["commit"]
        if commit in (None, "unknown"):  # a copy without .git: any code's rows would pass for this one's
            raise SystemExit("--resume needs to know the commit the rows were measured at: pass --commit")
        if str(commit).endswith("+dirty"):
            print(f"resume: the checkout has uncommitted changes ({commit}): rows of other edits pass too", flush=True)
        specs = [run_spec(*entry) for entry in plan]
        # batch max predicts from a batch-1 row: one in the file serves, whether or not the plan has it
        ones = [run_spec(*entry[:4], 1, entry[5]) for entry in plan if entry[4] == MAX_BATCH]
        sweep.resumed = finished_rows(Path(args.out), sweep.settings, specs + ones)
        planned = len(plan)
        plan = not_finished(plan, specs, sweep.resumed)
        print(f"resume: {planned - len(plan)} rows of the plan already in {args.out}, {len(plan)} to run", flush=True)
    signal.signal(signal.SIGTERM, terminate)  # the row in progress is written before the process stops
    terminated, broken, left = False, None, len(plan)
    with open_rows(Path(args.out)) as sweep.out:
        try:
            for shape, method_name, size, context, batch, engine_name in plan:
                if time.perf_counter() - began > args.time_limit_s:
                    print(f"time limit reached: no new rows; {left} of the plan not run (--resume goes on)", flush=True)
                    break
                if sweep.rows and sweep.rows[-1]["status"] == "terminated":
                    terminated = True
                    break
                sweep.load(shape, device)
                run = (method_name, size, context, engine_name)
                if batch == MAX_BATCH:
                    sweep.record_largest_batch(*run, device)
                else:
                    sweep.record(*run, batch)
                left -= 1
                if sweep.rows and sweep.rows[-1]["status"] == "timeout":
                    broken = torch_fails(device)
                    if broken:
                        print(f"{broken}: a cut-off left torch unusable in this process; no new rows", flush=True)
                        break
            terminated = terminated or bool(sweep.rows and sweep.rows[-1]["status"] == "terminated")
        except Terminated:  # between rows (loading a shape, writing a row): the rows so far are written
            terminated = True
    rows = [*sweep.resumed, *sweep.rows]
    print("\n" + "\n".join(format_row(row) for row in rows))
    wall_s = time.perf_counter() - began
    split = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in wall_split(sweep.rows, wall_s).items())
    print(f"wall {wall_s:.0f} s: {split}", flush=True)
    if terminated:
        print("terminated: no new rows", flush=True)
        raise SystemExit(128 + signal.SIGTERM)  # the shell's code for a process stopped by SIGTERM
    if broken:
        raise SystemExit(
            f"stopped after a cut-off broke torch: the row cut off and {left} more of the plan not run;"
            " run again with --resume"
        )


def torch_fails(device: torch.device) -> str | None:
    """The error a small torch operation raises in this process, or None if it runs. A row's time limit
    strikes at the next bytecode, wherever that is; struck inside dynamo's Python dispatcher it can leave the
    dispatcher's thread-local state half set, and then every later operation fails ("Hit PythonDispatcher
    dispatch key but PythonDispatcherTLS was not set", seen in a CI run): the rest of the plan would be
    written as errors in seconds."""
    try:
        torch.ones(2, device=device).sum().item()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def use_quant_launch(overrides: list[str]) -> None:
    """The 4-bit kernels' launch for this run; any other than the default compiles without torch.compile's
    caches (`kernels.compile_caches_off`: a cached graph replays the launch it was compiled under)."""
    launch = quant_launch(overrides)
    quant_kernels.LAUNCH = launch
    if launch != quant_kernels.LaunchConfig():
        kernels.compile_caches_off()


def quant_launch(overrides: list[str]) -> quant_kernels.LaunchConfig:
    """The default launch with FIELD=VALUE overrides (integers; booleans as 0/1 or true/false; pairs as 6,12)."""
    fields = [f.name for f in dataclasses.fields(quant_kernels.LaunchConfig)]
    changes = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--quant-launch {item!r} is not valid: FIELD=VALUE, FIELD one of {fields}")
        default = getattr(quant_kernels.LAUNCH, name)  # its type is the field's
        if isinstance(default, bool):
            changes[name] = value.lower() in ("1", "true")
        elif isinstance(default, tuple):
            changes[name] = tuple(int(v) for v in value.split(","))
            if len(changes[name]) != len(default):
                raise SystemExit(f"--quant-launch {item!r} is not valid: {name} takes as many integers as its default")
        else:
            changes[name] = int(value)
    return dataclasses.replace(quant_kernels.LAUNCH, **changes)


def grid(args) -> list[tuple[str, str, int, int, int, str]]:
    """Every shape x context x batch x method x size (one size for methods that take none)."""
    return [
        (shape, method_name, size, context, batch, args.engine)
        for shape in args.shapes
        for context in args.contexts
        for batch in args.batches
        for method_name in args.methods
        for size in (SIZE_OF[SIZED_BY[method_name]](args) if SIZED_BY[method_name] else [0])
    ]


SIZE_OF = {
    "budget": lambda args: args.budgets,
    "bits": lambda args: args.bits,
    "sharing": lambda args: args.sharing,
}


def parse_runs(specs: list[str]) -> list[tuple[str, str, int, int, int, str]]:
    plan = []
    for spec in specs:
        fields = spec.split(":")
        if len(fields) not in (5, 6) or fields[1] not in SIZED_BY:
            raise SystemExit(
                f"--runs {spec!r}: SHAPE:METHOD:SIZE:CONTEXT:BATCH[:ENGINE[-SCOPE]], METHOD one of {list(SIZED_BY)}"
            )
        engine = fields[5] if len(fields) == 6 else "compiled"
        try:
            batch = parse_batch(fields[4])
        except argparse.ArgumentTypeError as error:
            raise SystemExit(f"--runs {spec!r}: {error}") from None
        plan.append((fields[0], fields[1], int(fields[2]), int(fields[3]), batch, engine))
    return plan


class Sweep:
    """The rows of one run: the loaded model (one shape at a time) and the output file."""

    def __init__(self, args, bandwidth: float, settings: dict, host_bandwidth: float) -> None:
        self.args, self.bandwidth, self.settings, self.host_bandwidth = args, bandwidth, settings, host_bandwidth
        self.rows: list[dict] = []  # this run's
        self.resumed: list[dict] = []  # finished rows of the plan that `--out` held (`--resume`)
        self.shape, self.model, self.spec, self.env, self.out = None, None, None, None, None

    def load(self, shape: str, device: torch.device) -> None:
        """Rows of one shape run together: the model loads once for them."""
        if shape == self.shape:
            return
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        dtype = "bfloat16" if device.type == "cuda" else "float32"
        cfg = ModelConfig(name=shape, source="shape", shape=shape, device=device.type, dtype=dtype)
        self.spec = model_spec(cfg)
        self.model, _ = load_model(cfg, with_tokenizer=False)
        self.env, self.shape = environment(device), shape
        warm = Engine(self.model, None, Full(), self.spec, prefill_chunk=self.args.prefill_chunk, engine="eager")
        warm.generate_batch([Request(list(range(1, 300)), 4, min_new_tokens=4)])  # module load, cuBLAS

    def record(
        self,
        method_name: str,
        size: int,
        context: int,
        engine_name: str,
        batch: int,
        planned: int | None = None,
        **extra,
    ) -> dict:
        """Run one row, append it to the output and the table; `planned`: the plan's batch where it is not
        `batch` (MAX_BATCH)."""
        args = self.args
        started = time.perf_counter()
        row = run_row(
            self.model, self.spec, method_name, size, context, batch, engine_name, args, self.bandwidth,
            self.host_bandwidth,
        )  # fmt: skip
        row.update(
            row_s=time.perf_counter() - started,  # the row's wall time: engine, compile, prefill, decode, freeing
            shape=self.shape,
            run=run_spec(self.shape, method_name, size, context, batch if planned is None else planned, engine_name),
            settings=self.settings,
            bandwidth_bytes_per_s=self.bandwidth,
            host_bandwidth_bytes_per_s=self.host_bandwidth,
            environment=self.env,
            commit=args.commit or self.env.get("git_commit"),
            **extra,
        )
        self.out.write(json.dumps(row, default=str) + "\n")
        self.out.flush()
        self.rows.append(row)
        print(format_row(row), flush=True)
        # What the row left (an out-of-memory traceback's frames hold its caches until here) goes back to the
        # device before the next row plans its memory.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row

    def record_largest_batch(
        self, method_name: str, size: int, context: int, engine_name: str, device: torch.device
    ) -> None:
        """Batch max: predicted from the batch-1 row (run first if there is none), retried smaller if it
        runs out of memory; every attempt is a row, with `largest_batch` saying how it was chosen."""
        args = self.args
        base, _, scope = engine_name.partition("-")
        scope = (scope or args.compile_scope) if base == "compiled" else None
        key = (self.shape, method_name, size if SIZED_BY[method_name] else None, context, base, scope)
        rows = [*self.resumed, *self.rows]
        one = next((r for r in reversed(rows) if row_key(r) == key and r["batch"] == 1), None)
        if one is None or one["status"] != "ok":
            one = self.record(method_name, size, context, engine_name, 1)
        if one["status"] != "ok":
            print(f"batch max of {key}: no batch-1 row to predict from", flush=True)
            return
        kv_limit = int(args.kv_limit_gib * 2**30) if args.kv_limit_gib is not None else None
        device_bytes = device_memory(device, args.device_memory_gib)
        predicted, bound = largest_batch(one, device_bytes, available_host_memory(), kv_limit, args.batch_limit)
        sizes = retry_sizes(predicted)
        for attempt, batch in enumerate(sizes):
            note = {"predicted": predicted, "bound_by": bound, "attempt": attempt + 1, "sizes": sizes}
            row = self.record(method_name, size, context, engine_name, batch, MAX_BATCH, largest_batch=note)
            if row["status"] != "oom":
                return


def retry_sizes(predicted: int) -> list[int]:
    """The predicted batch, then smaller ones for an out-of-memory retry (distinct, at least 1)."""
    sizes = [predicted]
    for _ in range(RETRIES):
        smaller = max(1, int(sizes[-1] * RETRY_SHRINK))
        if smaller == sizes[-1]:
            break
        sizes.append(smaller)
    return sizes


def run_spec(shape: str, method_name: str, size: int, context: int, batch: int, engine_name: str) -> str:
    """A plan entry as `--runs` takes it: SHAPE:METHOD:SIZE:CONTEXT:BATCH:ENGINE[-SCOPE] (BATCH max for 0)."""
    return f"{shape}:{method_name}:{size}:{context}:{'max' if batch == MAX_BATCH else batch}:{engine_name}"


def run_settings(args, device: torch.device) -> dict:
    """Everything besides its plan entry that decides a row's measurement: rows resume (`--resume`) only
    from an output written under all of it."""
    env = environment(device)
    settings = {
        "commit": args.commit or env["git_commit"],
        "device_name": env["device_name"],
        "torch": env["torch"],
        "transformers": env["transformers"],
        "new_tokens": args.new_tokens,
        "prefill_chunk": args.prefill_chunk,
        "distinct_prompts": args.distinct_prompts,
        "unfused": args.unfused,
        "compile_scope": args.compile_scope,
        "inductor_options": args.inductor_options,
        "quant_launch": asdict(quant_kernels.LAUNCH),
        "arkvale_recall_cap": args.arkvale_recall_cap,
        "batch_max": {"kv_limit_gib": args.kv_limit_gib, "batch_limit": args.batch_limit,
                      "device_memory_gib": args.device_memory_gib},
    }  # fmt: skip
    return json.loads(json.dumps(settings, default=str))  # as a row holds it (tuples as lists)


def finished_rows(path: Path, settings: dict, specs: list[str]) -> list[dict]:
    """The rows of `path` written under `settings` for an entry of `specs` that finish it (`finishes`), in the
    file's order. Lines that do not parse (one cut short by a crash) are skipped and counted."""
    if not path.exists():
        return []
    rows, unreadable = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(row, dict) and row.get("run") in specs and row.get("settings") == settings:
            rows.append(row)
    if unreadable:
        print(f"resume: {unreadable} unreadable lines in {path} skipped", flush=True)
    return [row for row in rows if finishes(row)]


def finishes(row: dict) -> bool:
    """Whether `row` finishes its plan entry: it ran, or ran out of memory at a fixed batch or on the last size
    batch max tried (each of batch max's attempts is a row)."""
    if row["status"] == "ok":
        return True
    note = row.get("largest_batch")
    return row["status"] == "oom" and (note is None or note["attempt"] == len(note["sizes"]))


def without_batch(spec: str) -> str:
    shape, method_name, size, context, _, engine_name = spec.split(":")
    return ":".join((shape, method_name, size, context, engine_name))


def not_finished(plan: list[tuple], specs: list[str], rows: list[dict]) -> list[tuple]:
    """The entries of `plan` (whose `run_spec`s are `specs`) that `rows` did not finish; an entry the plan
    repeats (A/B timing in one run) counts once for each row that finished it."""
    finished = collections.Counter(row["run"] for row in rows if finishes(row))
    # batch max whose batch-1 row ran out of memory: nothing fits, and no max row was written
    nothing_fits = {without_batch(row["run"]) for row in rows if row["status"] == "oom" and row["batch"] == 1}
    left = []
    for entry, spec in zip(plan, specs, strict=True):
        if entry[4] == MAX_BATCH and without_batch(spec) in nothing_fits:
            continue
        if finished[spec]:
            finished[spec] -= 1
        else:
            left.append(entry)
    return left


@contextmanager
def open_rows(path: Path) -> Iterator:
    """`path` to append rows to, starting on a line of its own: a line a crash cut short stays one line, which
    `finished_rows` skips, instead of swallowing the next row."""
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as out:
        if torn:
            out.write("\n")
        yield out


def row_key(row: dict) -> tuple:
    """What a batch-1 row must share with a batch-max row to predict it."""
    return (row["shape"], row["method"], row["budget"], row["context"], row["engine"], row["compile_scope"])


def parse_batch(text: str) -> int:
    if text == "max":
        return MAX_BATCH
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"batch {text!r} is not valid: a positive integer or max")
    return int(text)


def wall_split(rows: list[dict], wall_s: float) -> dict[str, float]:
    """Where this run's wall time went: its rows' compile, prefill and decode seconds (the prefill once for
    each sequence prefilled, the decode's timed steps), the rest of the rows' own time (`row_s`: building the
    engine, the untimed steps, freeing) and what lay between rows (bandwidth probes, model loads, planning)."""
    ok = [row for row in rows if row["status"] == "ok"]
    parts = {
        "compile": sum(row["compile_s"] for row in ok),
        "prefill": sum(row["prefill_s"] * row["prefills"] for row in ok),
        "decode": sum(row["measurement"]["decode_s"] for row in ok),
    }
    in_rows = sum(row["row_s"] for row in rows)
    parts["rest of rows"] = in_rows - sum(parts.values())
    parts["between rows"] = wall_s - in_rows
    return parts


def format_row(row: dict) -> str:
    head = (
        f"{row.get('shape', ''):<13}{row['method']:<13}{row['budget'] or '-':>6}{row['context']:>7}"
        f"{row['batch']:>3} {row['engine']:<9}"
    )
    if "elapsed_s" in row:  # cut off
        return head + f" {row['status']} after {row['elapsed_s']:.1f} s in {row.get('in_kvbench')}"
    if row["status"] != "ok":
        return head + f" {row['status']}: {row.get('error', '')[:60]}"
    host = ""
    if row.get("host_floor_ms"):  # reads over the host link (ArkVale's recalls)
        host = f"  host floor {row['host_floor_ms']:6.2f} ms x{row['x_floor_with_host']:5.2f}"
    return head + (
        f" prefill {row['prefill_s']:6.2f}s  decode {row['decode_ms_per_step']:7.2f} ms"
        f"  floor {row['floor_ms']:6.2f} ms  x{row['x_floor']:5.2f}  {row['tokens_per_s']:8.1f} tok/s"
        f"  kv {row['kv_bytes_device'] / 2**20:8.1f} MiB  peak {row['peak_allocated_bytes'] / 2**30:5.1f} GiB"
        f"  compile {row['compile_s']:5.1f}s{host}"
    )


if __name__ == "__main__":
    main()

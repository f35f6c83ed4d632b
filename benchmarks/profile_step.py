"""Where a compiled decode step spends its time: kernel time by kind, against the step's floor.

    PYTHONPATH=. python benchmarks/profile_step.py --shape llama-3.1-8b --method full --context 32768 --batch 4

Prefills `batch` random prompts through the engine, compiles the decode step as the `compiled` engine does,
then (1) times CUDA-graph replays of it (what `speed.py` reports) and (2) runs the same compiled step
without the graph under `torch.profiler`, summing GPU kernel time by kind: matrix products (cuBLAS /
CUTLASS / nvjet), kvbench's attention kernels, host-page kernels, page scoring and selection, Inductor's
fused Triton kernels, other.
The gap between the replay time and the kernel-time sum is idle GPU time between kernels; the gap between
matrix-product time and weight bytes / bandwidth is how far the projections are from the memory floor.

`--compile-scope` (default `layer`, as `speed.py` and the engine: each decoder layer compiled, the rest of
the step as Python; `step`: the whole step compiled) says what is compiled; under `layer` the no-graph
time includes the Python of the uncompiled part. Options that change the step, for A/B rows: `--autotune`
(Inductor's max-autotune of the matrix products, without its own CUDA graphs), `--block-n` (the attention
kernel's tile). One JSON line per run to --out. `--device cpu` is a smoke run of the whole script on a small
shape (`tests/test_profile_step_script.py`): the CPU profile's events are operators, not kernels.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from speed import (
    cache_bytes_read,
    copy_bandwidth,
    failure,
    make_method,
    weight_bytes_per_step,
)  # benchmarks/speed.py, beside this file

from kvbench import kernels
from kvbench.cache import KVCache
from kvbench.engine import WARMUP_STEPS, Engine, Request, Timer, parse_inductor_options
from kvbench.models import SHAPES, ModelConfig, load_model, model_spec
from kvbench.records import environment

KINDS = (
    ("attention", ("_decode_split_kernel", "_decode_combine_kernel", "_packed_split_kernel", "_plane_split_kernel")),
    ("received", ("_received_kernel",)),
    ("host_pages", ("_gather_pages", "_write_rows", "gather_pages", "write_rows")),
    ("page_selection", ("_cuboid_scores_kernel", "_select_pages_kernel")),
    ("topk", ("_largest_keys_kernel",)),
    ("matmul", ("gemm", "gemv", "cutlass", "nvjet", "sm90_", "sm80_", "cublas", "splitK", "mm_")),
    ("fused", ("triton_",)),
)


def kind_of(name: str) -> str:
    for kind, needles in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "other"


def prepared(engine: Engine, requests: list[Request]):
    """The engine's own prefill and decode state, ready for steps (what `generate_batch` does first)."""
    from kvbench.engine import Measurement

    prompt_len = max(len(r.prompt_ids) for r in requests)
    decode_len = max(r.max_new_tokens for r in requests)
    caches, logits = [], []
    for request in requests:
        cache, last = engine._prefill_one(request, prompt_len, decode_len, Measurement())
        caches.append(cache)
        logits.append(last)
    cache = KVCache.stack(caches)
    state = engine._decode_state(requests, [len(r.prompt_ids) for r in requests])
    engine._choose(torch.stack(logits), state)
    return cache, state


@torch.inference_mode()
def profile(args, model, spec, bandwidth: float) -> dict:
    device = torch.device(args.device)
    method = make_method(args.method, args.budget, args.recall_cap)
    engine = Engine(
        model,
        None,
        method,
        spec,
        prefill_chunk=args.prefill_chunk,
        engine="compiled",
        compile_scope=args.compile_scope,
        inductor_options=parse_inductor_options(args.inductor_options),
    )
    if args.autotune:
        engine.compile_options = {"mode": "max-autotune-no-cudagraphs"}
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(args.context)
    # Every step below writes one token: room for the warm-up, the timed replays and the profiled steps, each
    # of the last two whole periods of a cache's schedule (below). The room is allocated (a growing cache
    # holds it) and counted in the floor, so it stays small unless a long period needs more.
    steps = args.decode_room
    requests = [
        Request(torch.randint(0, vocab, (args.context,), generator=generator).tolist(), steps, min_new_tokens=steps)
        for _ in range(args.batch)
    ]
    began = time.perf_counter()
    cache, state = prepared(engine, requests)
    prefill_s = time.perf_counter() - began
    print(f"{args.method} {args.context}x{args.batch}: prefill {prefill_s:.1f} s", flush=True)
    # A cache with a host-side schedule (a quantized window's flush, Scissorhands' compress steps, ArkVale's
    # page boundaries) has a step version per variant: the engine's warm-up runs up to one period of it, and
    # the steps timed and profiled here are whole periods of it, as decode runs them.
    period = cache.variant_period() if cache.decode_variants() is not None else 1
    replays = period * -(-args.replays // period)
    profiled = period * -(-args.profiled // period)
    warmup = period + WARMUP_STEPS
    needed = warmup + 1 + 2 * replays + profiled
    if needed > steps:
        raise ValueError(f"--decode-room {steps}: a schedule period of {period} steps needs {needed}; pass that")
    # As the engine (and speed.py) runs it: "layer", each decoder layer compiled and the rest of the step as
    # Python inside the same graph capture; "step", the whole step compiled.
    with engine._layers_compiled():
        replay, compile_s, _ = engine._step_runner(cache, state, steps_left=warmup)
        print(f"{args.method} {args.context}x{args.batch}: compiled in {compile_s:.1f} s", flush=True)
        compiled = engine._compiled_step if args.compile_scope == "step" else engine._step
        # The compiled step without its graph; the host's counters move as a replay moves them.
        advance = cache.advance if cache.decode_variants() is not None else (lambda: None)
        replay()
        with Timer(device) as timer:
            for _ in range(replays):
                replay()
        replay_ms = 1000 * timer.seconds / replays

        with Timer(device) as timer:
            for _ in range(replays):
                compiled(cache, state)
                advance()
        no_graph_ms = 1000 * timer.seconds / replays

        by_kind: dict[str, float] = defaultdict(float)
        by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        in_order: list[tuple[float, str, float]] = []  # (start us, name, us): the step's kernels as launched
        # On the CPU (`--device cpu`, a smoke run of this script) the events are operators, nested, not kernels.
        on_cuda = device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CUDA if on_cuda else torch.profiler.ProfilerActivity.CPU]
        kernel_events = torch.autograd.DeviceType.CUDA if on_cuda else torch.autograd.DeviceType.CPU
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(profiled):
                compiled(cache, state)
                advance()
            if on_cuda:
                torch.cuda.synchronize()
        for event in prof.events():
            if event.device_type != kernel_events:
                continue
            us = event.time_range.elapsed_us()
            in_order.append((event.time_range.start, event.name, us))
            by_kind[kind_of(event.name)] += us / profiled
            entry = by_kernel[event.name]
            entry[0] += us / profiled
            entry[1] += 1 / profiled

    device_bytes, host_bytes = cache.kv_bytes()
    weights = weight_bytes_per_step(model)
    cache_read = cache_bytes_read(args.method, engine.method, spec, device_bytes)  # speed.py's floor
    floor_ms = 1000 * (weights + cache_read) / bandwidth
    kernel_ms = sum(by_kind.values()) / 1000
    row = {
        "shape": args.shape,
        "method": args.method,
        "budget": args.budget if args.method != "full" else None,
        "context": args.context,
        "batch": args.batch,
        "autotune": args.autotune,
        "coordinate_descent": args.coordinate_descent,
        "inductor_options": parse_inductor_options(args.inductor_options),
        "compile_scope": args.compile_scope,
        "layers": spec.num_layers,
        "block_n": kernels.BLOCK_N,
        "recall_cap": args.recall_cap,
        "prefill_s": prefill_s,
        "compile_s": compile_s,
        "schedule_period": period,
        "profiled_steps": profiled,
        "replay_ms": replay_ms,
        "no_graph_ms": no_graph_ms,
        "kernel_ms": kernel_ms,
        "idle_ms": replay_ms - kernel_ms,
        "floor_ms": floor_ms,
        "x_floor": replay_ms / floor_ms,
        "weights_floor_ms": 1000 * weights / bandwidth,
        "cache_floor_ms": 1000 * cache_read / bandwidth,
        "kv_bytes_device": device_bytes,
        "kv_bytes_host": host_bytes,
        "kinds_ms": {k: v / 1000 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": name[:120], "ms": us / 1000, "calls": calls}
            for name, (us, calls) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]
        ],
        "kernels_per_step": len(in_order) / profiled,
        # The first --sequence kernels of the profiled steps in launch order: which small kernels a layer makes.
        # Whole names: an Inductor kernel's name lists the ops it fused, which is how one is told from another.
        "sequence": [{"name": name, "us": round(us, 2)} for _, name, us in sorted(in_order)[: args.sequence]],
        "method_stats": cache.stats(),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if on_cuda else None,
    }
    del replay, advance, cache, state, engine
    empty_cache(device)
    return row


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--runs", nargs="+", default=None, help="method:budget:context:batch ... (else one run)")
    parser.add_argument("--method", default="full")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--recall-cap", type=float, default=None)
    parser.add_argument("--autotune", action="store_true")
    parser.add_argument("--block-n", type=int, default=None)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="fewer layers of one shape: per-layer costs, less compile",
    )
    parser.add_argument(
        "--compile-scope", default="layer", choices=["layer", "step"], help="as speed.py: what is compiled"
    )
    parser.add_argument("--coordinate-descent", action="store_true", help="Inductor's coordinate-descent tuning")
    parser.add_argument(
        "--inductor-option", dest="inductor_options", nargs="+", default=[], metavar="KEY=VALUE", help="as speed.py"
    )
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument(
        "--decode-room",
        type=int,
        default=160,
        help="decode tokens to allocate (ArkVale's 32-step pages fit; Scissorhands 2048 needs 2051)",
    )
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--profiled", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--sequence", type=int, default=0, help="record the first N kernels in launch order")
    parser.add_argument("--out", default="benchmarks/results/profile_step.jsonl")
    parser.add_argument("--commit", default="", help="the commit to record (the GPU copy has no .git)")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (tests), no kernel times")
    args = parser.parse_args()
    if args.block_n and args.block_n != kernels.BLOCK_N:
        kernels.BLOCK_N = args.block_n
        kernels.compile_caches_off()  # a cached graph would replay the tile it was compiled with
    if args.coordinate_descent:
        torch._inductor.config.coordinate_descent_tuning = True
    if args.layers:  # the same layers, fewer of them: kernels per layer are what a profile compares
        SHAPES[args.shape] = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = ModelConfig(name=args.shape, source="shape", shape=args.shape, device=args.device, dtype=dtype)
    spec = model_spec(cfg)
    model, _ = load_model(cfg, with_tokenizer=False)
    env = environment(device)
    if args.commit:
        env["git_commit"] = args.commit
    runs = args.runs or [f"{args.method}:{args.budget}:{args.context}:{args.batch}"]
    with open(args.out, "a") as out:
        for run in runs:
            method, budget, context, batch = run.split(":")
            args.method, args.budget, args.context, args.batch = method, int(budget), int(context), int(batch)
            try:
                row = profile(args, model, spec, bandwidth)
            except torch.OutOfMemoryError as error:
                empty_cache(device)
                row = {"run": run, "status": "oom", **failure(error)}
            except Exception as error:  # a run that fails (a schedule needing more --decode-room) is a row
                empty_cache(device)
                row = {"run": run, "status": "error", **failure(error)}
            row.update(environment=env, bandwidth_bytes_per_s=bandwidth)
            out.write(json.dumps(row, default=str) + "\n")
            out.flush()
            print(json.dumps({k: v for k, v in row.items() if k != "environment"}, default=str, indent=1), flush=True)


if __name__ == "__main__":
    main()

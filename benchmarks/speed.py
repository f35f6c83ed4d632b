"""Decode speed and memory of every method on real-shape models, through the engine's static-shape path.

    PYTHONPATH=. python benchmarks/speed.py --out speed.jsonl                  # the full sweep (one H100)
    PYTHONPATH=. python benchmarks/speed.py --quick --out speed.jsonl          # one shape, 8k, batch 1

Random bf16 weights (costs do not depend on them), random prompt token ids, `--new-tokens` greedy tokens
(stop tokens refused, so every sequence runs the same number of steps). Per row: prefill seconds per
sequence, decode ms per step (CUDA events, after compile/capture/warm-up, which are reported apart),
tokens/s over the batch, measured KV bytes on the device and host, the allocator's peak, and the floor:
(weight bytes read per step + the bytes the method's decode reads) / measured copy bandwidth. A method's
decode reads every tensor its cache holds on the device (keys, values, positions, scores, digests), and
scoring methods read the keys a second time for the attention each slot received.

Imports only torch, transformers and kvbench (the GPU machine has no hydra or datasets). One JSON line per
row to `--out`, with device, versions and commit; a table at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict

import torch

from kvbench import quant_kernels
from kvbench.engine import Engine, Request, Timer
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


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    size = 2 * 1024**3 if device.type == "cuda" else 256 * 1024**2
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    with Timer(device) as timer:
        for _ in range(10):
            target.copy_(source)
    seconds = timer.seconds / 10
    del source, target
    return 2 * size / seconds


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Every parameter is read once a step, except an untied input embedding (only B rows are looked up)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def run_row(
    model, spec, method_name: str, budget: int, context: int, batch: int, engine_name: str, args, bandwidth: float
) -> dict:
    method = make_method(method_name, budget, args.arkvale_recall_cap)
    engine_name, _, scope = engine_name.partition("-")  # "compiled-step": a row's own compile scope
    scope = scope or args.compile_scope
    # A fresh dynamo cache per row: each row compiles its own step anyway, and a long sweep in one process
    # would otherwise pile guards on one code object up to dynamo's recompile limit.
    torch._dynamo.reset()
    engine = Engine(
        model,
        None,
        method,
        spec,
        prefill_chunk=args.prefill_chunk,
        engine=engine_name,
        fuse=not args.unfused,
        compile_scope=scope,
    )
    generator = torch.Generator().manual_seed(context + batch)
    requests = [
        Request(
            torch.randint(0, spec_vocab(model), (context,), generator=generator).tolist(),
            args.new_tokens,
            min_new_tokens=args.new_tokens,
        )
        for _ in range(batch)
    ]
    row = {"method": method_name, "budget": budget if SIZED_BY[method_name] else None, "context": context}
    row.update(
        size_means=SIZED_BY[method_name],
        batch=batch,
        engine=engine_name,
        fused_projections=engine_name != "eager" and not args.unfused,
        compile_scope=scope if engine_name == "compiled" else None,
        recall_cap=args.arkvale_recall_cap if method_name == "arkvale" else None,
    )
    try:
        generations = engine.generate_batch(requests)
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return {**row, "status": "oom", "error": str(error).splitlines()[0]}
    except Exception as error:  # a failed row is data; the sweep goes on
        return {**row, "status": "error", "error": f"{type(error).__name__}: {error}".splitlines()[0]}
    m = generations[0].measurement
    cache_read = m.kv_bytes_device * batch
    if method_name in READS_KEYS_TWICE:
        cache_read += cache_read // 2  # received attention reads the keys again (keys are half of K + V)
    floor_s = (weight_bytes_per_step(model) + cache_read) / bandwidth
    decode_ms = 1000 * m.decode_s / m.decode_steps if m.decode_steps else None
    tokens = sum(g.measurement.decode_tokens for g in generations)
    row.update(
        status="ok",
        prefill_s=sum(g.measurement.prefill_s for g in generations) / batch,
        decode_ms_per_step=decode_ms,
        tokens_per_s=tokens / m.decode_s if m.decode_s else None,
        decode_steps=m.decode_steps,
        compile_s=m.compile_s,
        kv_bytes_device=m.kv_bytes_device * batch,
        kv_bytes_host=m.kv_bytes_host * batch,
        kv_bytes_device_peak=m.kv_bytes_device_peak,
        peak_allocated_bytes=m.peak_memory_bytes,
        floor_ms=1000 * floor_s,
        x_floor=decode_ms / (1000 * floor_s) if decode_ms else None,
        method_stats=m.method_stats,
        measurement=asdict(m),
    )
    del engine, generations
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def spec_vocab(model: torch.nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "llama-2-7b"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
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
        metavar="SHAPE:METHOD:SIZE:CONTEXT:BATCH[:ENGINE[-SCOPE]]",
        help="these rows in this order, not the grid (size 0: methods that take none; compiled-step: whole step)",
    )
    parser.add_argument("--unfused", action="store_true", help="keep separate q/k/v and gate/up products")
    parser.add_argument(
        "--compile-scope", default="layer", choices=["layer", "step"], help="engine=compiled: what is compiled"
    )
    parser.add_argument("--new-tokens", type=int, default=48)
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
    parser.add_argument("--quick", action="store_true", help="llama-3.1-8b, 8k, batch 1, budget 2048")
    parser.add_argument("--device", default="cuda", help="cpu runs the same code (for checking the script)")
    parser.add_argument("--out", default="benchmarks/results/speed.jsonl")
    args = parser.parse_args()
    quant_kernels.LAUNCH = quant_launch(args.quant_launch)
    if args.quick:
        args.shapes, args.contexts, args.batches, args.budgets = ["llama-3.1-8b"], [8192], [1], [2048]

    began = time.perf_counter()
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    plan = parse_runs(args.runs) if args.runs else grid(args)
    rows, loaded_shape, model, spec, env = [], None, None, None, None
    with open(args.out, "a") as out:
        for shape, method_name, size, context, batch, engine_name in plan:
            if time.perf_counter() - began > args.time_limit_s:
                print("time limit reached: no new rows", flush=True)
                break
            if shape != loaded_shape:  # rows of one shape run together: the model loads once for them
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                dtype = "bfloat16" if device.type == "cuda" else "float32"
                cfg = ModelConfig(name=shape, source="shape", shape=shape, device=device.type, dtype=dtype)
                spec = model_spec(cfg)
                model, _ = load_model(cfg, with_tokenizer=False)
                env, loaded_shape = environment(device), shape
                warm = Engine(model, None, Full(), spec, prefill_chunk=args.prefill_chunk, engine="eager")
                warm.generate_batch([Request(list(range(1, 300)), 4, min_new_tokens=4)])  # module load, cuBLAS
            row = run_row(model, spec, method_name, size, context, batch, engine_name, args, bandwidth)
            row.update(
                shape=shape,
                quant_launch=asdict(quant_kernels.LAUNCH),
                bandwidth_bytes_per_s=bandwidth,
                environment=env,
                commit=args.commit or env.get("git_commit"),
            )
            out.write(json.dumps(row, default=str) + "\n")
            out.flush()
            rows.append(row)
            print(format_row(row), flush=True)
    print("\n" + "\n".join(format_row(row) for row in rows))
    print(f"wall {time.perf_counter() - began:.0f} s", flush=True)


def quant_launch(overrides: list[str]) -> quant_kernels.LaunchConfig:
    """The default launch with FIELD=VALUE overrides (integers; booleans as 0/1 or true/false)."""
    fields = {f.name: f.type for f in dataclasses.fields(quant_kernels.LaunchConfig)}
    changes = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--quant-launch {item!r} is not valid: FIELD=VALUE, FIELD one of {list(fields)}")
        is_flag = fields[name] in (bool, "bool")
        changes[name] = value.lower() in ("1", "true") if is_flag else int(value)
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
        plan.append((fields[0], fields[1], int(fields[2]), int(fields[3]), int(fields[4]), engine))
    return plan


def format_row(row: dict) -> str:
    head = (
        f"{row.get('shape', ''):<13}{row['method']:<13}{row['budget'] or '-':>6}{row['context']:>7}"
        f"{row['batch']:>3} {row['engine']:<9}"
    )
    if row["status"] != "ok":
        return head + f" {row['status']}: {row.get('error', '')[:60]}"
    return head + (
        f" prefill {row['prefill_s']:6.2f}s  decode {row['decode_ms_per_step']:7.2f} ms"
        f"  floor {row['floor_ms']:6.2f} ms  x{row['x_floor']:5.2f}  {row['tokens_per_s']:8.1f} tok/s"
        f"  kv {row['kv_bytes_device'] / 2**20:8.1f} MiB  peak {row['peak_allocated_bytes'] / 2**30:5.1f} GiB"
    )


if __name__ == "__main__":
    main()

"""Post-hoc Cross-Layer Attention on the embedded model: WikiText-2 perplexity and measured KV bytes per token.

    nice -n 10 python benchmarks/cla_posthoc.py   # CPU, the defaults below: 17 min on 2 cores shared (load ~9)

SmolLM2-135M (30 layers, 3 KV heads) was trained without sharing; `method=cla` makes each group of s layers
attend over the first layer's keys and values. Rows: s = 1 (the dense cache), 2, 3, and s = 2 with the lower
15 layers exempt (sharing only in the upper half). This is an ablation, not the CLA paper's setting (the paper
trains with sharing from scratch): a large loss is expected.

Perplexity: the WikiText-2 task's `stream` protocol (`tasks/wikitext2.py`): windows of `--prefix` tokens,
prefilled through the cache, followed by `--continuation` tokens predicted and fed one at a time through it.
Every row scores the same tokens. Bytes: what the cache holds after the window (`KVCache.kv_bytes`, counted
from its tensors; float32 on CPU), per token held (prefix + continuation), beside the dense cache's.

Before the rows, a check that the loss is the method's and not a bug: on the text's first `--check-tokens`
tokens, the logits through the cache (prefill, then decode one token at a time) are compared with
transformers' own eager attention, no cache, whose consumer layers' k_proj/v_proj outputs are replaced by
their producer's (forward hooks): the largest logit difference and both perplexities go into each row.

Writes benchmarks/results/cla_posthoc.json (rows, settings, environment, commit) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from quant_accuracy import wikitext  # the same stream-perplexity loop and byte counts (a sibling script)

from kvbench.engine import Engine
from kvbench.method import Method
from kvbench.methods.cla import CLA
from kvbench.models import ModelConfig, load_model, model_spec
from kvbench.records import environment, git_commit, write_json_atomic
from kvbench.tasks.wikitext2 import WikiText2

OUT = Path(__file__).resolve().parent / "results" / "cla_posthoc.json"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def methods() -> list[tuple[str, Method]]:
    return [
        ("s=1 (dense)", CLA(sharing=1)),
        ("s=2", CLA(sharing=2)),
        ("s=3", CLA(sharing=3)),
        ("s=2, layers 0-14 exempt", CLA(sharing=2, exempt_layers=15)),
    ]


def hooked_reference_logits(model, ids: list[int], producer_of) -> torch.Tensor:
    """Logits [T, vocab] of eager attention without a cache, layer i's k_proj/v_proj outputs being those of
    layer producer_of(i) (RoPE then puts them at the same positions: the producer's keys and values)."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    produced: dict[tuple[int, str], torch.Tensor] = {}

    def share(idx: int, name: str):
        def hook(module, inputs, output):
            if producer_of(idx) == idx:
                produced[idx, name] = output
                return None
            return produced[producer_of(idx), name]

        return hook

    for idx, layer in enumerate(reference.model.layers):
        for name in ("k_proj", "v_proj"):
            getattr(layer.self_attn, name).register_forward_hook(share(idx, name))
    with torch.no_grad():
        return reference(input_ids=torch.tensor([ids])).logits[0]


def reference_check(engine: Engine, ids: list[int]) -> dict[str, float]:
    """The cache's logits (first half prefilled, the rest decoded) against `hooked_reference_logits`."""
    prompt, decode = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    cache = engine.new_cache(len(prompt), len(decode))
    with torch.inference_mode():
        logits = [engine._prefill(cache, prompt, all_logits=True)]
        cache.finish_prefill()
        for step, token in enumerate(decode[:-1]):
            logits.append(engine._forward(cache, [token], len(prompt) + step))
    got = torch.cat(logits)
    expected = hooked_reference_logits(engine.model, ids[:-1], lambda i: engine.method.kv_producer(i, engine.spec))
    targets = torch.tensor(ids[1:])

    def ppl(scores: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(scores.float(), targets).exp())

    return {
        "check_max_logit_diff": float((got - expected).abs().max()),
        "check_ppl": ppl(got),
        "check_ppl_reference": ppl(expected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--check-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_cfg = ModelConfig(device="cpu")
    model, tokenizer = load_model(model_cfg)
    spec = model_spec(model_cfg)
    task = WikiText2(
        data_dir=str(DATA), prefix_tokens=args.prefix, continuation_tokens=args.continuation, limit=args.windows
    )
    check_ids = tokenizer(task.text())["input_ids"][: args.check_tokens]
    rows = []
    for name, method in methods():
        method.check(spec)
        engine = Engine(model, tokenizer, method, spec)
        row = {"method": name, "config": method.describe()}
        row |= reference_check(engine, check_ids)
        row |= wikitext(engine, task, tokenizer)
        rows.append(row)
        print(f"{name}: ppl {row['perplexity']:.3f}, {row['kv_bytes_per_token']:.0f} B/token "
              f"({row['wikitext_seconds']:.0f} s); reference check: max logit diff {row['check_max_logit_diff']:.1e}, "
              f"ppl {row['check_ppl']:.4g} vs {row['check_ppl_reference']:.4g}", flush=True)  # fmt: skip
    settings = vars(args) | {"out": str(args.out), "model": model_cfg.name, "text": "wikitext2 test, stream protocol"}
    payload = {"settings": settings, "rows": rows, "environment": environment(torch.device("cpu"))}
    payload["commit"] = git_commit()
    write_json_atomic(args.out, payload)
    print("\n| sharing | perplexity | x dense | KV bytes/token (measured) | x fewer than dense |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = row["perplexity"] / rows[0]["perplexity"]
        fewer = row["dense_kv_bytes_per_token"] / row["kv_bytes_per_token"]
        print(f"| {row['method']} | {row['perplexity']:.2f} | {ratio:.2f} | {row['kv_bytes_per_token']:.0f} | "
              f"{fewer:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

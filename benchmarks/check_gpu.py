"""Correctness on a GPU of what the CPU test suite cannot reach: run before trusting `speed.py`'s numbers.

    PYTHONPATH=. python benchmarks/check_gpu.py                                  # every check
    PYTHONPATH=. python benchmarks/check_gpu.py --checks token_stores engines

1. `kvbench.host_pages`: the Triton kernels that write to and gather from pinned host memory equal the
   same copies done with torch on host tensors (fresh random data, masked rows, poisoned targets).
2. `kvbench.page_selection` and `kvbench.cuboid_scores`: ArkVale's Triton kernels equal their plain-PyTorch
   references on the GPU, at the paper setting's shapes (4 sequences, 32 heads, 1,026 pages).
3. Every method gives the same greedy tokens eagerly and with the eager step captured in a CUDA graph
   (`graph`; the projections unfused in both), on a real-shape model with random weights, batch 2, prompts
   of different lengths; for
   `compiled` (full only) it reports how many tokens agree (bf16 fusion may break near-ties), and requires
   two compiled engines to give the same tokens (a kernel that raced, or read memory nothing wrote, might not).
4. `kvbench.token_quant.quantize_tokens_into` (the decode step's 4-bit token kernel, which writes the six
   stores itself): every byte of the stores against the quantize-then-index reference on the GPU, at the 8B
   shape (4 sequences, 8 KV heads, head_dim 128), one slot past the end; rotated within one code step.
5. `kvbench.kernels.decode_attention` over each sequence's length (the dense layer's form) equals the same
   kernel over the positions the lengths stand for, bit for bit, and the float32 reference.
6. `kvbench.kernels.received_attention_prefill` (H2O's prefill scores) against its float32 reference, at
   the 8B shape's heads and 4,096-query chunks.
7. `kvbench.score_eviction.accumulate_and_evict` (H2O's decode bookkeeping) equals its reference bit for bit,
   at batch 64's 512 rows.
8. `inductor_options` (with `--inductor-option KEY=VALUE ...`, e.g. `combo_kernels=1`; `--methods` picks
   which): every method's compiled step with the options gives the same greedy tokens as without them. Meant
   for options that regroup kernels and launches, not arithmetic; what must pass before such an option
   becomes the engine's default. Random bf16 weights leave near-ties that any regrouping of a reduction can
   flip (combo kernels parted 9 of 13 methods' tokens, e725901): `--dtype float32` runs the model in float32,
   where rounding is ~2^16 times finer, so tokens that still part point at a real difference.
Prints one line per check and exits non-zero on the first mismatch (the options check: after every method).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from speed import make_method  # beside this file

from kvbench import kernels, score_eviction, token_quant
from kvbench.cuboid_scores import cuboid_scores, query_halves
from kvbench.engine import Engine, Request, Timer, parse_inductor_options
from kvbench.hadamard import hadamard_matrix
from kvbench.host_pages import gather_pages, pinned_copy, uses_kernels, write_rows
from kvbench.methods.arkvale import ArkVale
from kvbench.methods.full import Full
from kvbench.methods.h2o import H2O
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.models import ModelConfig, load_model, model_spec
from kvbench.page_selection import PageSchedule, select_pages, select_pages_reference
from kvbench.quant import Quantized


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        sys.exit(1)


def check_host_pages() -> None:
    b, h, n, s, d = 3, 4, 640, 96, 128
    host = torch.randn(b, h, n, d, dtype=torch.bfloat16).pin_memory()
    expected = host.clone()
    check("host memory is pinned and the kernels are used", uses_kernels(host, torch.empty(1, device="cuda")))
    rows = torch.randint(0, n, (b,), device="cuda")
    source = torch.randn(b, h, 1, d, dtype=torch.bfloat16, device="cuda")
    second_host = torch.randn(b, h, n, d, dtype=torch.bfloat16).pin_memory()
    second_expected = second_host.clone()
    # The value's layout in a Llama layer: a head-transposed slice of the fused projection (strides unlike the key's).
    fused = torch.randn(b, 1, h, 3 * d, dtype=torch.bfloat16, device="cuda")
    second_source = fused[..., d : 2 * d].transpose(1, 2)
    write_rows((host,), rows, (source,))
    torch.cuda.synchronize()
    expected[torch.arange(b), :, rows.cpu()] = source.cpu()[:, :, 0]
    check("write_rows", torch.equal(host, expected))
    rows = (rows + 1) % n
    write_rows((host, second_host), rows, (source, second_source))  # one launch for both
    torch.cuda.synchronize()
    expected[torch.arange(b), :, rows.cpu()] = source.cpu()[:, :, 0]
    second_expected[torch.arange(b), :, rows.cpu()] = second_source.cpu()[:, :, 0]
    check("write_rows, a pair", torch.equal(host, expected) and torch.equal(second_host, second_expected))

    # Pages of 32 rows (20 in the backup, 3 slots), 4 KV heads in 2 groups, 3 pairs a group.
    p, groups, recalled = 32, 2, 3
    pages = torch.stack([torch.randperm(n // p)[:recalled] for _ in range(b * groups)]).view(b, groups, recalled)
    slots = torch.stack([torch.randperm(s // p)[:recalled] for _ in range(b * groups)]).view(b, groups, recalled)
    fetch = torch.rand(b, groups, recalled) < 0.5
    second_host = pinned_copy(torch.randn(b, h, n, d, dtype=torch.bfloat16))  # ArkVale's own pinning
    check("pinned_copy is pinned", second_host.is_pinned() and uses_kernels(second_host, source))
    for hosts in ((host,), (host, second_host)):  # one pair, and keys and values in one launch
        targets = tuple(torch.full((b, h, s, d), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in hosts)
        positions = torch.full((b, h, s), -7, device="cuda")
        gather_pages(hosts, targets, positions, pages.cuda(), slots.cuda(), fetch.cuda(), p)
        torch.cuda.synchronize()
        want_positions = torch.full((b, h, s), -7)
        for index, (one_host, target) in enumerate(zip(hosts, targets, strict=True)):
            reference = torch.full((b, h, s, d), float("nan"), dtype=torch.bfloat16)
            for bb in range(b):
                for hh in range(h):
                    for r in range(recalled):
                        g = hh // (h // groups)
                        if fetch[bb, g, r]:
                            page, slot = int(pages[bb, g, r]), int(slots[bb, g, r])
                            reference[bb, hh, slot * p : slot * p + p] = one_host[bb, hh, page * p : page * p + p]
                            want_positions[bb, hh, slot * p : slot * p + p] = torch.arange(page * p, page * p + p)
            got = target.cpu()
            same = torch.equal(got.isnan(), reference.isnan()) and torch.equal(got.nan_to_num(), reference.nan_to_num())
            same = same and torch.equal(positions.cpu(), want_positions)
            check(f"gather_pages, pair {index + 1} of {len(hosts)} in one launch (pages not fetched untouched)", same)


def check_arkvale_kernels() -> None:
    b, h, n, s, d, k = 4, 32, 1026, 64, 128, 30
    generator = torch.Generator().manual_seed(0)
    upper = torch.randn(b, h, n, d, generator=generator).to("cuda", torch.bfloat16)
    lower = upper - torch.rand(b, h, n, d, generator=generator).to("cuda", torch.bfloat16)
    query = torch.randn(b, 4 * h, d, generator=generator).to("cuda", torch.bfloat16)  # 4 query heads a KV head
    got = cuboid_scores(query, upper, lower)
    # float64 sums of the query halves as the kernel rounds them (to the digests' bfloat16).
    positive, negative = (half.double() for half in query_halves(query.cpu(), h, torch.bfloat16))
    high, low = upper.double().cpu(), lower.double().cpu()
    want = torch.einsum("bhd,bhnd->bhn", positive, high) + torch.einsum("bhd,bhnd->bhn", negative, low)
    error = (got.cpu().double() - want).abs().max().item()
    check("cuboid_scores against float64 sums", error < 1e-3 * want.abs().max().item(), f"(max error {error:.2e})")

    # 32 heads in 4 groups; distinct scores: both sides must pick the same pages.
    groups = 4
    head_scores = torch.randn(b, h, n, generator=generator).cuda()
    slot_page = torch.stack([torch.randperm(n, generator=generator)[:s] for _ in range(b * groups)])
    slot_page = slot_page.view(b, groups, s).cuda()
    slot_page[:, :, -3:] = -1  # empty slots
    schedule = PageSchedule(n_sink=1, n_window=2, page_size=32, capacity=2048)
    tokens = torch.tensor([32 * n - 40, 32 * (n - 40), 32 * 700, 2048], device="cuda")  # the last: inactive
    for cap in (None, 0.3):
        counters = torch.stack([torch.arange(b * groups).float().view(b, groups), torch.zeros(b, groups)], -1).cuda()
        want_slot_page, want_counters = slot_page.clone(), counters.clone()
        got_slot_page = slot_page.clone()
        pages, slots, fetch = select_pages(head_scores, got_slot_page, counters, tokens, schedule, k, cap)
        want = select_pages_reference(head_scores, want_slot_page, want_counters, tokens, schedule, k, cap)
        want_pages, want_slots, want_fetch = want
        fetched = torch.arange(fetch.shape[-1], device="cuda") < fetch.sum(-1, keepdim=True)  # ties order freely past
        same = torch.equal(fetch.bool(), want_fetch) and torch.equal(pages[fetched], want_pages[fetched])
        same = same and torch.equal(slots[fetched], want_slots[fetched])
        kept = torch.equal(got_slot_page, want_slot_page) and torch.equal(counters, want_counters)
        check(f"select_pages against its reference, cap {cap}", same and kept, f"({int(fetch.sum())} pages fetched)")
    # Many rows, seeds and widths, 4 and 8 warps: the kernel moves values between threads (`tl.gather` of the
    # sums and of the victim slots), which Triton's interpreter (one thread) cannot test.
    shapes = [(4, 4, 8, 1026, 64, 30, 0.3), (8, 8, 1, 300, 64, 60, 4.0), (16, 2, 4, 2050, 128, 100, None)]
    for b, groups, heads, n, s, k, cap in shapes:
        mismatches = 0
        for seed in range(10):
            generator = torch.Generator().manual_seed(seed)
            head_scores = torch.randn(b, groups * heads, n, generator=generator).cuda()
            slot_page = torch.stack([torch.randperm(n, generator=generator)[:s] for _ in range(b * groups)])
            slot_page = slot_page.view(b, groups, s).cuda()
            counters = torch.stack(
                [torch.randint(0, 50, (b, groups), generator=generator).float(), torch.zeros(b, groups)], -1
            ).cuda()
            tokens = torch.randint(s * 32 - 40, n * 32, (b,), generator=generator).cuda()
            schedule = PageSchedule(n_sink=1, n_window=2, page_size=32, capacity=s * 32)
            mine, theirs = (slot_page.clone(), counters.clone()), (slot_page.clone(), counters.clone())
            got = select_pages(head_scores, *mine, tokens, schedule, k, cap)
            want = select_pages_reference(head_scores, *theirs, tokens, schedule, k, cap)
            fetched = torch.arange(got[2].shape[-1], device="cuda") < got[2].sum(-1, keepdim=True)
            same = torch.equal(got[2].bool(), want[2]) and all(
                torch.equal(x[fetched], y[fetched]) for x, y in zip(got[:2], want[:2], strict=True)
            )
            mismatches += not (same and all(torch.equal(x, y) for x, y in zip(mine, theirs, strict=True)))
        check(
            f"select_pages, {b}x{groups} rows of {n} pages, cap {cap}, 10 seeds",
            mismatches == 0,
            f"({mismatches} differ)",
        )


def check_token_stores() -> None:
    b, h, slots, d, group = 4, 8, 64, 128, 128
    generator = torch.Generator().manual_seed(2)
    keys, values = (torch.randn(b, h, 1, d, generator=generator).to("cuda", torch.bfloat16) for _ in range(2))
    codes = torch.randint(0, 256, (2, b, h, slots, d // 2), dtype=torch.uint8, generator=generator).cuda()
    params = torch.rand(4, b, h, slots, d // group, generator=generator).half().cuda()
    where = torch.tensor([5, 0, slots - 1, slots + 3], device="cuda")  # the last clamps to slot 63
    for rotate in (False, True):
        rotation = hadamard_matrix(d, dtype=torch.int8, normalized=False).cuda() if rotate else None
        written = []
        for kernel in (True, False):
            stores = [codes[0].clone(), params[0].clone(), params[1].clone(), codes[1].clone(), *params[2:].clone()]
            if kernel:
                key_store, value_store = Quantized(*stores[:3]), Quantized(*stores[3:])
                token_quant.quantize_tokens_into(keys, values, rotation, 4, group, 0.95, key_store, value_store, where)
            else:
                token_quant._write_reference(keys, values, rotation, 4, group, 0.95, stores, where)
            written.append(stores)
        torch.cuda.synchronize()
        name = f"quantize_tokens_into{', rotated' if rotate else ''}: stores == quantize-then-index"
        if not rotate:
            check(name, all(torch.equal(x, y) for x, y in zip(*written, strict=True)))
            continue
        # Rotated: the kernel's float32 product sums in another order than the butterfly, so a value may
        # land on the neighbouring code (test_token_quant's tolerance).
        kernel_codes, reference_codes = (torch.cat([w[0], w[3]]) for w in written)
        steps = (nibbles(kernel_codes) - nibbles(reference_codes)).abs().max().item()
        moved = (kernel_codes != reference_codes).float().mean().item()
        scale = max(
            ((x.float() - y.float()).abs() / y.float().abs().clamp_min(1e-6)).max().item()
            for x, y in zip(written[0][1:3] + written[0][4:], written[1][1:3] + written[1][4:], strict=True)
        )
        check(name, steps <= 1 and moved < 0.02 and scale < 2e-3, f"(codes moved {moved:.4f}, scale {scale:.1e})")


def nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Each byte's two 4-bit codes, as integers [2, ...]."""
    return torch.stack([codes & 15, codes >> 4]).int()


def check_engines() -> None:
    model, spec, requests = engine_setup()
    methods = {
        "full": Full(),
        "streamingllm": StreamingLLM(budget=512),
        "snapkv": SnapKV(budget=512),
        "h2o": H2O(budget=512),
        "arkvale": ArkVale(budget=512),
    }
    tokens_of = {}  # each method's eager tokens
    for name, method in methods.items():
        engines = ("eager", "graph")
        tokens = {}
        for engine_name in engines:
            # Unfused on both sides: the fast engines fuse the projections that share an input, in place (every
            # later engine on this model runs them fused), and a fused product may round differently. At
            # af6f79b on an H100 full, the first method (eager unfused, graph fused), parted at steps 35 and 7;
            # the methods after it, fused on both sides, agreed.
            engine = Engine(model, None, method, spec, prefill_chunk=1024, engine=engine_name, fuse=False)
            generations = engine.generate_batch(requests)
            tokens[engine_name] = [g.token_ids for g in generations]
            m = generations[0].measurement
            print(
                f"     {name:<13}{engine_name:<9}{m.decode_s * 1000 / max(m.decode_steps, 1):.2f} ms/step", flush=True
            )
        check(f"{name}: graph == eager", tokens["graph"] == tokens["eager"])
        tokens_of[name] = tokens["eager"]
    # Two compiled engines, the second compiling anew (from Inductor's on-disk cache, autotuning included),
    # run the same kernels on the same inputs: a kernel that raced, or read memory nothing wrote, could
    # change tokens. Should Inductor tune anew, a new reduction order could too: the first differing
    # steps say where to look.
    compiled = []
    for _ in range(2):
        engine = Engine(model, None, Full(), spec, prefill_chunk=1024, engine="compiled")
        compiled.append([g.token_ids for g in engine.generate_batch(requests)])
    same = compiled[0] == compiled[1]
    where = [first_difference(x, y) for x, y in zip(*compiled, strict=True)]
    check("full: compiled twice, same tokens", same, "" if same else f"(first differing steps {where})")
    # ArkVale's compiled step mutates its slots and counters inside its selection operator: twice, same tokens
    # (a race in the kernel, or a mutation Inductor dropped, would show here or against eager).
    arkvale = []
    for _ in range(2):
        engine = Engine(model, None, ArkVale(budget=512), spec, prefill_chunk=1024, engine="compiled")
        arkvale.append([g.token_ids for g in engine.generate_batch(requests)])
    where = [first_difference(x, y) for x, y in zip(*arkvale, strict=True)]
    check("arkvale: compiled twice, same tokens", arkvale[0] == arkvale[1], f"(first differing steps {where})")
    agree = [first_difference(x, y) for x, y in zip(arkvale[0], tokens_of["arkvale"], strict=True)]
    print(f"note arkvale: compiled and eager greedy tokens agree for the first {agree} of 40", flush=True)
    # Compiled kernels fuse and reassociate bf16 arithmetic, and random weights leave near-ties among
    # 128k logits, so greedy tokens may part early: reported, not required (the CPU tests require them
    # equal in float32).
    eager = [g.token_ids for g in Engine(model, None, Full(), spec, prefill_chunk=1024).generate_batch(requests)]
    agree = [first_difference(x, y) for x, y in zip(compiled[0], eager, strict=True)]
    print(f"note full: compiled and eager greedy tokens agree for the first {agree} of 40", flush=True)


def engine_setup(dtype: str = "bfloat16") -> tuple:
    """Llama-3.1-8B's shape with random weights on the GPU, and two prompts of different lengths."""
    cfg = ModelConfig(name="llama-3.1-8b", source="shape", shape="llama-3.1-8b", device="cuda", dtype=dtype)
    model, _ = load_model(cfg, with_tokenizer=False)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128000, (n,), generator=generator).tolist() for n in (3000, 2200)]
    return model, model_spec(cfg), [Request(p, 40, min_new_tokens=40) for p in prompts]


def check_attention_lengths() -> None:
    """The dense layer's decode attention over lengths (no positions; the split kernel stops at the length)
    against the same kernel over the positions they stand for, and the float32 reference, at Llama-3.1-8B's
    heads: lengths 0, a tile boundary, odd, and the whole buffer."""
    b, hkv, group, s, d = 4, 8, 4, 32768 + 64, 128
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(b, hkv * group, d, generator=generator).to("cuda", torch.bfloat16)
    keys, values = (torch.randn(b, hkv, s, d, generator=generator).to("cuda", torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([0, 4096, 30001, s], device="cuda")
    positions = kernels.as_positions(lengths, keys)
    out, lse = kernels.decode_attention(query, keys, values, lengths, d**-0.5)
    by_positions = kernels.decode_attention(query, keys, values, positions, d**-0.5)
    same = torch.equal(out, by_positions[0]) and torch.equal(lse, by_positions[1])
    check("decode_attention over lengths == over their positions", same)
    ref_out, ref_lse = kernels.decode_attention_reference(query, keys, values, positions, d**-0.5)
    live = lengths > 0
    error = (out[live].float() - ref_out[live].float()).abs().max().item()
    lse_error = (lse[live] - ref_lse[live]).abs().max().item()
    dead = bool((out[~live] == 0).all()) and bool(torch.isneginf(lse[~live]).all())
    ok = error < 2e-2 and lse_error < 1e-3 and dead
    check("decode_attention over lengths against float32", ok, f"(max error {error:.1e}, lse {lse_error:.1e})")


def timed_second_call(fn: Callable, make_args: Callable[[], tuple]) -> tuple[object, tuple, float]:
    """fn's result on fresh arguments, those arguments (an in-place fn changes them) and its seconds: a first
    call on other fresh arguments warms it up (Triton's compile, the allocator)."""
    fn(*make_args())
    args = make_args()
    with Timer(torch.device("cuda")) as timer:
        result = fn(*args)
    return result, args, timer.seconds


def check_prefill_scores() -> None:
    """H2O's prefill scores (`kernels.received_attention_prefill`: two Triton passes, no probability matrix)
    against the float32 reference, at Llama-3.1-8B's heads and the engine's 4,096-query chunks: a first chunk
    (S = T) and a later one (S = 3T), two sequences (the batch offsets); each KV head's row sums to G * T.
    Prints both times (one call each, after a warm-up call)."""
    check("Triton installed (the kernels run, not their references)", kernels.triton is not None)
    b, hkv, group, t, d = 2, 8, 4, 4096, 128
    generator = torch.Generator().manual_seed(5)
    for s in (t, 3 * t):
        query = torch.randn(b, hkv * group, t, d, generator=generator).to("cuda", torch.bfloat16)
        keys = torch.randn(b, hkv, s, d, generator=generator).to("cuda", torch.bfloat16)
        args = (query, keys, d**-0.5)  # read only: the same arguments every call
        got, _, seconds = timed_second_call(kernels.received_attention_prefill, lambda: args)  # noqa: B023
        want, _, reference_seconds = timed_second_call(kernels.received_attention_prefill_reference, lambda: args)  # noqa: B023
        error = ((got - want).norm() / want.norm()).item()
        sums = (got.sum(-1) - group * t).abs().max().item() / (group * t)
        took = f"{1000 * seconds:.1f} ms against {1000 * reference_seconds:.1f} ms"
        detail = f"(S {s}: rel error {error:.1e}, row sums {sums:.1e}; {took})"
        check("received_attention_prefill against float32", error < 1e-3 and sums < 1e-4, detail)


def check_score_eviction() -> None:
    """H2O's decode bookkeeping (`score_eviction.accumulate_and_evict`: one Triton program a row) against its
    PyTorch reference on the GPU, bit for bit, at the shape profiled in session 55 (8k, batch 64: 512 rows
    of 2,112 slots, capacity 2,049, recent 1,024): every row full (one eviction each) but a few with an empty
    slot, a `seen` per sequence, ties in the scores. Prints both times (one call each, after a warm-up)."""
    check("Triton installed (the kernels run, not their references)", kernels.triton is not None)
    b, h, slots, capacity, recent = 64, 8, 2112, 2049, 1024
    generator = torch.Generator().manual_seed(11)
    seen = torch.randint(capacity + recent, 9000, (b,), generator=generator)
    positions = torch.full((b, h, slots), -1, dtype=torch.long)
    for row in range(b):  # distinct live positions below each sequence's seen
        for head in range(h):
            positions[row, head, :capacity] = torch.randperm(int(seen[row]), generator=generator)[:capacity]
    positions[torch.rand(b, h, generator=generator) < 0.1, 7] = -1  # a tenth of the rows keep an empty slot
    scores = torch.randint(0, 50, (b, h, slots), generator=generator).float()  # ties
    received = torch.randint(0, 4, (b, h, slots), generator=generator).float() / 4
    inputs = [t.to("cuda") for t in (scores, received, positions, seen)]

    def fresh_inputs() -> tuple:
        return (*[t.clone() for t in inputs], recent, capacity)

    _, got, seconds = timed_second_call(score_eviction.accumulate_and_evict, fresh_inputs)
    _, want, reference_seconds = timed_second_call(score_eviction.accumulate_and_evict_reference, fresh_inputs)
    same = all(torch.equal(a, b) for a, b in zip(got[:4], want[:4], strict=True))
    evicted = int((got[2] < 0).sum() - (inputs[2] < 0).sum())
    took = f"{1e6 * seconds:.0f} us against {1e6 * reference_seconds:.0f} us"
    check("accumulate_and_evict == its reference", same, f"({evicted} evictions; {took})")


# Every method (`speed.py`'s name and size), at settings that compress the engines check's prompts (3,000 and
# 2,200 tokens).
OPTION_METHODS = {
    "full": ("full", 0),
    "streamingllm": ("streamingllm", 512),
    "snapkv": ("snapkv", 512),
    "h2o": ("h2o", 512),
    "arkvale": ("arkvale", 512),
    "scissorhands": ("scissorhands", 512),
    "snapstream": ("snapstream", 512),
    "kivi4": ("kivi", 4),
    "kivi2": ("kivi", 2),
    "quarot": ("quarot", 4),
    "rtn": ("rtn", 4),
    "zipcache": ("zipcache", 0),
    "cla": ("cla", 2),
}


def check_inductor_options(options: dict, methods: list[str], dtype: str = "bfloat16") -> None:
    """Each method's compiled step with `options` against the same step without them: same greedy tokens,
    the model in `dtype`."""
    if not options:
        check("inductor_options: given with --inductor-option", False)
    model, spec, requests = engine_setup(dtype)
    parted = []
    for name in methods:
        tokens = []
        for given in ({}, options):
            engine = Engine(
                model,
                None,
                make_method(*OPTION_METHODS[name]),
                spec,
                prefill_chunk=1024,
                engine="compiled",
                inductor_options=given,
            )
            generations = engine.generate_batch(requests)
            tokens.append([g.token_ids for g in generations])
            m = generations[0].measurement
            label = "with" if given else "without"
            print(f"     {name:<13}{label:<8}{m.decode_s * 1000 / max(m.decode_steps, 1):.2f} ms/step", flush=True)
        where = [first_difference(x, y) for x, y in zip(*tokens, strict=True)]
        same = tokens[0] == tokens[1]
        print(f"{'ok  ' if same else 'FAIL'} {name}: compiled with {options} == without {'' if same else where}")
        parted += [] if same else [name]
    check(f"inductor_options {options}, {dtype}: every method's tokens unchanged", not parted, f"(parted: {parted})")


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


CHECKS = {
    "host_pages": check_host_pages,
    "arkvale_kernels": check_arkvale_kernels,
    "token_stores": check_token_stores,
    "engines": check_engines,
    "attention_lengths": check_attention_lengths,
    "prefill_scores": check_prefill_scores,
    "score_eviction": check_score_eviction,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", nargs="+", choices=[*CHECKS, "inductor_options"], default=list(CHECKS))
    parser.add_argument(
        "--inductor-option", dest="inductor_options", nargs="+", default=[], metavar="KEY=VALUE", help="for 8."
    )
    parser.add_argument("--methods", nargs="+", choices=list(OPTION_METHODS), default=list(OPTION_METHODS))
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the model's, for 8.")
    args = parser.parse_args()
    try:
        options = parse_inductor_options(args.inductor_options)
    except ValueError as error:
        parser.error(str(error))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the checks compare GPU kernels and captured steps with their CPU references)")
    for name in args.checks:
        if name == "inductor_options":
            check_inductor_options(options, args.methods, args.dtype)
        else:
            CHECKS[name]()

"""ArkVale's per-step parts alone, one GPU: the page estimate and the recall of pages from host memory.

    PYTHONPATH=. python benchmarks/arkvale_parts.py --commit <sha> --out arkvale_parts.jsonl   # ~30 s
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/arkvale_parts.py --device cpu --small   # a smoke run

Shapes of the paper's setting (Llama-2-7B: 32 KV heads of 128; 4 sequences of 30,720 tokens plus decode
room, pages of 32, so 1,026 pages; 2,048 resident slots), and Llama-3.1-8B's 8 KV heads at batch 1.
- `scores`: the digest estimate q⁺·upper + q⁻·lower per page and KV head, as two cuBLAS products
  (`einsum`, what the step ran before `kvbench.cuboid_scores`) and as the Triton pass; floor = both
  digests' bytes / the read bandwidth.
- `select`: `kvbench.page_selection.select_pages` (the top pages, those missing, their victims, the recall
  cap and the bookkeeping) for the paper's batch (4 rows of 32 heads, 30,720 + 48 tokens: 962 pages) and
  Llama-3.1-8B's batch 1 (one row of 8 heads, 32,768 + 48 tokens: 1,026 pages), each row's pages ending at
  its newest token (a layer's have room for the rest of the generation past it), 64 slots, k = 30, cap 0.3;
  against its PyTorch reference.
- `recall`: one page (32 rows of keys and values, every KV head) recalled from pinned host memory into
  device slots for 0, 1 or all 4 sequences, by `kvbench.host_pages.gather_pages`: keys and values in two
  launches or as a pair in one, under tile and warp choices; `dma` is the copy engine moving the same bytes
  from one contiguous pinned buffer (`Tensor.copy_`), the PCIe rate to compare with.
- `recall_cold`: every sequence's page, new pages on every call, over 8.3 GB of host keys: the present
  host layout against a page-major one (an experiment, its kernel here).
- `backup`: one sequence's prompt backup of one layer (keys and values of 30,720 tokens, 32 heads) from the
  device to host memory, wall time with a sync, median of 3: as `ArkValeLayer.finish_prefill` copies it
  (one (head) at a time into fresh pageable memory) and alternatives (one copy; memory already touched;
  page-locked by `host_pages.pinned_copy`, whose registration is timed with it), plus `pinned_copy` of a
  pageable backup (the host-to-host copy `stack` makes). ArkVale's prefill took 14-17 s a 30k sequence on
  the H200 against dense's 2.4 s: which of these is it.
The first three are timed as the step runs them (CUDA-graph replays of 20 calls taking 8 input sets in
turn, median of 5, `quant_attention.py`'s `time_us`). Appends one JSON line per row to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_attention import environment, read_bandwidth, time_us

from kvbench import cuboid_scores, host_pages, kernels, page_selection

PAGE = 32
INPUT_SETS = 8
COLD_SETS = 20  # one page set per timed call of a replay (quant_attention.TIMED_CALLS)

if kernels.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _page_major_gather_kernel(
        host, target, pages, slots, take, heads, host_sb, host_sp, host_sh, target_sb, target_sh,
        PAGE_ROWS: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        """The experiment's layout: host [B, pages, H, PAGE_ROWS, D], one page of every head contiguous."""
        pid = tl.program_id(0)
        b, h = (pid // heads).to(tl.int64), pid % heads
        if tl.load(take + pid) != 0:
            page, slot = tl.load(pages + pid), tl.load(slots + pid)
            rows = tl.arange(0, PAGE_ROWS)[:, None] * D + tl.arange(0, D)[None, :]
            value = tl.load(host + b * host_sb + page * host_sp + h * host_sh + rows)
            tl.store(target + b * target_sb + h * target_sh + slot * PAGE_ROWS * D + rows, value)


def score_rows(batch: int, heads: int, pages: int, device: torch.device, bandwidth: float) -> list[dict]:
    gen = torch.Generator().manual_seed(batch * heads)
    inputs = []
    for _ in range(INPUT_SETS if device.type == "cuda" else 1):
        query = torch.randn(batch, heads, 128, generator=gen)
        upper = torch.randn(batch, heads, pages, 128, generator=gen)
        lower = upper - torch.rand(batch, heads, pages, 128, generator=gen)
        dtype = torch.bfloat16
        inputs.append(tuple(t.to(device, dtype) for t in (query, upper, lower)))
    got = cuboid_scores.cuboid_scores(*inputs[0])
    exact = cuboid_scores.cuboid_scores_reference(*(t.double() for t in inputs[0]))
    ok = bool(((got.double() - exact).abs() <= 1e-4 * (1 + exact.abs())).all())
    floor_us = 2 * inputs[0][1].numel() * 2 / bandwidth * 1e6
    calls = {
        "einsum": [lambda i=i: cuboid_scores.cuboid_scores_reference(*i) for i in inputs],
        "kernel": [lambda i=i: cuboid_scores.cuboid_scores(*i) for i in inputs],
    }
    shape = {"part": "scores", "batch": batch, "kv_heads": heads, "pages": pages, "ok": ok, "floor_us": floor_us}
    return [{**shape, "variant": name, "us": time_us(c, device)} for name, c in calls.items()]


def select_rows(batch: int, heads: int, tokens: int, slots: int, k: int, device: torch.device) -> list[dict]:
    """One page ranking per sequence (ArkVale's default: one group), every row past its slots."""
    gen = torch.Generator().manual_seed(11)
    pages = -(-tokens // PAGE)
    schedule = page_selection.PageSchedule(n_sink=1, n_window=2, page_size=PAGE, capacity=slots * PAGE)
    inputs = []
    for _ in range(INPUT_SETS if device.type == "cuda" else 1):
        head_scores = torch.randn(batch, heads, pages, generator=gen)
        slot_page = torch.stack([torch.randperm(pages, generator=gen)[:slots] for _ in range(batch)]).view(batch, 1, -1)
        counters = torch.zeros(batch, 1, 2)
        written = torch.randint(tokens - 40, tokens + 1, (batch,), generator=gen)
        inputs.append(tuple(t.to(device) for t in (head_scores, slot_page, counters, written)))
    scores, slot_page, counters, written = inputs[0]
    mine, theirs = (slot_page.clone(), counters.clone()), (slot_page.clone(), counters.clone())
    got = page_selection.select_pages(scores, *mine, written, schedule, k, 0.3)
    want = page_selection.select_pages_reference(scores, *theirs, written, schedule, k, 0.3)
    ok = torch.equal(got[2].bool(), want[2]) and all(torch.equal(x, y) for x, y in zip(mine, theirs, strict=True))
    calls = {
        "reference": [lambda i=i: page_selection.select_pages_reference(*i, schedule, k, 0.3) for i in inputs],
        "kernel": [lambda i=i: page_selection.select_pages(*i, schedule, k, 0.3) for i in inputs],
    }
    shape = {"part": "select", "batch": batch, "kv_heads": heads, "pages": pages, "ok": ok}
    return [{**shape, "variant": name, "us": time_us(c, device)} for name, c in calls.items()]


def recall_rows(batch: int, heads: int, pages: int, slots: int, device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    pinned = device.type == "cuda"
    hosts = tuple(torch.randn(batch, heads, pages * PAGE, 128, generator=gen).to(torch.bfloat16) for _ in range(2))
    if pinned:
        hosts = tuple(h.pin_memory() for h in hosts)
    targets = tuple(torch.zeros(batch, heads, slots, 128, dtype=torch.bfloat16, device=device) for _ in range(2))
    positions = torch.full((batch, heads, slots), -1, device=device)
    offsets = torch.arange(PAGE)
    rows = []
    for fetching in sorted({0, 1, batch}):
        sets = []
        for _ in range(INPUT_SETS if pinned else 1):
            # One page a head: each KV head its own group.
            page = torch.randint(0, pages, (batch, heads, 1), generator=gen)
            slot = torch.randint(0, slots // PAGE, (batch, heads, 1), generator=gen)
            fetch = (torch.arange(batch) < fetching).view(batch, 1, 1).expand(batch, heads, 1).contiguous()
            sets.append(tuple(t.to(device) for t in (page, slot, fetch)))
        # Correctness once: every fetched page lands, from the pair launch.
        page, slot, fetch = sets[0]
        host_pages.gather_pages(hosts, targets, positions, page, slot, fetch, PAGE)
        source, target = (page * PAGE + offsets.to(device)).cpu(), (slot * PAGE + offsets.to(device))
        ok = all(
            torch.equal(
                t[:fetching].gather(2, target[:fetching, :, :, None].expand(-1, -1, -1, 128)).cpu(),
                h[:fetching].gather(2, source[:fetching, :, :, None].expand(-1, -1, -1, 128)),
            )
            for h, t in zip(hosts, targets, strict=True)
        )
        moved = 2 * fetching * heads * PAGE * 128 * 2
        base = {"part": "recall", "batch": batch, "kv_heads": heads, "fetching": fetching, "bytes": moved, "ok": ok}
        variants = {
            "two launches, 16 rows, 4 warps": (16, 4, False),
            "pair, 16 rows, 4 warps": (16, 4, True),
            "pair, 32 rows, 4 warps": (32, 4, True),
            "pair, 32 rows, 8 warps": (32, 8, True),
            "pair, 16 rows, 2 warps": (16, 2, True),
        }
        for name, (block_rows, warps, pair) in variants.items():
            host_pages.GATHER_BLOCK_ROWS, host_pages.GATHER_WARPS = block_rows, warps

            def gather(s=None, pair=pair) -> None:
                if pair:
                    host_pages.gather_pages(hosts, targets, positions, *s, PAGE)
                else:
                    for h, t in zip(hosts, targets, strict=True):
                        host_pages.gather_pages((h,), (t,), positions, *s, PAGE)

            us = time_us([lambda s=s: gather(s) for s in sets], device)
            rows.append({**base, "variant": name, "us": us, "GBps": moved / us / 1e3})
        if fetching:
            flat = torch.empty(moved // 2, dtype=torch.bfloat16)
            staging = flat.pin_memory() if pinned else flat
            landing = torch.empty(moved // 2, dtype=torch.bfloat16, device=device)
            us = time_us([lambda a=landing, b=staging: a.copy_(b, non_blocking=True)], device)
            rows.append({**base, "ok": True, "variant": "dma (copy engine)", "us": us, "GBps": moved / us / 1e3})
    host_pages.GATHER_BLOCK_ROWS, host_pages.GATHER_WARPS = 16, 4
    return rows


def cold_recall_rows(batch: int, heads: int, pages: int, slots: int, device: torch.device) -> list[dict]:
    """One page for every sequence and head, new pages on every call of a replay, over a host backup the
    size of a 30k-token layer's (`pages` per head) several times over: whether the recall rate of the warm
    rows above holds when the GPU has not touched those host pages lately. Keys only (one tensor); the
    present layout [B, H, tokens, D] against a page-major one [B, pages, H, 32, D] (a page of every head
    contiguous: one 256 KB run instead of 32 runs of 8 KB)."""
    gen = torch.Generator().manual_seed(11)
    sets = []
    for _ in range(COLD_SETS):
        page = torch.randint(0, pages, (batch, heads, 1), generator=gen).to(device)
        slot = torch.randint(0, slots // PAGE, (batch, heads, 1), generator=gen).to(device)
        sets.append((page, slot))
    take = torch.ones(batch, heads, 1, dtype=torch.bool, device=device)
    moved = batch * heads * PAGE * 128 * 2
    rows = []
    base = {"part": "recall_cold", "batch": batch, "kv_heads": heads, "fetching": batch, "bytes": moved}
    pinned = device.type == "cuda"
    host = torch.empty(batch, heads, pages * PAGE, 128, dtype=torch.bfloat16, pin_memory=pinned)
    host.zero_()  # touches every page once
    target = torch.zeros(batch, heads, slots, 128, dtype=torch.bfloat16, device=device)

    positions = torch.full((batch, heads, slots), -1, device=device)

    def present(page, slot) -> None:
        host_pages.gather_pages((host,), (target,), positions, page, slot, take, PAGE)

    us = time_us([lambda p=p, t=t: present(p, t) for p, t in sets], device)
    rows.append({**base, "variant": "present layout", "us": us, "GBps": moved / us / 1e3, "ok": True})
    major = torch.empty(batch, pages, heads, PAGE, 128, dtype=torch.bfloat16, pin_memory=pinned)
    major.zero_()

    def page_major(page, slot) -> None:
        _page_major_gather_kernel[(batch * heads,)](
            major, target, page, slot, take[..., 0].contiguous(), heads,
            major.stride(0), major.stride(1), major.stride(2), target.stride(0), target.stride(1),
            PAGE_ROWS=PAGE, D=128,
        )  # fmt: skip

    page, slot = sets[0]
    rows_b, rows_h = torch.arange(batch).view(-1, 1), torch.arange(heads).view(1, -1)
    major[rows_b, page[..., 0].cpu(), rows_h] = torch.randn(batch, heads, PAGE, 128, generator=gen).to(major.dtype)
    page_major(page, slot)
    expected = major[rows_b, page[..., 0].cpu(), rows_h]
    got = target.view(batch, heads, slots // PAGE, PAGE, 128)[rows_b, rows_h, slot[..., 0].cpu()]
    ok = torch.equal(got.cpu(), expected)
    us = time_us([lambda p=p, t=t: page_major(p, t) for p, t in sets], device)
    rows.append({**base, "variant": "page-major layout", "us": us, "GBps": moved / us / 1e3, "ok": ok})
    return rows


def backup_rows(heads: int, tokens: int, device: torch.device) -> list[dict]:
    """Seconds to back one layer's prompt up to host memory, several ways (see the module doc)."""
    gen = torch.Generator().manual_seed(5)
    pair = [torch.randn(1, heads, tokens, 128, generator=gen).to(device, torch.bfloat16) for _ in range(2)]
    moved = 2 * pair[0].numel() * 2
    touched = [torch.empty_like(t, device="cpu") for t in pair]
    for t in touched:
        t.zero_()

    def per_head(hosts: list[torch.Tensor] | None) -> list[torch.Tensor]:
        hosts = hosts or [torch.empty_like(t, device="cpu") for t in pair]
        for host, source in zip(hosts, pair, strict=True):
            for head in range(heads):
                host[0, head].copy_(source[0, head])
        return hosts

    def one_copy(hosts: list[torch.Tensor] | None) -> list[torch.Tensor]:
        hosts = hosts or [torch.empty_like(t, device="cpu") for t in pair]
        for host, source in zip(hosts, pair, strict=True):
            host.copy_(source)
        return hosts

    variants = {
        "per head, new pageable (prefill now)": lambda: per_head(None),
        "one copy, new pageable": lambda: one_copy(None),
        "per head, touched pageable": lambda: per_head(touched),
        "one copy, touched pageable": lambda: one_copy(touched),
    }
    if device.type == "cuda":
        variants["one copy, new pinned_copy (registered)"] = lambda: [host_pages.pinned_copy(t) for t in pair]
        variants["pinned_copy of a pageable backup (stack)"] = lambda: [host_pages.pinned_copy(t) for t in filled]
    filled = [t.cpu() for t in pair]  # a backup already in host memory, as `stack` finds it
    rows = []
    for variant, run in variants.items():
        seconds = []
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            hosts = run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        ok = all(torch.equal(h.cpu(), t.cpu()) for h, t in zip(hosts, pair, strict=True))
        us = sorted(seconds)[1] * 1e6
        rows.append(
            {"part": "backup", "batch": 1, "kv_heads": heads, "tokens": tokens, "variant": variant, "us": us,
             "GBps": moved / us / 1e3, "bytes": moved, "ok": ok, "timing": "wall, synchronized, median of 3"}
        )  # fmt: skip
        del hosts
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    parts = ["scores", "select", "recall", "recall_cold", "backup"]
    parser.add_argument("--parts", nargs="+", default=parts, help="which rows")
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", default="benchmarks/results/arkvale_parts.jsonl")
    args = parser.parse_args()
    device = torch.device(args.device)
    bandwidth = read_bandwidth(device)
    env = environment(device, bandwidth, args.commit)
    shapes = {  # part: (rows, tiny rows)
        "scores": (
            lambda: [*(score_rows(*bhn, device, bandwidth) for bhn in ((4, 32, 1026), (1, 8, 1026), (4, 8, 1026)))],
            lambda: [score_rows(2, 2, 40, device, bandwidth)],
        ),
        "select": (
            lambda: [select_rows(4, 32, 30720 + 48, 64, 30, device), select_rows(1, 8, 32768 + 48, 64, 30, device)],
            lambda: [select_rows(2, 4, 300, 16, 6, device)],
        ),
        "recall": (lambda: [recall_rows(4, 32, 991, 2048, device)], lambda: [recall_rows(2, 2, 12, 128, device)]),
        # 8.3 GB of host keys
        "recall_cold": (
            lambda: [cold_recall_rows(4, 32, 8 * 991, 2048, device)],
            lambda: [cold_recall_rows(2, 2, 12, 128, device)],
        ),
        "backup": (lambda: [backup_rows(32, 30720, device)], lambda: [backup_rows(2, 64, device)]),
    }
    rows = [row for part in args.parts for group in shapes[part][args.small]() for row in group]
    print(f"{'part':7} {'batch':>5} {'heads':>5} {'fetch':>5} {'variant':32} {'us':>8} {'GB/s':>7} {'floor':>7}  ok")
    for row in rows:
        print(
            f"{row['part']:7} {row['batch']:5d} {row['kv_heads']:5d} {row.get('fetching', ''):>5} "
            f"{row['variant']:32} {row['us']:8.1f} {row.get('GBps', 0):7.1f} {row.get('floor_us', 0):7.1f}  {row['ok']}"
        )
    with open(args.out, "a") as out:
        for row in rows:
            out.write(json.dumps({**env, **row}) + "\n")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The host-memory copy kernels (`kvbench/host_pages.py`) against torch copies, under Triton's interpreter.

On a GPU the kernels read and write pinned host memory at its host address (checked by
`benchmarks/check_gpu.py`); here the interpreter runs the same kernels on CPU tensors. The interpreter is
chosen when Triton is imported, so the checks run in a subprocess: this file as a script, with
`TRITON_INTERPRET=1`, prints what the tests assert on.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from kvbench import host_pages
from tests.conftest import run_under_triton_interpreter

REPO = Path(__file__).resolve().parents[1]


def _interpreted_checks() -> dict:
    from kvbench import host_pages

    assert host_pages.INTERPRETED and host_pages.uses_kernels(torch.empty(1), torch.empty(1))
    generator = torch.Generator().manual_seed(0)
    b, h, n, s, d = 2, 4, 50, 20, 20  # d not a power of two: the column mask matters
    host = torch.randn(b, h, n, d, generator=generator)
    expected = host.clone()
    rows = torch.tensor([7, 41])
    source = torch.randn(b, h, 1, d, generator=generator)
    host_pages.write_rows((host,), rows, (source,))
    expected[torch.arange(b), :, rows] = source[:, :, 0]
    # A pair (a layer's keys and values) in one launch: sources laid out as a Llama layer's, the key RoPE's
    # contiguous output, the value a head-transposed slice of the fused projection (strides of its own). Hosts
    # of one shape but unlike strides take one launch each.
    pair_hosts = (torch.randn(b, h, n, d, generator=generator), torch.randn(b, h, n, d, generator=generator))
    fused = torch.randn(b, 1, h, 3 * d, generator=generator)
    pair_sources = (torch.randn(b, h, 1, d, generator=generator), fused[..., d : 2 * d].transpose(1, 2))
    assert pair_sources[0].stride() != pair_sources[1].stride()
    unlike_hosts = (
        torch.randn(b, h, n, d, generator=generator),
        torch.randn(b, n, h, d, generator=generator).transpose(1, 2),
    )
    pair_expected = [t.clone() for t in (*pair_hosts, *unlike_hosts)]
    launches = []
    launch = host_pages._launch_write
    host_pages._launch_write = lambda *args: (launches.append("pair" if args[1] is not None else "one"), launch(*args))
    host_pages.write_rows(pair_hosts, rows, pair_sources)
    host_pages.write_rows(unlike_hosts, rows, pair_sources)
    host_pages._launch_write = launch
    for written, source_of in zip(pair_expected, (*pair_sources, *pair_sources), strict=True):
        written[torch.arange(b), :, rows] = source_of[:, :, 0]
    pair_written = all(torch.equal(t, e) for t, e in zip((*pair_hosts, *unlike_hosts), pair_expected, strict=True))

    # Pages of 5 rows: 10 in the backup, 4 slots on the device; 4 KV heads in 2 groups, 3 pairs a group.
    p, groups, recalled = 5, 2, 3
    page_host = torch.randn(b, h + 1, n, d, generator=generator)[:, :h]  # a layout of its own, as a view
    second_host = torch.randn(b, h + 1, n, d, generator=generator)[:, :h]
    pages, slots, fetch = _page_pairs(b, groups, recalled, n // p, s // p, generator)

    gathered = {}
    wide = torch.rand(b, groups, 2 * recalled, generator=generator) < 0.5
    for name, hosts, taken in (
        ("one", (page_host,), fetch),
        ("pair", (page_host, second_host), fetch),  # keys and values: one launch for both
        ("strided_fetch", (page_host,), wide[..., ::2]),  # a `fetch` that is a view with strides of its own
        ("int8_fetch", (page_host, second_host), fetch.to(torch.int8)),  # as `select_pages` returns it
    ):
        targets = tuple(torch.full((b, h, s, d), float("nan")) for _ in hosts)
        positions = torch.full((b, h, s), -7)
        host_pages.gather_pages(hosts, targets, positions, pages, slots, taken, p)
        want = [gather_pages_by_loops(one, pages, slots, taken, p, s) for one in hosts]
        gathered[name] = {
            "untouched": all(torch.equal(t.isnan(), w[0].isnan()) for t, w in zip(targets, want, strict=True)),
            "equal": all(torch.equal(t.nan_to_num(), w[0].nan_to_num()) for t, w in zip(targets, want, strict=True)),
            "positions": torch.equal(positions, want[0][1]),
            "taken": int(taken.sum()),
        }

    # Compiled as a decode step is: the copies stay in place on the caller's buffers.
    @torch.compile(fullgraph=True, dynamic=False)
    def step(host, second_host, rows, source, target, second_target, positions, pages, slots, fetch):
        host_pages.write_rows((host, second_host), rows, (source, source), through_kernels=True)
        pairs = (host, second_host), (target, second_target)
        host_pages.gather_pages(*pairs, positions, pages, slots, fetch, p, through_kernels=True)

    compiled_host, compiled_second = page_host.clone(), second_host.clone()
    compiled_targets = [torch.full((b, h, s, d), float("nan")) for _ in range(2)]
    compiled_positions = torch.full((b, h, s), -7)
    step(compiled_host, compiled_second, rows + 1, source, *compiled_targets, compiled_positions, pages, slots, fetch)
    compiled_expected, compiled_second_expected = page_host.clone(), second_host.clone()
    compiled_expected[torch.arange(b), :, rows + 1] = source[:, :, 0]
    compiled_second_expected[torch.arange(b), :, rows + 1] = source[:, :, 0]
    compiled_references = [
        gather_pages_by_loops(one, pages, slots, fetch, p, s) for one in (compiled_expected, compiled_second_expected)
    ]
    return {
        "past_int32": _offsets_past_int32(),
        "compiled_equal": torch.equal(compiled_host, compiled_expected)
        and torch.equal(compiled_second, compiled_second_expected)
        and all(
            torch.equal(t.nan_to_num(), r[0].nan_to_num())
            for t, r in zip(compiled_targets, compiled_references, strict=True)
        )
        and torch.equal(compiled_positions, compiled_references[0][1]),
        "write_rows_equal": torch.equal(host, expected),
        "write_row_pairs_equal": pair_written,
        "write_launches": launches,
        "write_row_pairs_schema": str(torch.ops.kvbench.write_row_pairs.default._schema),
        "gathered": gathered,
        "gather_page_pairs_schema": str(torch.ops.kvbench.gather_page_pairs.default._schema),
    }


def _page_pairs(b: int, groups: int, recalled: int, n_pages: int, n_slots: int, generator: torch.Generator):
    """Distinct pages and distinct slots in each (sequence, group) row, about half of them fetched."""
    pages = torch.stack([torch.randperm(n_pages, generator=generator)[:recalled] for _ in range(b * groups)])
    slots = torch.stack([torch.randperm(n_slots, generator=generator)[:recalled] for _ in range(b * groups)])
    fetch = torch.rand(b, groups, recalled, generator=generator) < 0.5
    return pages.view(b, groups, recalled), slots.view(b, groups, recalled), fetch


def gather_pages_by_loops(host, pages, slots, fetch, p: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What `gather_pages` must leave in a NaN target [B, H, s, D] and a positions buffer of -7s."""
    b, h, _, d = host.shape
    per_group = h // pages.shape[1]
    target, positions = torch.full((b, h, s, d), float("nan")), torch.full((b, h, s), -7)
    for i in range(b):
        for head in range(h):
            for r in range(pages.shape[2]):
                g = head // per_group
                if fetch[i, g, r]:
                    page, slot = int(pages[i, g, r]), int(slots[i, g, r])
                    target[i, head, slot * p : slot * p + p] = host[i, head, page * p : page * p + p]
                    positions[i, head, slot * p : slot * p + p] = torch.arange(page * p, page * p + p)
    return target, positions


def _offsets_past_int32() -> dict:
    """A backup whose third sequence starts past 2^31 elements (a sequence stride that fits int32, 16
    sequences of 30k tokens of a 7B MHA layer do this): int32 offsets wrap and read or write outside it (under
    the interpreter, a segfault). Bytes, uninitialised but where read back, so only ~2 GB of address space."""
    from kvbench import host_pages

    stride, n, d = 2**30 + 4096, 64, 16
    flat = torch.empty(2 * stride + n * d, dtype=torch.uint8)
    host = flat.as_strided((3, 1, n, d), (stride, n * d, d, 1))
    host[2].copy_(torch.arange(n * d).remainder(251).to(torch.uint8).view(1, n, d))
    target, positions = torch.zeros(3, 1, 8, d, dtype=torch.uint8), torch.zeros(3, 1, 8, dtype=torch.int64)
    pages, slots, fetch = (
        torch.ones(3, 1, 1, dtype=torch.int64),
        torch.zeros(3, 1, 1, dtype=torch.int64),
        torch.ones(3, 1, 1, dtype=torch.bool),
    )
    host_pages.gather_pages((host,), (target,), positions, pages, slots, fetch, 8)  # page 1: rows 8 to 15
    host_pages.write_rows((host,), torch.tensor([1, 2, 3]), (torch.full((3, 1, 1, d), 255, dtype=torch.uint8),))
    return {"gather": torch.equal(target[2, 0], host[2, 0, 8:16]), "write": bool((host[2, 0, 3] == 255).all())}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


def test_write_rows_writes_each_sequences_row(interpreted: dict) -> None:
    assert interpreted["write_rows_equal"]


def test_write_rows_writes_a_pair_in_one_launch_and_unlike_pairs_apart(interpreted: dict) -> None:
    assert interpreted["write_row_pairs_equal"]
    assert interpreted["write_launches"] == ["pair", "one", "one"]
    # Both hosts mutated, as torch.compile must know to keep the writes.
    assert "Tensor(a0!) host" in interpreted["write_row_pairs_schema"]
    assert "Tensor(a1!) second_host" in interpreted["write_row_pairs_schema"]


def test_write_rows_without_kernels_writes_every_pair() -> None:
    """The PyTorch path (CPU runs without Triton's interpreter): each (host, source) pair written."""
    hosts = (torch.zeros(2, 3, 10, 4), torch.zeros(2, 3, 10, 4))
    sources = (torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    rows = torch.tensor([2, 7])
    host_pages.write_rows(hosts, rows, sources, through_kernels=False)
    for host, source in zip(hosts, sources, strict=True):
        assert torch.equal(host[torch.arange(2), :, rows], source[:, :, 0])
        assert int((host != 0).sum()) == 2 * 3 * 4


def test_compiled_copies_write_the_callers_buffers(interpreted: dict) -> None:
    """Inside `torch.compile(fullgraph=True)` (as in the compiled decode step) the copies trace, compile and
    land in the buffers passed in."""
    assert interpreted["compiled_equal"]


def test_copies_address_past_int32_elements(interpreted: dict) -> None:
    assert interpreted["past_int32"] == {"gather": True, "write": True}


@pytest.mark.parametrize("pairs", ["one", "pair", "strided_fetch", "int8_fetch"])
def test_gather_pages_copies_fetched_pages_and_nothing_else(interpreted: dict, pairs: str) -> None:
    """One (host, target) pair, keys and values as two pairs in one launch, a `fetch` that is a view, and
    one of int8 0/1: each fetched page's rows for every head of its group, with their positions."""
    check = interpreted["gathered"][pairs]
    assert 0 < check["taken"] < 2 * 2 * 3, check  # some pages fetched, some not
    assert check["untouched"] and check["equal"] and check["positions"], check


def test_gather_page_pairs_mutates_both_targets_and_the_positions(interpreted: dict) -> None:
    schema = interpreted["gather_page_pairs_schema"]
    assert "Tensor(a1!) target" in schema and "Tensor(a3!) second_target" in schema
    assert "Tensor(a4!) positions" in schema


@pytest.mark.parametrize("flags", [torch.bool, torch.int8])
def test_gather_pages_without_kernels_copies_every_pair(flags: torch.dtype) -> None:
    """The PyTorch path (CPU runs without Triton's interpreter) against the same loops; `fetch` as bool and
    as int8 0/1 (what `select_pages` returns)."""
    generator = torch.Generator().manual_seed(1)
    hosts = tuple(torch.randn(2, 4, 50, 6, generator=generator) for _ in range(2))
    pages, slots, fetch = _page_pairs(2, 2, 3, 10, 4, generator)
    targets, positions = tuple(torch.full((2, 4, 20, 6), float("nan")) for _ in hosts), torch.full((2, 4, 20), -7)
    host_pages.gather_pages(hosts, targets, positions, pages, slots, fetch.to(flags), 5, through_kernels=False)
    for host, target in zip(hosts, targets, strict=True):
        want, want_positions = gather_pages_by_loops(host, pages, slots, fetch, 5, 20)
        assert torch.equal(target.nan_to_num(), want.nan_to_num()) and torch.equal(target.isnan(), want.isnan())
        assert torch.equal(positions, want_positions)
    assert 0 < int(fetch.sum()) < 12


def test_pinned_copy_registers_exact_bytes_until_the_last_view_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backup is registered at its own size, and unregistered only once no tensor uses it (a view
    outliving the first tensor keeps it registered: kernels may still read it), while its pages are still
    mapped (unregistering after the unmap could meet a new mapping at the same address)."""
    calls: list[tuple] = []

    class FakeCudart:
        def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:
            calls.append(("register", address, nbytes))
            return 0

        def cudaHostUnregister(self, address: int) -> int:
            calls.append(("unregister", address, _is_mapped(address)))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    source = torch.randn(3, 4, 5, 8).to(torch.bfloat16)
    pinned = host_pages.pinned_copy(source)
    assert torch.equal(pinned, source) and pinned.shape == source.shape
    assert [c[0] for c in calls] == ["register"] and calls[0][2] == source.numel() * 2
    assert pinned.data_ptr() == calls[0][1]
    view = pinned[1:]
    del pinned
    gc.collect()
    assert [c[0] for c in calls] == ["register"]
    del view
    gc.collect()
    assert calls[1:] == [("unregister", calls[0][1], True)]
    assert not _is_mapped(calls[0][1])
    assert host_pages.pinned_copy(torch.empty(0, 4)).shape == (0, 4)  # nothing to register


def test_pinned_concat_copies_each_part_into_one_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's backup: one registered block of the batch's size holding the sequences' backups in order;
    ArkVale stacks its host backups through it when its cache is on a GPU, and with `torch.cat` otherwise."""
    from types import SimpleNamespace

    from methods.arkvale import ArkValeLayer

    registered: list[int] = []

    class FakeCudart:
        def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:
            registered.append(nbytes)
            return 0

        def cudaHostUnregister(self, address: int) -> int:
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    parts = [torch.randn(n, 3, 5, 4) for n in (1, 2, 1)]
    batch = host_pages.pinned_concat(parts)
    assert torch.equal(batch, torch.cat(parts)) and registered == [batch.numel() * 4]
    layers = [SimpleNamespace(keys=SimpleNamespace(is_cuda=True), host_keys=p, slot_page=p) for p in parts]
    assert torch.equal(ArkValeLayer.stack_tensor("host_keys", layers), batch) and len(registered) == 2
    assert torch.equal(ArkValeLayer.stack_tensor("slot_page", layers), batch) and len(registered) == 2
    on_cpu = [SimpleNamespace(keys=SimpleNamespace(is_cuda=False), host_keys=p) for p in parts]
    assert torch.equal(ArkValeLayer.stack_tensor("host_keys", on_cpu), batch) and len(registered) == 2


def _is_mapped(address: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        low, high = (int(end, 16) for end in line.split()[0].split("-"))
        if low <= address < high:
            return True
    return False


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))

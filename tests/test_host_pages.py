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
    b, h, n, s, d, m = 2, 3, 50, 24, 20, 9  # d not a power of two: the column mask matters
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

    source_rows = torch.randint(0, n, (b, h, m), generator=generator)
    target_rows = torch.stack([torch.randperm(s, generator=generator)[:m] for _ in range(b * h)]).view(b, h, m)
    take = torch.rand(b, h, m, generator=generator) < 0.5
    second_host = torch.randn(b, h, n, d, generator=generator)

    def reference_gather(one_host: torch.Tensor) -> torch.Tensor:
        reference = torch.full((b, h, s, d), float("nan"))
        for i in range(b):
            for j in range(h):
                for k in range(m):
                    if take[i, j, k]:
                        reference[i, j, target_rows[i, j, k]] = one_host[i, j, source_rows[i, j, k]]
        return reference

    gathered = {}
    # Index tensors that are views with strides of their own (every other flag of a wider mask).
    wide = torch.rand(b, h, 2 * m, generator=generator) < 0.5
    strided_take = wide[..., ::2]
    targets = (torch.full((b, h, s, d), float("nan")),)
    host_pages.gather_rows((host,), targets, source_rows, target_rows, strided_take)
    take, saved = strided_take.contiguous(), take
    strided_reference = reference_gather(host)
    take = saved
    gathered["strided_take"] = {
        "untouched": torch.equal(targets[0].isnan(), strided_reference.isnan()),
        "equal": torch.equal(targets[0].nan_to_num(), strided_reference.nan_to_num()),
    }
    for name, hosts in (("one", (host,)), ("pair", (host, second_host))):  # the pair: one launch for both
        targets = tuple(torch.full((b, h, s, d), float("nan")) for _ in hosts)
        host_pages.gather_rows(hosts, targets, source_rows, target_rows, take)
        references = [reference_gather(one_host) for one_host in hosts]
        gathered[name] = {
            "untouched": all(torch.equal(t.isnan(), r.isnan()) for t, r in zip(targets, references, strict=True)),
            "equal": all(torch.equal(t.nan_to_num(), r.nan_to_num()) for t, r in zip(targets, references, strict=True)),
        }

    # Compiled as a decode step is: the copies stay in place on the caller's buffers.
    @torch.compile(fullgraph=True, dynamic=False)
    def step(host, second_host, rows, source, target, second_target, source_rows, target_rows, take):
        host_pages.write_rows((host, second_host), rows, (source, source), through_kernels=True)
        pairs = (host, second_host), (target, second_target)
        host_pages.gather_rows(*pairs, source_rows, target_rows, take, through_kernels=True)

    compiled_host, compiled_targets = expected.clone(), [torch.full((b, h, s, d), float("nan")) for _ in range(2)]
    compiled_second = second_host.clone()
    step(compiled_host, compiled_second, rows + 1, source, *compiled_targets, source_rows, target_rows, take)
    compiled_expected, compiled_second_expected = expected.clone(), second_host.clone()
    compiled_expected[torch.arange(b), :, rows + 1] = source[:, :, 0]
    compiled_second_expected[torch.arange(b), :, rows + 1] = source[:, :, 0]
    compiled_references = [reference_gather(compiled_expected), reference_gather(compiled_second_expected)]
    return {
        "past_int32": _offsets_past_int32(),
        "compiled_equal": torch.equal(compiled_host, compiled_expected)
        and torch.equal(compiled_second, compiled_second_expected)
        and all(
            torch.equal(t.nan_to_num(), r.nan_to_num())
            for t, r in zip(compiled_targets, compiled_references, strict=True)
        ),
        "write_rows_equal": torch.equal(host, expected),
        "write_row_pairs_equal": pair_written,
        "write_launches": launches,
        "write_row_pairs_schema": str(torch.ops.kvbench.write_row_pairs.default._schema),
        "gathered": gathered,
        "taken": int(take.sum()),
    }


def _offsets_past_int32() -> dict:
    """A backup whose third sequence starts past 2^31 elements (a sequence stride that fits int32, 16
    sequences of 30k tokens of a 7B MHA layer do this): int32 offsets wrap and read or write outside it (under
    the interpreter, a segfault). Bytes, uninitialised but where read back, so only ~2 GB of address space."""
    from kvbench import host_pages

    stride, n, d = 2**30 + 4096, 64, 16
    flat = torch.empty(2 * stride + n * d, dtype=torch.uint8)
    host = flat.as_strided((3, 1, n, d), (stride, n * d, d, 1))
    host[2].copy_(torch.arange(n * d).remainder(251).to(torch.uint8).view(1, n, d))
    target = torch.zeros(3, 1, 8, d, dtype=torch.uint8)
    rows = torch.arange(8).expand(3, 1, 8).contiguous()
    host_pages.gather_rows((host,), (target,), rows + 5, rows, torch.ones(3, 1, 8, dtype=torch.bool))
    host_pages.write_rows((host,), torch.tensor([1, 2, 3]), (torch.full((3, 1, 1, d), 255, dtype=torch.uint8),))
    return {"gather": torch.equal(target[2, 0], host[2, 0, 5:13]), "write": bool((host[2, 0, 3] == 255).all())}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__), timeout_s=300)


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


@pytest.mark.parametrize("pairs", ["one", "pair", "strided_take"])
def test_gather_rows_copies_taken_rows_and_nothing_else(interpreted: dict, pairs: str) -> None:
    """One (host, target) pair, keys and values as two pairs in one launch, and a `take` that is a view."""
    assert 0 < interpreted["taken"] < 2 * 3 * 9  # some rows taken, some not
    assert interpreted["gathered"][pairs]["untouched"]
    assert interpreted["gathered"][pairs]["equal"]


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

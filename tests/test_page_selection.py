"""`kvbench.page_selection.select_pages`: its Triton kernel against the PyTorch reference (ArkVale's former
per-step selection), under Triton's interpreter (in a subprocess: this file as a script with
`TRITON_INTERPRET=1`), and compiled for sm_90."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvbench import kernels, page_selection
from tests.conftest import compile_for_hopper, run_under_triton_interpreter


def _case(b: int, g: int, n: int, s: int, newest: list[int], gen: torch.Generator) -> tuple:
    """Distinct scores; each row's slots hold distinct pages (sinks 0, a window, some of the best pages,
    some random ones), a few slots empty (-1)."""
    scores = torch.randn(b, g, n, generator=gen)
    slot_page = torch.full((b, g, s), -1, dtype=torch.int64)
    for i in range(b):
        for j in range(g):
            window = list(range(newest[i], min(newest[i] + 2, n)))
            best = scores[i, j, 1 : newest[i]].topk(min(4, newest[i] - 1)).indices + 1
            others = torch.randperm(n, generator=gen)
            held = list(dict.fromkeys([0, *window, *best[::2].tolist(), *others.tolist()]))[: s - 2]
            slot_page[i, j, : len(held)] = torch.tensor(held)
    return scores, slot_page, torch.tensor(newest), torch.tensor([True] * (b - 1) + [False])


def _compare(got: tuple, want: tuple, whole: bool) -> dict:
    pages, slots, fetch = got
    ref_pages, ref_slots, ref_fetch = want
    n = fetch.sum(-1, keepdim=True)
    first = torch.arange(fetch.shape[-1]) < n  # the fetched pairs; past them ties may order freely
    return {
        "fetch": torch.equal(fetch, ref_fetch),
        "fetched_pairs": torch.equal(pages[first], ref_pages[first]) and torch.equal(slots[first], ref_slots[first]),
        "whole": (torch.equal(pages, ref_pages) and torch.equal(slots, ref_slots)) if whole else None,
        "fetched": int(fetch.sum()),
    }


def _arkvale_trace() -> dict:
    """ArkVale decoding random keys with a small budget: the page in each slot after every step, the pages
    recalled and the attention outputs. Under the interpreter the layer runs every kernel of its CUDA step
    (estimate, selection, host copies, top-k, attention); in the test process, the PyTorch paths."""
    from kvbench.cache import LayerSpec, ModelSpec
    from kvbench.methods.arkvale import ArkVale

    gen = torch.Generator().manual_seed(5)
    model = ModelSpec("test", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_positions=4096)
    prompt_len, steps = 200, 40
    layer = ArkVale(budget=64, page_size=8, page_topk=4).make_layer(LayerSpec(3, model, 1, prompt_len, steps))
    q = torch.randn(1, 4, prompt_len + steps, 16, generator=gen)
    k, v = (torch.randn(1, 2, prompt_len + steps, 16, generator=gen) for _ in range(2))
    for start in range(0, prompt_len, 50):
        keys, values = layer.update(k[:, :, start : start + 50], v[:, :, start : start + 50])
        layer.attend(q[:, :, start : start + 50], keys, values, 0.25)
    layer.finish_prefill()
    trace, outputs = [], []
    for i in range(prompt_len, prompt_len + steps):
        keys, values = layer.update(k[:, :, i : i + 1], v[:, :, i : i + 1])
        outputs.append(layer.attend(q[:, :, i : i + 1], keys, values, 0.25).flatten().tolist())
        trace.append(layer.slot_page.flatten().tolist())
    return {"slot_pages": trace, "recalled": layer.stats()["pages_recalled"], "outputs": outputs}


def _interpreted_checks() -> dict:
    assert kernels._INTERPRETED, "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    checks = {}
    for name, (b, g, n, s, newest, k, whole) in {
        "small": (3, 2, 75, 16, [60, 70, 40], 6, True),
        "arkvale_32k": (4, 1, 1026, 64, [1020, 1000, 900, 1024], 30, True),
        "few_candidates": (2, 1, 40, 16, [5, 30], 8, False),  # row 0: 4 candidates for 8 places
    }.items():
        inputs = (*_case(b, g, n, s, newest, gen), k)
        scores, slot_page, newest_t, active, k = inputs
        got = page_selection.select_pages(scores, slot_page, 1, newest_t, active, k)
        want = page_selection.select_pages_reference(scores, slot_page, 1, newest_t, active, k)
        checks[name] = _compare(got, want, whole)
    # Signed zeros: torch.neg keeps -0.0 below +0.0, so the page scored -0.0 is the first victim.
    zeros = (torch.tensor([[[9.0, 0.0, -0.0, 1.0]]]), torch.tensor([[[2, 1, 3]]]), 0, torch.tensor([4]))
    got = page_selection.select_pages(*zeros, torch.tensor([True]), 1)
    want = page_selection.select_pages_reference(*zeros, torch.tensor([True]), 1)
    checks["signed_zeros"] = _compare(got, want, True)
    checks["arkvale"] = _arkvale_trace()
    return checks


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__), timeout_s=300)


@pytest.mark.parametrize("case", ["small", "arkvale_32k", "few_candidates", "signed_zeros"])
def test_kernel_matches_the_reference(interpreted: dict, case: str) -> None:
    check = interpreted[case]
    assert check["fetch"] and check["fetched_pairs"], check
    assert check["whole"] in (True, None), check
    assert check["fetched"] > 0, check  # the cases recall something


def test_arkvale_through_its_kernels_keeps_the_pages_of_the_pytorch_path(interpreted: dict) -> None:
    """The whole decode step of an ArkVale layer with its kernels (interpreted) against the PyTorch path."""
    kernel_run, torch_run = interpreted["arkvale"], _arkvale_trace()
    assert torch_run["recalled"] > 0
    assert kernel_run["slot_pages"] == torch_run["slot_pages"]
    assert kernel_run["recalled"] == torch_run["recalled"]
    assert torch.allclose(torch.tensor(kernel_run["outputs"]), torch.tensor(torch_run["outputs"]), atol=1e-4)


def test_reference_selects_missing_best_pages_over_the_lowest_resident() -> None:
    """A hand-made row: pages 0..9, sink 0, window from page 8; slots hold 0, 8, 9, 2, 5, 7; k = 3."""
    scores = torch.tensor([[[0.0, 9.0, 1.0, 8.0, 0.5, 7.0, 6.0, 0.2, 0.0, 0.0]]])
    slot_page = torch.tensor([[[0, 8, 9, 2, 5, 7]]])
    pages, slots, fetch = page_selection.select_pages(slot_page=slot_page, scores=scores, n_sink=1,
        newest_candidate=torch.tensor([8]), active=torch.tensor([True]), k=3)  # fmt: skip
    # Best three candidates: 1, 3, 5; 5 is resident. Victims, lowest first: page 7 (slot 5), page 2 (slot 3).
    assert fetch.tolist() == [[[True, True, False]]]
    assert pages[0, 0, :2].tolist() == [1, 3] and pages[0, 0, 2] == 5
    assert slots[0, 0, :2].tolist() == [5, 3]
    inactive = page_selection.select_pages(scores, slot_page, 1, torch.tensor([8]), torch.tensor([False]), 3)
    assert not inactive[2].any()


def test_bad_k_is_refused() -> None:
    with pytest.raises(ValueError, match="k=7"):
        page_selection.select_pages(torch.zeros(1, 1, 10), torch.zeros(1, 1, 6, dtype=torch.int64), 1,
            torch.tensor([5]), torch.tensor([True]), 7)  # fmt: skip


def test_kernel_compiles_for_hopper() -> None:
    pointers = {"scores_ptr": "*fp32", "slot_page_ptr": "*i64", "newest_ptr": "*i64", "active_ptr": "*i8"}
    pointers |= {"pages_out": "*i64", "slots_out": "*i64", "fetch_out": "*i8"}
    constexprs = {"BITS": 11, "N_PAD": 2048, "S_PAD": 64, "K_PAD": 32}
    compile_for_hopper(page_selection._select_pages_kernel, pointers, constexprs)


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))

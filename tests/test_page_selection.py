"""`kvbench.page_selection.select_pages`: its Triton kernel against the PyTorch reference (ArkVale's former
per-step selection), under Triton's interpreter (in a subprocess: this file as a script with
`TRITON_INTERPRET=1`), and compiled for sm_90."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvbench import kernels, page_selection
from kvbench.page_selection import PageSchedule
from tests.conftest import compile_for_hopper, run_under_triton_interpreter


def _case(b: int, g: int, heads: int, n: int, s: int, newest: list[int], schedule, gen: torch.Generator) -> tuple:
    """Distinct scores per KV head ([B, g * heads, N]); each row's slots hold distinct pages (sinks 0, a
    window, some of the best pages by group mean, some random ones), a few slots empty (-1); counters at
    random step counts; each row's tokens such that its window starts at `newest`."""
    head_scores = torch.randn(b, g * heads, n, generator=gen)
    scores = head_scores.view(b, g, heads, n).mean(dim=2)
    slot_page = torch.full((b, g, s), -1, dtype=torch.int64)
    for i in range(b):
        for j in range(g):
            window = list(range(newest[i], min(newest[i] + 2, n)))
            best = scores[i, j, 1 : newest[i]].topk(min(4, newest[i] - 1)).indices + 1
            others = torch.randperm(n, generator=gen)
            held = list(dict.fromkeys([0, *window, *best[::2].tolist(), *others.tolist()]))[: s - 2]
            slot_page[i, j, : len(held)] = torch.tensor(held)
    counters = torch.stack([torch.randint(0, 50, (b, g), generator=gen).float(), torch.zeros(b, g)], dim=-1)
    # (tokens - 1) // p - n_window + 1 = newest, one token into the page after the window's first.
    tokens = torch.tensor([(x + schedule.n_window - 1) * schedule.page_size + 1 for x in newest])
    return head_scores, slot_page, counters, tokens


def _compare(got: tuple, want: tuple, whole: bool) -> dict:
    (pages, slots, fetch), (slot_page, counters) = got
    (ref_pages, ref_slots, ref_fetch), (ref_slot_page, ref_counters) = want
    n = fetch.sum(-1, keepdim=True)
    first = torch.arange(fetch.shape[-1]) < n  # the fetched pairs; past them ties may order freely
    return {
        "fetch": fetch.dtype == torch.int8 and torch.equal(fetch.bool(), ref_fetch),
        "fetched_pairs": torch.equal(pages[first], ref_pages[first]) and torch.equal(slots[first], ref_slots[first]),
        "whole": (torch.equal(pages, ref_pages) and torch.equal(slots, ref_slots)) if whole else None,
        "slot_page": torch.equal(slot_page, ref_slot_page),
        "counters": torch.equal(counters, ref_counters),
        "fetched": int(fetch.sum()),
        "width": fetch.shape[-1],
    }


TRACES = ((1, None), (2, 0.5))  # (n_groups, recall_cap) of the ArkVale traces


def _arkvale_trace(n_groups: int, recall_cap: float | None) -> dict:
    """ArkVale decoding random keys with a small budget: the page in each slot after every step, the pages
    recalled and the attention outputs. Under the interpreter the layer runs every kernel of its CUDA step
    (estimate, selection, host copies, top-k, attention); in the test process, the PyTorch paths."""
    from kvbench.cache import LayerSpec, ModelSpec
    from kvbench.methods.arkvale import ArkVale

    gen = torch.Generator().manual_seed(5)
    model = ModelSpec("test", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_positions=4096)
    prompt_len, steps = 200, 40
    method = ArkVale(budget=64, page_size=8, page_topk=4, n_groups=n_groups, recall_cap=recall_cap)
    layer = method.make_layer(LayerSpec(3, model, 1, prompt_len, steps))
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
    return {"slot_pages": trace, "stats": layer.stats(), "outputs": outputs}


def _interpreted_checks() -> dict:
    assert kernels._INTERPRETED, "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    checks = {}
    for name, (b, g, heads, n, s, newest, schedule, k, cap, whole) in {
        # The last row holds no more tokens than its slots (inactive): it fetches nothing and counts no step.
        "small": (3, 2, 2, 75, 16, [60, 70, 40], PageSchedule(1, 1, 1, 41), 6, None, True),
        "arkvale_32k": (4, 1, 8, 1026, 64, [1020, 1000, 1024, 900], PageSchedule(1, 2, 32, 2048), 30, None, True),
        "few_candidates": (2, 1, 1, 40, 16, [5, 30], PageSchedule(1, 1, 1, 0), 8, None, False),  # row 0: 4 for 8
        # 7 pages between the sink and the window, k = 8: the kernel's top-k returns padding, which names no page.
        "few_positions": (3, 1, 2, 10, 8, [8, 8, 4], PageSchedule(1, 2, 1, 0), 8, None, False),
        # More slots than positions (65 against 64 between sinks and window): slot indices set the packing.
        "more_slots": (3, 1, 2, 67, 65, [65, 50, 30], PageSchedule(1, 2, 1, 0), 20, None, True),
        # Row 0 holds 21 tokens in 20 pages of 1, which no cache writes: both sides bound the window by the last page.
        "past_the_pages": (2, 1, 2, 20, 8, [19, 10], PageSchedule(1, 2, 1, 0), 4, None, True),
        # Tokens (x + 1) * 8 + 1 for window starts x: capacity 2100 leaves the last row (2,089) inactive.
        "capped_rate": (4, 2, 4, 300, 32, [290, 280, 270, 260], PageSchedule(1, 2, 8, 2100), 12, 0.3, True),
        "capped_two": (2, 1, 4, 300, 32, [290, 250], PageSchedule(1, 2, 8, 0), 12, 2.0, True),
        "capped_zero": (2, 1, 4, 300, 32, [290, 250], PageSchedule(1, 2, 8, 0), 12, 0.0, True),
        "capped_over_k": (2, 2, 2, 300, 32, [290, 250], PageSchedule(1, 2, 8, 0), 12, 40.0, True),
    }.items():
        head_scores, slot_page, counters, tokens = _case(b, g, heads, n, s, newest, schedule, gen)
        ref_slot_page, ref_counters = slot_page.clone(), counters.clone()
        got = page_selection.select_pages(head_scores, slot_page, counters, tokens, schedule, k, cap)
        want = page_selection.select_pages_reference(head_scores, ref_slot_page, ref_counters, tokens, schedule, k, cap)
        checks[name] = _compare((got, (slot_page, counters)), (want, (ref_slot_page, ref_counters)), whole)
        checks[name]["pages"] = got[0].tolist()
    for groups, cap in TRACES:
        checks[f"arkvale_{groups}_{cap}"] = _arkvale_trace(groups, cap)
    return checks


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_triton_interpreter(Path(__file__))


CASES = ["small", "arkvale_32k", "few_candidates", "few_positions", "more_slots", "past_the_pages"]
CASES += ["capped_rate", "capped_two", "capped_zero", "capped_over_k"]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_reference(interpreted: dict, case: str) -> None:
    check = interpreted[case]
    assert check["fetch"] and check["fetched_pairs"], check
    assert check["whole"] in (True, None), check
    assert check["slot_page"] and check["counters"], check  # the step's bookkeeping, written in place
    assert (check["fetched"] > 0) == (case != "capped_zero"), check  # the others recall something


def test_rows_with_fewer_positions_than_k_name_no_page_past_them(interpreted: dict) -> None:
    """7 pages between the sink and the window for k = 8: each row's last place names page -1, unfetched."""
    pages = interpreted["few_positions"]["pages"]
    assert all(row[-1] == -1 and -1 not in row[:-1] for sequence in pages for row in sequence), pages


def test_capped_steps_return_only_the_pairs_they_may_fetch(interpreted: dict) -> None:
    widths = {case: interpreted[case]["width"] for case in CASES}
    assert widths["capped_rate"] == 1 and widths["capped_two"] == 2 and widths["capped_zero"] == 0
    assert widths["capped_over_k"] == 12 and widths["small"] == 6


@pytest.mark.parametrize(("groups", "cap"), TRACES)
def test_arkvale_through_its_kernels_keeps_the_pages_of_the_pytorch_path(
    interpreted: dict, groups: int, cap: float | None
) -> None:
    """The whole decode step of an ArkVale layer with its kernels (interpreted) against the PyTorch path."""
    kernel_run, torch_run = interpreted[f"arkvale_{groups}_{cap}"], _arkvale_trace(groups, cap)
    assert torch_run["stats"]["pages_recalled"] > 0
    assert kernel_run["slot_pages"] == torch_run["slot_pages"]
    assert kernel_run["stats"] == torch_run["stats"]
    assert torch.allclose(torch.tensor(kernel_run["outputs"]), torch.tensor(torch_run["outputs"]), atol=1e-4)


def _hand_made(capacity: int, cap: float | None, steps: float = 0.0) -> tuple:
    """A hand-made row: pages 0..9, sink 0, window from page 8 (9 tokens, pages of 1); slots hold 0, 8, 9,
    2, 5, 7; k = 3. Scores are the mean of two heads."""
    mean = torch.tensor([0.0, 9.0, 1.0, 8.0, 0.5, 7.0, 6.0, 0.2, 0.0, 0.0])
    head_scores = torch.stack([mean - 1, mean + 1]).unsqueeze(0)
    slot_page = torch.tensor([[[0, 8, 9, 2, 5, 7]]])
    counters = torch.tensor([[[steps, 4.0]]])
    got = page_selection.select_pages(
        head_scores, slot_page, counters, torch.tensor([9]), PageSchedule(1, 1, 1, capacity), 3, cap
    )
    return (*got, slot_page, counters)


def test_reference_selects_missing_best_pages_over_the_lowest_resident() -> None:
    pages, slots, fetch, slot_page, counters = _hand_made(capacity=6, cap=None)
    # Best three candidates: 1, 3, 5; 5 is resident. Victims, lowest first: page 7 (slot 5), page 2 (slot 3).
    assert fetch.tolist() == [[[True, True, False]]]
    assert pages[0, 0, :2].tolist() == [1, 3] and pages[0, 0, 2] == 5
    assert slots[0, 0, :2].tolist() == [5, 3]
    # In place: pages 1 and 3 now name slots 5 and 3; one more selection step, two more pages recalled.
    assert slot_page.tolist() == [[[0, 8, 9, 3, 5, 1]]]
    assert counters.tolist() == [[[1.0, 6.0]]]


def test_a_row_within_its_slots_selects_nothing() -> None:
    *_, fetch, slot_page, counters = _hand_made(capacity=9, cap=None)
    assert not fetch.any()
    assert slot_page.tolist() == [[[0, 8, 9, 2, 5, 7]]] and counters.tolist() == [[[0.0, 4.0]]]


@pytest.mark.parametrize(("cap", "steps", "fetched"), [(1.0, 0.0, 1), (0.3, 2.0, 0), (0.3, 3.0, 1), (0.0, 0.0, 0)])
def test_recall_cap_fetches_at_most_its_share_of_the_first_pairs(cap: float, steps: float, fetched: int) -> None:
    """floor((n + 1) cap) - floor(n cap) pages on the row's n-th selection step: at 0.3, none on step 2
    (0.9 - 0.6 both floor to 0), one on step 3 (1.2 -> 1, 0.9 -> 0)."""
    pages, slots, fetch, slot_page, counters = _hand_made(capacity=6, cap=cap, steps=steps)
    assert fetch.shape[-1] == (1 if cap else 0)  # ceil(cap) pairs at most
    assert int(fetch.sum()) == fetched
    assert counters.tolist() == [[[steps + 1, 4.0 + fetched]]]
    if fetched:
        assert pages[0, 0, 0] == 1 and slots[0, 0, 0] == 5 and slot_page[0, 0, 5] == 1


def test_bad_inputs_are_refused() -> None:
    scores, slot_page, counters = torch.zeros(1, 2, 10), torch.zeros(1, 1, 6, dtype=torch.int64), torch.zeros(1, 1, 2)
    schedule, tokens = PageSchedule(1, 1, 1, 0), torch.tensor([5])
    with pytest.raises(ValueError, match="k=7"):
        page_selection.select_pages(scores, slot_page, counters, tokens, schedule, 7)
    with pytest.raises(ValueError, match="counters"):
        page_selection.select_pages(scores, slot_page, counters[..., :1], tokens, schedule, 3)
    with pytest.raises(ValueError, match="contiguous"):
        page_selection.select_pages(scores, slot_page.repeat(1, 1, 2)[..., ::2], counters, tokens, schedule, 3)


def test_kernel_compiles_for_hopper() -> None:
    pointers = {"scores_ptr": "*fp32", "slot_page_ptr": "*i64", "counters_ptr": "*fp32", "tokens_ptr": "*i64"}
    pointers |= {"pages_out": "*i64", "slots_out": "*i64", "fetch_out": "*i8", "cap": "fp32"}
    for capped in (True, False):
        constexprs = {"CAPPED": capped, "HEADS": 8, "BITS": 10, "C_PAD": 1024, "S_PAD": 64, "K_PAD": 32}
        compile_for_hopper(page_selection._select_pages_kernel, pointers, constexprs, num_warps=8)  # as launched


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))

"""SnapStream: SnapKV compression of the prompt, then StreamingLLM-style decoding in a fixed ring.

Li et al. (SambaNova Systems, Cartesia AI), "SnapStream: Efficient Long Sequence Decoding on Dataflow
Accelerators", arXiv 2511.03092 (2025). No public code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.cache import KVLayer, LayerSpec, ModelSpec, aligned_slots
from kvbench.errors import require
from kvbench.method import Method, check_budget, check_budget_fits
from kvbench.methods.snapkv import SnapKV, SnapKVLayer


@dataclass
class SnapStream(Method):
    """Hold at most `budget` tokens per layer and KV head for the whole generation: the cache never grows.

    Prefill attends to the whole prompt; at its end SnapKV cuts the prompt to at most `budget - ring`
    tokens (the last `window` prompt queries vote, their attention pooled with `kernel` / `pooling`; the
    top-voted prefix tokens and the window stay). Those prompt tokens stay for the whole generation: they
    play the part of StreamingLLM's attention sinks. Every other slot is a ring of the most recent
    tokens after the prompt: decode token i goes to ring slot i mod (ring size), overwriting the oldest.
    Shapes are fixed from the first decode step on, and each sequence of a batch keeps its own selection,
    so the step batches and compiles (the paper's point: static graphs and continuous batching).

    Sizes. The paper does not publish its budgets, windows or kernel, so every size is a setting:
    `ring = max(1, int(budget * ring_ratio))` slots for generated tokens (default half the budget: a
    long-prompt task keeps half its budget for the prompt, a short-prompt long-generation task such as
    AIME gets nearly all of it as ring, because the prompt keeps only the slots it needs). A prompt whose
    whole generation fits in the budget is kept whole (nothing is ever evicted, as in the full cache); in
    a batch, "the whole generation" is the batch's longest. A prompt longer than `budget - ring` is cut at
    prefill, so the generation can differ from its first token, where methods that evict only once full
    do not: at deployment budgets (thousands of tokens) reasoning prompts fit, but at toy budgets the split
    decides the result (benchmarks/long_generation.md: GSM8K at budget 192, text agreement with the full
    cache 0.53 at `ring_ratio=0.5`, 0.94 at 0.25). `window=16` (SnapKV's official 32, halved so that at
    small budgets the window does not take the whole prompt share), `kernel=7`, `pooling="max"` (SnapKV's
    LongBench configs).

    Deviations and interpretation (the paper's text beyond its abstract was not available):
    - The kept prompt serves as the sinks; there is no separate count of first tokens. SnapKV's votes
      keep heavily attended first tokens when they matter.
    - Kept tokens keep their original (post-RoPE) positions, as SnapKV does; StreamingLLM's position
      shift is not applied (the paper deploys within the models' trained context).
    - Selection is per KV head from window attention averaged over its query heads (kvbench's SnapKV);
      the official SnapKV code repeats KV heads and selects per query head.
    - Tokens fed through the decode path after the prompt (a two-phase question) enter the ring.
    """

    budget: int = 256
    ring_ratio: float = 0.5
    window: int = 16
    kernel: int = 7
    pooling: str = "max"

    gqa_policy: ClassVar[str] = "per KV head, window attention averaged over its query heads"
    scores_question: ClassVar[str] = "yes: the question ends the prompt, inside the observation window"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.ring_ratio < 1, "method.ring_ratio", self.ring_ratio, "a number in (0, 1)")
        require(self.window >= 1, "method.window", self.window, "an integer >= 1")
        check_budget(self.budget, self.ring + self.window, "the ring (budget * ring_ratio) plus method.window")
        require(
            self.kernel >= 1 and self.kernel % 2 == 1 and self.kernel <= self.window,
            "method.kernel",
            self.kernel,
            f"an odd integer at most method.window ({self.window})",
        )
        require(self.pooling in ("max", "avg"), "method.pooling", self.pooling, "one of ('max', 'avg')")

    @property
    def ring(self) -> int:
        return max(1, int(self.budget * self.ring_ratio))

    def check(self, model: ModelSpec) -> None:
        super().check(model)
        check_budget_fits(self.budget, model)

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        prompt_compression = SnapKV(
            budget=self.budget - self.ring, window=self.window, kernel=self.kernel, pooling=self.pooling
        )
        return SnapStreamLayer(spec, prompt_compression, self.budget)


class SnapStreamLayer(SnapKVLayer):
    """Slots [0, ring_start) hold the kept prompt; slots [ring_start, capacity) are the ring."""

    def __init__(self, spec: LayerSpec, prompt_compression: SnapKV, budget: int) -> None:
        super().__init__(spec, prompt_compression)
        # SnapKV's layer makes room for every decode token; this cache stays within the budget.
        self.budget = budget
        self.capacity = min(budget, spec.prompt_len + spec.decode_len)
        self.slots = aligned_slots(self.capacity)
        self.ring_start: torch.Tensor | None = None  # [B] prompt tokens kept (the ring's first slot)
        self.prompt_len: torch.Tensor | None = None  # [B] the prompt's length: decode token i sits at prompt_len + i

    def fits(self) -> bool:
        """Prompt and every decode token fit in the budget: nothing will ever be evicted."""
        return self.seen + self.spec.decode_len <= self.budget

    def select_prefill(self) -> torch.Tensor | None:
        if self.fits():
            self.window_queries = None
            return None
        return super().select_prefill()

    def finish_prefill(self) -> None:
        prompt_len = self.seen
        kept = prompt_len if self.fits() else min(prompt_len, self.method.budget)
        super().finish_prefill()
        self.ring_start = torch.full_like(self.seen, kept)
        self.prompt_len = torch.full_like(self.seen, prompt_len)

    def decode_slot(self) -> torch.Tensor:
        ring_size = (self.capacity - self.ring_start).clamp(min=1)
        slot = self.ring_start + (self.seen - self.prompt_len) % ring_size  # [B]
        return slot.view(-1, 1).expand(*self.keys.shape[:2])

    def decode_state(self) -> dict[str, torch.Tensor]:
        return {**super().decode_state(), "ring_start": self.ring_start, "prompt_len": self.prompt_len}

    def tensors(self) -> dict[str, torch.Tensor]:
        held = super().tensors()
        if self.ring_start is not None:
            held.update(ring_start=self.ring_start, prompt_len=self.prompt_len)
        return held

"""H2O: keep heavy hitters (tokens with the most accumulated attention) and recent tokens.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023, arXiv 2306.14048.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.cache import KVLayer, LayerSpec, ModelSpec, batch_head_index
from kvbench.errors import require
from kvbench.method import Method, check_budget, check_budget_fits
from kvbench.score_eviction import accumulate_and_evict


@dataclass
class H2O(Method):
    """Keep `budget` tokens per layer and KV head: `recent_ratio * budget` recent, the rest heavy hitters.

    A token's score is the attention it has received, accumulated over every query since the prompt
    (paper §3, Alg. 1). Each decode token is written into the free slot, attention runs over the
    budget + 1 tokens, scores accumulate, and the lowest-scoring non-recent token is evicted; its slot
    takes the next token (the accumulation and the choice of victim are one pass over each row,
    `kvbench.score_eviction`). The prompt is prefilled with full attention, then cut to the top-scored
    tokens plus the recent window. Default split: half recent, half heavy (the paper's lm-eval setting
    uses 10% + 10%).

    Deviation: the paper scores per attention head on MHA models; under GQA a KV head's score is the sum
    over its query heads, and eviction is per KV head.
    """

    budget: int = 256
    recent_ratio: float = 0.5

    gqa_policy: ClassVar[str] = "per KV head, scores summed over its query heads"
    scores_question: ClassVar[str] = "yes: prompt scores come from every prompt query"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.recent_ratio < 1, "method.recent_ratio", self.recent_ratio, "a number in (0, 1)")
        check_budget(self.budget, self.recent, "the recent window")

    @property
    def recent(self) -> int:
        return max(1, int(self.budget * self.recent_ratio))

    def check(self, model: ModelSpec) -> None:
        super().check(model)
        check_budget_fits(self.budget, model)

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        return H2OLayer(spec, self.budget, self.recent)


class H2OLayer(KVLayer):
    needs_received_attention = True

    def __init__(self, spec: LayerSpec, budget: int, recent: int) -> None:
        # One slot beyond the budget for the token being attended; never more than the generation can fill.
        super().__init__(spec, capacity=min(budget + 1, spec.prompt_len + spec.decode_len))
        self.budget, self.recent = budget, recent
        self.scores: torch.Tensor | None = None  # [B, Hkv, slots]: attention each slot's token received

    def on_write(self, slots: slice | torch.Tensor) -> None:
        if self.scores is None:
            self.scores = torch.zeros(self.keys.shape[:3], dtype=torch.float32, device=self.keys.device)
        if isinstance(slots, slice):
            self.scores[:, :, slots] = 0
        else:
            rows, heads = batch_head_index(slots)
            # A device zero: a Python scalar is a CPU tensor, which a CUDA graph capture cannot copy from.
            self.scores[rows, heads, slots] = self.scores.new_zeros(())

    def observe(self, query: torch.Tensor, received: torch.Tensor | None) -> None:
        if self.prefilling:
            self.scores[:, :, : received.shape[-1]] += received
            return
        # Alg. 1: accumulate, and once budget + 1 tokens are live, evict the lowest-scoring one outside the
        # recent window; emptying its slot sends the next token there. One pass over each row (one kernel on
        # CUDA): Inductor's fusion of the PyTorch form cost more than the attention (kvbench.score_eviction).
        accumulate_and_evict(self.scores, received, self.positions, self.seen, self.recent, self.capacity)

    def select_prefill(self) -> torch.Tensor | None:
        filled = self.seen
        if filled <= self.budget:
            return None
        candidates = self.scores[:, :, : filled - self.recent]
        heavy = candidates.topk(self.budget - self.recent, dim=-1).indices.sort(dim=-1).values
        recent = torch.arange(filled - self.recent, filled, device=heavy.device)
        return torch.cat([heavy, recent.expand(*heavy.shape[:2], -1)], dim=-1)

    def compact_state(self, keep: torch.Tensor | None, filled: int) -> None:
        self.scores = self._compact(self.scores, keep, filled)

    def decode_state(self) -> dict[str, torch.Tensor]:
        return {**super().decode_state(), "scores": self.scores}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "scores": self.scores}

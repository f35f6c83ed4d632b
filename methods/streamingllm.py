"""StreamingLLM: attention sinks plus a window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024, arXiv 2309.17453.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.cache import KVLayer, LayerSpec, ModelSpec
from kvbench.errors import require
from kvbench.method import Method, check_budget, check_budget_fits


@dataclass
class StreamingLLM(Method):
    """Keep the first `sinks` tokens and the most recent `budget - sinks` (per layer and KV head).

    `positions="in_cache"` is the paper's position shift (§3.2): attention sees positions within the
    cache, not in the text. Defaults: 4 sinks (the paper's `start_size`).

    Deviations from the reference code:
    - The prompt is prefilled with full attention and cut to the window at its end, as the reference's
      `evict_for_space` does before each new input; from then on each decode token evicts the oldest
      non-sink token before it is written.
    - The position shift rotates the sink keys forward by the number of evicted tokens instead of
      re-rotating every cached key to 0..n-1. RoPE scores depend only on query-key offsets, and the
      recent window is contiguous, so the offsets (hence the attention) are the same.
    """

    budget: int = 256
    sinks: int = 4
    positions: str = "in_cache"

    positions_policy: ClassVar[str] = "in-cache positions (pos-shift) unless positions=original"
    gqa_policy: ClassVar[str] = "same tokens for every head (position rule)"
    scores_question: ClassVar[str] = "no scores: keeps sinks and the recent window"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.sinks >= 0, "method.sinks", self.sinks, "an integer >= 0")
        check_budget(self.budget, self.sinks, "method.sinks")
        allowed = ("in_cache", "original")
        require(self.positions in allowed, "method.positions", self.positions, f"one of {allowed}")

    def check(self, model: ModelSpec) -> None:
        super().check(model)
        check_budget_fits(self.budget, model)

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        if self.positions == "in_cache" and spec.rope_inv_freq is None:
            raise ValueError("positions=in_cache needs the model's RoPE frequencies")
        return StreamingLayer(spec, self)


class StreamingLayer(KVLayer):
    """Slots [0, sinks) hold the sinks; the other slots hold the most recent tokens."""

    def __init__(self, spec: LayerSpec, method: StreamingLLM) -> None:
        # No more slots than the generation can ever fill.
        super().__init__(spec, capacity=min(method.budget, spec.prompt_len + spec.decode_len))
        self.sinks = method.sinks
        self.shift_positions = method.positions == "in_cache" and method.sinks > 0
        self.inv_freq = spec.rope_inv_freq
        self.sink_keys: torch.Tensor | None = None  # the sinks at their original positions

    def select_prefill(self) -> torch.Tensor | None:
        filled = self.seen
        if filled <= self.capacity:
            return None
        recent = torch.arange(filled - (self.capacity - self.sinks), filled)
        keep = torch.cat([torch.arange(self.sinks), recent]).to(self.keys.device)
        return keep.expand(*self.keys.shape[:2], -1)

    def finish_prefill(self) -> None:
        super().finish_prefill()
        if self.shift_positions:
            self.sink_keys = self.keys[:, :, : self.sinks].clone()

    def victim_slot(self) -> torch.Tensor:
        # The oldest token outside the sinks; every head evicts the same position.
        return self.positions[:, :, self.sinks : self.capacity].argmin(dim=-1) + self.sinks

    def keys_for_attention(self) -> torch.Tensor:
        if not self.shift_positions:
            return self.keys
        # Rotate from the pristine copy each step (no rounding builds up), in place: `keys` holds the sinks.
        # Slots fill before anything is evicted, so every token seen beyond the capacity evicted one.
        evicted = (self.seen - self.capacity).clamp(min=0)  # [B]
        # Indexed assignment, which `torch.compile` keeps in place (a slice assignment there copied the
        # whole key buffer every step).
        sink_slots = torch.arange(self.sinks, device=self.keys.device)
        self.keys[:, :, sink_slots] = rotate(self.sink_keys, evicted, self.inv_freq)
        return self.keys

    def decode_state(self) -> dict[str, torch.Tensor]:
        state = super().decode_state()
        if self.sink_keys is not None:
            state["sink_keys"] = self.sink_keys
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        held = super().tensors()
        if self.sink_keys is not None:
            held["sink_keys"] = self.sink_keys
        return held


def rotate(keys: torch.Tensor, offset: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE keys [B, Hkv, n, D] `offset` [B] positions forward (RoPE rotations compose additively)."""
    angles = offset.view(-1, 1).to(torch.float32) * inv_freq.to(keys.device, torch.float32)  # [B, D/2]
    angles = torch.cat([angles, angles], dim=-1).view(-1, 1, 1, keys.shape[-1])
    k = keys.float()
    half = k.shape[-1] // 2
    rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * angles.cos() + rotated_half * angles.sin()).to(keys.dtype)

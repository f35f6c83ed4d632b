"""The KV cache every method builds: per-layer objects behind transformers' public `Cache` API.

A layer holds a fixed number of *slots* per KV head. Prefill writes the whole prompt and attends to it in
full (as every paper here does); `finish_prefill()` then keeps what the method selects. Each decode step
writes one token into a slot: appended while slots are free, else into the slot the method frees. Shapes
stay fixed during decode, so the step can later be captured in a CUDA graph, and the bytes the cache holds
are the bytes its tensors hold.

Attention runs through `KVLayer.attend` (see `kvbench.attention`), never by expanding KV heads under GQA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass(frozen=True)
class ModelSpec:
    """What methods and tasks may know of a model; readable from its config without loading weights."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int


@dataclass(frozen=True)
class LayerSpec:
    """Everything a method needs to build one layer's cache for one generation."""

    layer_idx: int
    model: ModelSpec
    batch_size: int
    prompt_len: int
    decode_len: int  # tokens that will go through the decode path (question tokens + generated tokens)
    rope_inv_freq: torch.Tensor | None = None  # for methods that move keys to other positions


def attention_probs(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """Softmax attention probabilities without expanding KV heads, in float32.

    query [B, Hq, T, D], keys [B, Hkv, S, D], mask bool [T, S] (True = visible) or None.
    Returns [B, Hkv, G, T, S] with G = Hq / Hkv query heads per KV head.
    """
    b, hq, t, d = query.shape
    hkv, s = keys.shape[1], keys.shape[2]
    q = query.view(b, hkv, hq // hkv, t, d)
    logits = torch.einsum("bhgtd,bhsd->bhgts", q.float(), keys.float()) * scaling
    if causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim=-1)


class KVLayer(CacheLayerMixin):
    """One layer's cache with `capacity` slots per KV head.

    Subclasses decide what survives: `select_prefill` (which prompt tokens to keep when the prompt does
    not fit) and `victim_slot` (where a decode token goes once every slot is live). They may watch
    attention through `observe` (probabilities are computed only if `needs_attention_weights`).

    Slots fill in order, so slots [0, filled) are live; `seen` counts tokens written, whose positions are
    0..seen-1. Keys are stored post-RoPE with their original positions.
    """

    is_compileable = False
    is_sliding = False
    needs_attention_weights: ClassVar[bool] = False

    def __init__(self, spec: LayerSpec, capacity: int) -> None:
        super().__init__()
        self.spec = spec
        self.capacity = capacity
        self.seen = 0
        self.filled = 0
        self.prefilling = True
        self.positions: torch.Tensor | None = None

    # ----- transformers' CacheLayerMixin interface -----
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        # Prefill holds the whole prompt; the method shrinks it to `capacity` in `finish_prefill`.
        slots = max(self.capacity, self.spec.prompt_len)
        self.keys = key_states.new_zeros(b, h, slots, d)
        self.values = value_states.new_zeros(b, h, slots, value_states.shape[-1])
        # Each slot's original position (-1: empty): what a layer holds, for methods, masks and tests.
        self.positions = torch.full((b, h, slots), -1, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len = key_states.shape[2]
        if self.prefilling:
            if self.seen + q_len > self.keys.shape[2]:
                raise RuntimeError(f"prefill of {self.seen + q_len} tokens exceeds prompt_len")
            self._write_range(self.seen, key_states, value_states)
        else:
            if q_len != 1:
                raise RuntimeError("after prefill, tokens go through the cache one at a time")
            if self.filled < self.capacity:
                self._write_range(self.filled, key_states, value_states)
            else:
                self._write_slot(self.victim_slot(), key_states, value_states)
        self.seen += q_len
        return self.keys[:, :, : self.filled], self.values[:, :, : self.filled]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, self.seen - self.filled

    def get_max_length(self) -> int:
        return self.capacity

    # ----- writing -----
    def _write_range(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        stop = start + keys.shape[2]
        self.keys[:, :, start:stop] = keys
        self.values[:, :, start:stop] = values
        if "positions" in self.tensors():
            self.positions[:, :, start:stop] = torch.arange(self.seen, self.seen + keys.shape[2])
        self.on_write(slice(start, stop))
        self.filled = max(self.filled, stop)

    def _write_slot(self, slot: torch.Tensor | int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one token into `slot`: an int (same slot for every head) or a [B, Hkv] tensor."""
        if isinstance(slot, int):
            self._write_range(slot, keys, values)
            return
        b, h, _, d = keys.shape
        index = slot.view(b, h, 1, 1)
        self.keys.scatter_(2, index.expand(b, h, 1, d), keys)
        self.values.scatter_(2, index.expand(b, h, 1, values.shape[-1]), values)
        if self.positions is not None:
            self.positions.scatter_(2, slot.view(b, h, 1), self.seen)
        self.on_write(slot)

    def on_write(self, slots: slice | torch.Tensor) -> None:
        """Reset per-slot state of the slots just written (a range, or a [B, Hkv] tensor of slots)."""

    # ----- attention -----
    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of `query` [B, Hq, T, D] over the live slots; returns [B, T, Hq, D]."""
        q_len = query.shape[2]
        keys = self.keys_for_attention(keys)
        # During prefill, slot i holds position i; a chunk after the first needs an explicit causal mask.
        causal = q_len > 1 and q_len == keys.shape[2]
        mask = None
        if q_len > 1 and not causal:
            mask = torch.ones(q_len, keys.shape[2], dtype=torch.bool, device=query.device)
            mask = mask.tril(keys.shape[2] - q_len)
        # The output always comes from the same SDPA call as the dense baseline, so a method that keeps
        # everything matches it bit for bit; probabilities, when a method scores with them, are extra.
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=True
        )
        probs = attention_probs(query, keys, scaling, mask, causal) if self.needs_attention_weights else None
        self.observe(query, probs)
        return out.transpose(1, 2)

    def keys_for_attention(self, keys: torch.Tensor) -> torch.Tensor:
        """The keys attention sees; a method that re-positions keys overrides this."""
        return keys

    def observe(self, query: torch.Tensor, probs: torch.Tensor | None) -> None:
        """See the queries (and probabilities [B, Hkv, G, T, S] if asked) of the step just attended."""

    # ----- the method's decisions -----
    def select_prefill(self) -> torch.Tensor | None:
        """Prompt slots to keep, [B, Hkv, n] with n <= capacity; None keeps every slot (it must fit)."""
        return None

    def victim_slot(self) -> torch.Tensor | int:
        """The slot the next decode token overwrites once all `capacity` slots are live."""
        raise NotImplementedError(f"{type(self).__name__} has no room left and no eviction rule")

    def finish_prefill(self) -> None:
        """End of the prompt: keep what the method selects in a buffer of exactly `capacity` slots."""
        self.prefilling = False
        if not self.is_initialized:
            return
        keep = self.select_prefill()
        if keep is None and self.keys.shape[2] == self.capacity:
            return  # everything kept, and the buffer already has exactly `capacity` slots
        if keep is None and self.filled > self.capacity:
            raise RuntimeError(f"{type(self).__name__} kept {self.filled} tokens in {self.capacity} slots")
        self.keys = self._compact(self.keys, keep)
        self.values = self._compact(self.values, keep)
        if self.positions is not None:
            self.positions = self._compact(self.positions, keep)
        self.compact_state(keep)
        self.filled = self.filled if keep is None else keep.shape[-1]

    def _compact(self, buffer: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """A fresh `capacity`-slot buffer holding the kept slots (in the given order) at the front."""
        out = buffer.new_zeros(*buffer.shape[:2], self.capacity, *buffer.shape[3:])
        if self.positions is not None and buffer is self.positions:
            out.fill_(-1)
        if keep is None:
            out[:, :, : self.filled] = buffer[:, :, : self.filled]
            return out
        index = keep.view(*keep.shape, *([1] * (buffer.dim() - 3))).expand(*keep.shape, *buffer.shape[3:])
        out[:, :, : keep.shape[-1]] = buffer.gather(2, index)
        return out

    def compact_state(self, keep: torch.Tensor | None) -> None:
        """Move per-slot state the same way `finish_prefill` moved keys (None: kept slots in place)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer keeps where attention runs, for byte accounting. Subclasses add theirs."""
        held = {"keys": self.keys, "values": self.values, "positions": self.positions}
        return {name: t for name, t in held.items() if isinstance(t, torch.Tensor)}

    def host_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors kept off the attention device (e.g. host backups of evicted pages)."""
        return {}

    def stats(self) -> dict[str, float]:
        """Counters a method wants in the record (e.g. recalls); summed over layers."""
        return {}


class FullLayer(KVLayer):
    """The dense cache: room for the whole prompt and every decode token, nothing ever evicted.

    Slot i always holds position i, so positions are derived when asked for, never stored: the dense
    baseline holds exactly its keys and values.
    """

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec, capacity=spec.prompt_len + spec.decode_len)

    @property
    def positions(self) -> torch.Tensor | None:
        if not self.is_initialized:
            return None
        slots = torch.arange(self.keys.shape[2], device=self.keys.device)
        return slots.masked_fill(slots >= self.seen, -1).expand(*self.keys.shape[:3])

    @positions.setter
    def positions(self, value: torch.Tensor | None) -> None:
        """Derived, never stored: whatever the base class assigns is dropped."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values}


class KVCache(Cache):
    """transformers' `Cache` over kvbench layers, plus prefill control and byte accounting."""

    def __init__(self, layers: list[KVLayer]) -> None:
        super().__init__(layers=layers)

    def finish_prefill(self) -> None:
        for layer in self.layers:
            layer.finish_prefill()

    def kv_bytes(self) -> tuple[int, int]:
        """(device bytes, host bytes) of every tensor the cache holds, counted from the tensors.

        "Device" is where attention runs (the CPU itself on a CPU run); "host" is what a method keeps
        aside for later (backups), so the two stay separate even when both live in CPU memory.
        """
        device = sum(_nbytes(t) for layer in self.layers for t in layer.tensors().values())
        host = sum(_nbytes(t) for layer in self.layers for t in layer.host_tensors().values())
        return device, host

    def stats(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for layer in self.layers:
            for name, value in layer.stats().items():
                totals[name] = totals.get(name, 0) + value
        return totals


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

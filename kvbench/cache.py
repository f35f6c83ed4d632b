"""The KV cache every method builds: per-layer objects behind transformers' public `Cache` API.

A layer holds a fixed number of *slots* per KV head. Prefill writes the whole prompt and attends to it in
full (as every paper here does); `finish_prefill()` then keeps what the method selects. Each decode step
writes one token into a slot: the first empty one, else the slot the method frees. Shapes stay fixed and
state changes in place during decode, so the step compiles and is captured in a CUDA graph, and the bytes
the cache holds are the bytes its tensors hold.

Attention runs through `KVLayer.attend` (see `kvbench.attention`), never by expanding KV heads under GQA.

Cross-layer sharing (CLA): a `SharedLayer` caches nothing and attends over another layer's keys and values;
which layer produces for which is the method's choice (`Method.kv_producer`), and the cache binds each
consumer to its producer (`KVLayer.bind`) whenever it is built or stacked.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.attention import decode_attention, received_attention_prefill

# Slot buffers are allocated in multiples of this many slots. Two layers that can hold the same tokens
# then have buffers of the same size, so masked decode attention reduces over the same shapes and a
# method whose budget covers the context reproduces the dense cache bit for bit; and a compiled step is
# reused across prompts whose lengths round to the same size.
SLOT_ALIGN = 64


def aligned_slots(tokens: int) -> int:
    return -(-tokens // SLOT_ALIGN) * SLOT_ALIGN


def batch_head_index(slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors [B, 1] and [1, H] that, with `slot` [B, H], address one slot per sequence and head."""
    b, h = slot.shape
    return torch.arange(b, device=slot.device).view(b, 1), torch.arange(h, device=slot.device).view(1, h)


@dataclass(frozen=True)
class ModelSpec:
    """What methods and tasks may know of a model; readable from its config without loading weights."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    # Cross-layer KV sharing the model was trained with (`kvbench_kv_sharing` in its config): layer i
    # attends over the keys and values of layer i - i % kv_sharing. 1: every layer has its own.
    kv_sharing: int = 1


@dataclass(frozen=True)
class LayerSpec:
    """Everything a method needs to build one layer's cache for one generation."""

    layer_idx: int
    model: ModelSpec
    batch_size: int
    prompt_len: int
    decode_len: int  # tokens that will go through the decode path (question tokens + generated tokens)
    rope_inv_freq: torch.Tensor | None = None  # for methods that move keys to other positions


class KVLayer(CacheLayerMixin):
    """One layer's cache with `capacity` slots per KV head.

    Prefill (one sequence at a time, in chunks) writes the whole prompt and attends to it in full; its
    state is plain Python. `finish_prefill()` keeps what the method selects in exactly `capacity` slots and
    switches to decode, where every piece of state is a tensor with the batch first (so caches of several
    sequences `stack` into one batch) that changes only in place: a decode step has fixed shapes, no host
    syncs, and can be compiled and captured in a CUDA graph.

    A decode step writes the new token into `decode_slot()`: the first empty slot, or once every slot is
    live the method's `victim_slot()`. Attention then runs over all slots, masked to the live ones.
    `positions` [B, Hkv, S] holds each slot's original token position (-1: empty); keys are stored
    post-RoPE at those positions. Subclasses decide what survives (`select_prefill`, `victim_slot`) and may
    watch attention (`observe`; `needs_received_attention` asks for the attention each slot received).
    """

    is_compileable = False
    is_sliding = False
    needs_received_attention: ClassVar[bool] = False
    stores_positions: ClassVar[bool] = True
    graph_safe = True  # its decode step can be captured in a CUDA graph

    def __init__(self, spec: LayerSpec, capacity: int) -> None:
        super().__init__()
        self.spec = spec
        self.capacity = capacity  # at most this many slots are ever live
        self.slots = aligned_slots(capacity)  # the buffer's size; slots past `capacity` stay empty
        self.seen: int | torch.Tensor = 0  # tokens written: an int while prefilling, then a [B] tensor
        self.prefilling = True
        self.positions: torch.Tensor | None = None

    # ----- transformers' CacheLayerMixin interface -----
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        # Prefill holds the whole prompt; the method shrinks it to `capacity` in `finish_prefill`.
        slots = max(self.slots, self.spec.prompt_len)
        self.keys = key_states.new_zeros(b, h, slots, d)
        self.values = value_states.new_zeros(b, h, slots, value_states.shape[-1])
        if self.stores_positions:
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
            self.seen += q_len
            return self.keys[:, :, : self.seen], self.values[:, :, : self.seen]
        if q_len != 1:
            raise RuntimeError("after prefill, tokens go through the cache one at a time")
        self._write_slot(self.decode_slot(), key_states, value_states)
        self.seen.add_(1)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # transformers asks only when no positions are given (the engine always gives them).
        return self.seen if isinstance(self.seen, int) else int(self.seen.max())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_max_length(self) -> int:
        return self.capacity

    # ----- writing -----
    def _write_range(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        stop = start + keys.shape[2]
        self.keys[:, :, start:stop] = keys
        self.values[:, :, start:stop] = values
        if self.stores_positions:
            self.positions[:, :, start:stop] = torch.arange(self.seen, self.seen + keys.shape[2])
        self.on_write(slice(start, stop))

    def _write_slot(self, slot: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one token per sequence and KV head into `slot` [B, Hkv], at position `seen`.

        Indexed assignment (`index_put_`), not `scatter_`: under `torch.compile` the functional form of an
        index_put on a cache buffer is turned back into an in-place write, while a scatter's is not and
        then costs a copy of the whole buffer every step.
        """
        rows, heads = batch_head_index(slot)
        self.keys[rows, heads, slot] = keys[:, :, 0]
        self.values[rows, heads, slot] = values[:, :, 0]
        if self.stores_positions:
            self.positions[rows, heads, slot] = self.seen.view(-1, 1).expand_as(slot)
        self.on_write(slot)

    def on_write(self, slots: slice | torch.Tensor) -> None:
        """Reset per-slot state of the slots just written (a range, or a [B, Hkv] tensor of slots)."""

    def decode_slot(self) -> torch.Tensor:
        """[B, Hkv]: the first empty slot, or the method's victim once every slot is live."""
        empty = self.positions[:, :, : self.capacity] < 0
        first_empty = empty.int().argmax(dim=-1)  # argmax returns the first of equal maxima
        victim = self.victim_slot()
        if victim is None:
            return first_empty
        return torch.where(empty.any(dim=-1), first_empty, victim)

    # ----- attention -----
    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of `query` [B, Hq, T, D] over the live slots; returns [B, T, Hq, D]."""
        if not self.prefilling:
            q = query[:, :, 0]
            keys = self.keys_for_attention()
            out, received = decode_attention(
                q, keys, self.values, self.live_slots(), scaling, with_received=self.needs_received_attention
            )
            self.observe(query, received)
            return out.unsqueeze(1)
        # The output always comes from the same SDPA call as the dense baseline, so a method that keeps
        # everything matches it bit for bit; the attention a method scores with is computed apart.
        out = prefill_attention(query, keys, values, scaling)
        received = received_attention_prefill(query, keys, scaling) if self.needs_received_attention else None
        self.observe(query, received)
        return out

    def keys_for_attention(self) -> torch.Tensor:
        """The keys decode attention sees; a method that re-positions keys overrides this."""
        return self.keys

    def live_slots(self) -> torch.Tensor:
        """Which slots decode attention reads: positions [B, Hkv, S] (-1: empty), or each sequence's length
        [B] where slot i holds position i (`attention.decode_attention`)."""
        return self.positions

    def observe(self, query: torch.Tensor, received: torch.Tensor | None) -> None:
        """See the queries [B, Hq, T, D] of the step just attended and, if asked for, the attention each
        slot received from them, float32 [B, Hkv, S] (summed over the queries and the group's heads)."""

    # ----- the method's decisions -----
    def select_prefill(self) -> torch.Tensor | None:
        """Prompt slots to keep, [B, Hkv, n] with n <= capacity; None keeps every slot (it must fit)."""
        return None

    def victim_slot(self) -> torch.Tensor | None:
        """[B, Hkv]: the slot a decode token overwrites once every slot is live (None: it never happens)."""
        return None

    def finish_prefill(self) -> None:
        """End of the prompt: keep what the method selects in a buffer of exactly `capacity` slots."""
        self.prefilling = False
        filled = self.seen
        keep = self.select_prefill()
        if keep is None and filled > self.capacity:
            raise RuntimeError(f"{type(self).__name__} kept {filled} tokens in {self.capacity} slots")
        self.keys = self._compact(self.keys, keep, filled)
        self.values = self._compact(self.values, keep, filled)
        if self.stores_positions:
            self.positions = self._compact(self.positions, keep, filled, empty=-1)
        self.compact_state(keep, filled)
        self.seen = torch.full((self.keys.shape[0],), filled, dtype=torch.long, device=self.keys.device)

    def _compact(self, buffer: torch.Tensor, keep: torch.Tensor | None, filled: int, empty: float = 0) -> torch.Tensor:
        """A fresh buffer of `slots` slots holding the kept slots (in the given order) at the front."""
        out = buffer.new_full((*buffer.shape[:2], self.slots, *buffer.shape[3:]), empty)
        if keep is None:
            out[:, :, :filled] = buffer[:, :, :filled]
            return out
        index = keep.view(*keep.shape, *([1] * (buffer.dim() - 3))).expand(*keep.shape, *buffer.shape[3:])
        out[:, :, : keep.shape[-1]] = buffer.gather(2, index)
        return out

    def compact_state(self, keep: torch.Tensor | None, filled: int) -> None:
        """Move per-slot state the same way `finish_prefill` moved keys (None: kept slots in place)."""

    # ----- cross-layer sharing -----
    def bind(self, layers: list[KVLayer]) -> None:
        """Called with the cache's layers whenever a cache is built or stacked (a `SharedLayer` finds its
        producer there); nothing to do for a layer with its own keys and values."""

    def decodes_from_slots(self) -> bool:
        """Whether decode attention reads this layer's slot buffers (`keys_for_attention()`, `values`,
        `live_slots()`), so that a `SharedLayer` can attend over them too. A layer that keeps its keys and values
        in another form (packed codes) has no `keys` and `values` in its decode state."""
        return {"keys", "values"} <= self.decode_state().keys()

    # ----- batching and accounting -----
    def decode_state(self) -> dict[str, torch.Tensor]:
        """Every decode-time tensor with the batch first, for `stack`. Subclasses add theirs."""
        state = {"keys": self.keys, "values": self.values, "seen": self.seen}
        if self.stores_positions:
            state["positions"] = self.positions
        return state

    @classmethod
    def stack(cls, layers: list[KVLayer]) -> KVLayer:
        """One layer decoding every sequence of `layers` (each finished its prefill) as one batch."""
        stacked = copy.copy(layers[0])
        for name in layers[0].decode_state():
            setattr(stacked, name, cls.stack_tensor(name, layers))
        stacked.spec = dataclasses.replace(layers[0].spec, batch_size=len(layers))
        return stacked

    @classmethod
    def stack_tensor(cls, name: str, layers: list[KVLayer]) -> torch.Tensor:
        """The batch's tensor `name` from each sequence's layer (along the batch dimension); a method may put
        it elsewhere (ArkVale: its host backup in pinned memory)."""
        parts = [getattr(layer, name) for layer in layers]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer keeps where attention runs, for byte accounting. Subclasses add theirs."""
        held = {"keys": self.keys, "values": self.values}
        if self.stores_positions:
            held["positions"] = self.positions
        return {name: t for name, t in held.items() if isinstance(t, torch.Tensor)}

    def host_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors kept off the attention device (e.g. host backups of evicted pages)."""
        return {}

    def stats(self) -> dict[str, float]:
        """Counters a method wants in the record (e.g. recalls); summed over layers."""
        return {}

    # ----- step variants (see KVCache.decode_variant) -----
    def decode_variants(self) -> tuple:
        """The variants its decode steps may take, ordered (empty: one decode step, no schedule)."""
        return ()

    def variant_period(self) -> int:
        """Steps after which its schedule repeats (each row's variants come round once in that many)."""
        return 1


class FullLayer(KVLayer):
    """The dense cache: room for the whole prompt and every decode token, nothing ever evicted.

    Slot i always holds position i, so positions are derived when asked for, never stored: the dense
    baseline holds exactly its keys and values, and a decode token goes to slot `seen`.
    """

    stores_positions = False

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec, capacity=spec.prompt_len + spec.decode_len)

    @property
    def positions(self) -> torch.Tensor | None:
        if not self.is_initialized:
            return None
        slots = torch.arange(self.keys.shape[2], device=self.keys.device)
        seen = self.seen if isinstance(self.seen, int) else self.seen.view(-1, 1, 1)
        return slots.masked_fill(slots >= seen, -1).expand(*self.keys.shape[:3])

    @positions.setter
    def positions(self, value: torch.Tensor | None) -> None:
        """Derived, never stored: what the base class assigns is dropped."""

    def decode_slot(self) -> torch.Tensor:
        return self.seen.view(-1, 1).expand(*self.keys.shape[:2])

    def live_slots(self) -> torch.Tensor:
        """The lengths: nothing to materialise each step, and on a GPU the attention kernel reads no
        positions and skips the empty tiles past the length."""
        return self.seen


class SharedLayer(KVLayer):
    """A layer that attends over its producer's keys and values and caches nothing: Cross-Layer Attention
    (Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention", NeurIPS 2024,
    arXiv 2405.12981). The model still computes this layer's own keys and values; they are dropped.

    The producer is whatever layer the method made for it (dense, evicting, paged...), as long as its decode
    attention reads slot buffers (`decodes_from_slots`); `KVCache` binds the two. The producer comes earlier
    in the forward, so when this layer runs, the producer already holds the current token:
    - prefill: `update` returns the producer's first `seen` slots, and attention is the same SDPA call as
      `KVLayer.attend`;
    - decode: attention is `decode_attention` over the producer's `keys_for_attention()`, `values` and
      `live_slots()`, as they are after the producer's own step (after, say, Scissorhands dropped tokens).
    Policy: this layer never calls `observe`. A method's scores (SnapKV's votes, H2O's accumulated
    attention...) come from the producer's queries alone, and the consumers follow the producer's selection.
    """

    def __init__(self, spec: LayerSpec, producer_idx: int) -> None:
        super().__init__(spec, capacity=0)
        self.producer_idx = producer_idx
        self.producer: KVLayer | None = None

    def bind(self, layers: list[KVLayer]) -> None:
        producer = layers[self.producer_idx]
        if not producer.decodes_from_slots():
            raise ValueError(
                f"layer {self.spec.layer_idx} shares layer {self.producer_idx}'s keys and values, but "
                f"{type(producer).__name__} keeps them in a form decode attention cannot share"
            )
        self.producer = producer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.is_initialized = True
        producer = self.producer
        if self.prefilling:
            return producer.keys[:, :, : producer.seen], producer.values[:, :, : producer.seen]
        return producer.keys, producer.values

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        if self.prefilling:
            return prefill_attention(query, keys, values, scaling)
        producer = self.producer
        keys = producer.keys_for_attention()
        out, _ = decode_attention(query[:, :, 0], keys, producer.values, producer.live_slots(), scaling)
        return out.unsqueeze(1)

    def get_seq_length(self) -> int:
        return self.producer.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.producer.get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return self.producer.get_max_length()

    def finish_prefill(self) -> None:
        self.prefilling = False  # nothing of its own to select or compact

    def decode_state(self) -> dict[str, torch.Tensor]:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}


class KVCache(Cache):
    """transformers' `Cache` over kvbench layers, plus prefill control and byte accounting."""

    def __init__(self, layers: list[KVLayer]) -> None:
        super().__init__(layers=layers)
        for layer in layers:
            layer.bind(layers)
        self.variant_layers = [layer for layer in layers if layer.decode_variants()]
        # The layer a decoder layer's forward works on, where the caller set it (`activate`: the engine's
        # compiled layers): reached without the decoder layer's index, so one trace serves every layer alike.
        # Kept as the layer itself, not derived from `active_idx` in `layer_for`: a trace reading the index
        # would guard on it and trace each layer apart again; the index serves only the eager check.
        self.active: KVLayer | None = None
        self.active_idx: int | None = None
        self._schedule()

    def activate(self, layer_idx: int | None) -> None:
        """Set (None: clear) the layer that `layer_for` gives."""
        self.active = None if layer_idx is None else self.layers[layer_idx]
        self.active_idx = layer_idx

    def layer_for(self, layer_idx: int) -> KVLayer:
        """The active layer, else the one at `layer_idx`. Outside a trace, asking for another layer than the
        active one is an error (a model whose layer reached another layer's cache would get the wrong one);
        inside, the check is left out: reading `layer_idx` would make dynamo trace each layer apart."""
        if self.active is None:
            return self.layers[layer_idx]
        if not torch.compiler.is_compiling() and layer_idx != self.active_idx:
            raise RuntimeError(f"layer {layer_idx} asked for its cache while layer {self.active_idx} is active")
        return self.active

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' update of one layer: `layer_for(layer_idx)`'s."""
        return self.layer_for(layer_idx).update(key_states, value_states, *args, **kwargs)

    def finish_prefill(self) -> None:
        for layer in self.layers:
            layer.finish_prefill()

    @classmethod
    def stack(cls, caches: list[KVCache]) -> KVCache:
        """One cache decoding the sequences of `caches` (each finished its prefill) as one batch; the
        engine stacks even one cache, so that layers set up what decode needs for the whole batch once.

        Layer by layer, each sequence's copy of a layer is dropped from its cache once stacked, so the
        memory peak is the batch's cache plus one layer, not twice the cache; `caches` end empty.
        """
        stacked = []
        for cache in caches:  # its second list of layers would keep every one alive until the batch ends
            cache.variant_layers = []
        for idx in range(len(caches[0].layers)):
            stacked.append(type(caches[0].layers[idx]).stack([cache.layers[idx] for cache in caches]))
            for cache in caches:
                cache.layers[idx] = None
        return cls(stacked)

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
                totals[name] = totals.get(name, 0) + float(value)
        return totals

    # ----- step variants, for the engine's compiled and captured steps -----
    # A layer may do periodic work (a quantized window's flush) only on the steps that need it. It lists its
    # variants (`decode_variants()`, ordered: a larger one does more and is exact on every step, a smaller
    # one only where the layer's `decode_variant()`, computed on the host from counters it keeps there, is
    # no larger), is told the next step's (`take_variant`) and moves its counters after a step that ran no
    # Python (`advance`). The cache gives every such layer one variant per step, the largest any needs, so
    # a compiled step has one version per variant, not per combination of layers.
    def decode_variants(self) -> list[Hashable] | None:
        """The variants of the decode step, smallest first (None: one step, no schedule)."""
        if not self.variant_layers:
            return None
        return sorted({variant for layer in self.variant_layers for variant in layer.decode_variants()})

    def variant_period(self) -> int:
        """Steps within which every variant the schedule can still take comes round (the engine's warm-up
        waits no longer for one: with every step due somewhere, "no flush" never comes)."""
        return max((layer.variant_period() for layer in self.variant_layers), default=1)

    def decode_variant(self) -> Hashable:
        """The next step's variant, from the layers' host counters (no device sync)."""
        return max(layer.decode_variant() for layer in self.variant_layers)

    def safe_variants(self) -> list[Hashable]:
        """The variants the next step may take, its own first (the larger ones are exact too)."""
        own = self.decode_variant()
        return [own, *(variant for variant in self.decode_variants() if variant > own)]

    def select_variant(self, variant: Hashable) -> None:
        """Run the next step in `variant`, one of `safe_variants()` (the engine's warm-up compiles each)."""
        if variant not in self.safe_variants():
            raise ValueError(f"decode variant {variant!r} is not safe now (allowed: {self.safe_variants()})")
        self._give(variant)

    @contextlib.contextmanager
    def hold_variant(self, variant: Hashable) -> Iterator[None]:
        """Make the step captured inside take `variant` (a capture runs nothing), then the next step's own."""
        self._give(variant)
        try:
            yield
        finally:
            self._schedule()

    def advance(self) -> None:
        """A decode step ran without Python (a compiled step, a graph replay): move the host counters."""
        for layer in self.variant_layers:
            layer.advance()
        self._schedule()

    def _schedule(self) -> None:
        if self.variant_layers:
            self._give(self.decode_variant())

    def _give(self, variant: Hashable) -> None:
        # A layer that never takes `variant` (QuaRot at 16 bits never flushes) takes its own.
        for layer in self.variant_layers:
            layer.take_variant(variant if variant in layer.decode_variants() else layer.decode_variant())


def prefill_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of a prefill chunk `query` [B, Hq, T, D], the last T of the S positions in `keys`;
    returns [B, T, Hq, D]."""
    q_len, s = query.shape[2], keys.shape[2]
    # During prefill, slot i holds position i; a chunk after the first needs an explicit causal mask.
    causal = q_len > 1 and q_len == s
    mask = None
    if q_len > 1 and not causal:
        mask = torch.ones(q_len, s, dtype=torch.bool, device=query.device).tril(s - q_len)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

"""A KV layer that stores tokens as packed integer codes, with an optional full-precision window of recent ones.

API for methods (KIVI, ZipCache and QuaRot build on it):
- `QuantSpec(bits, axis, group, clip_ratio)`: how K or V is quantized (`kvbench.quant`): `axis="token"`
  groups `group` channels of one token (QuaRot: group = head_dim), `axis="channel"` groups `group` tokens of
  one channel (KIVI's keys). bits in 2, 3, 4, 8; asymmetric round-to-nearest, float16 scale and zero-point.
- `QuantizedMethod`: base of a quantizing method's hyper-parameters (`storage: packed | simulated`, recorded
  through `describe()`; `exact = False`: lossy at every setting, which the generic method tests know).
- `QuantizedLayer(spec, key, value, window, storage)`: one layer, every token kept (capacity = prompt +
  decode tokens). A subclass may override these hooks (identity by default):
  `transform_keys(k [B, Hkv, T, D])` and `transform_values(v)` before anything is stored (window included),
  `transform_query(q [B, Hq, D])` before decode attention and `transform_output(out [B, Hq, Dv])` after it;
  `output_scale()`: per-channel scales [B, Hkv, Dv] the attention output is multiplied by (ZipCache's: its
  values are stored divided by them), inside the combine kernel where the plane kernel takes the store;
  `decode_rotation(dim, device)`: a +-1 matrix R the stored keys and values are rotated by (QuaRot's
  Hadamard), so that decode attention rotates the query by R / sqrt(D) to meet them and its output back,
  inside the attention kernels where they take the store (`packed_decode_attention`), else by products;
  a decode token written straight to the store (no window) in per-token 4- or 2-bit groups is transformed and
  quantized in one kernel launch (`kvbench.token_quant`), which assumes the transforms are `decode_rotation`
  or nothing: a subclass with other transforms sets `transforms_are_rotation = False` (ZipCache);
  `quantize_prompt(keys, values)` to place the prompt differently, `flush_window()` (with `flush_tokens`, the
  tokens one flush takes out of the window) to change how the window is quantized, `decode_variants()` to
  narrow its flush schedule (QuaRot at 16 bits never flushes), and `after_attention(query, lse, scaling)` to
  act on each decode step's attention (ZipCache).
- `tensors()` lists exactly what is held after prefill: codes, scales, zero-points and window, so the
  measured bytes are codes + parameters + window.

Prefill attends in full precision over the prompt (SDPA), as KIVI, ZipCache and QuaRot's kernels do; at its
end the prompt is quantized, except the newest tokens that the window keeps. Decode: the new token's K/V go
into the window (a ring buffer of `window + 1` slots; with no window, straight into the store), then, when
the window holds more than `window` tokens, its oldest `block` tokens are quantized together (block = the
channel-axis group: a per-channel group needs all of its tokens; 1 otherwise) and appended to the store. The
flush is branch-free: on a step that flushes (see the schedule below) it quantizes every row's oldest block
and writes it with `torch.where(due, new, old)` through indexed assignment (`due` per row: rows of a batch
are due on different steps), so a flush is exact on any step and the step stays static: no host sync, no
data-dependent branch, fixed shapes.

Flush schedule (host-side step variants): a flush is due once every `flush_tokens` steps per row (KIVI: the
group, 32), and the host knows when without asking the device: each row's window count starts from the
prompt's split (`window_tokens`, plain ints) and moves by one token per step, less `flush_tokens` when the
row flushed. Before each decode step the layer's `flush_step` (a Python bool, the only schedule state the
step reads) says whether it runs `flush_window()` at all; it is True whenever some row is due, so a
"no flush" step never meets a due row. Variants are ordered: "flush" is safe on every step (its device mask
commits nothing where no row is due), "no flush" only where none is. A step run as Python (eager, the
question tokens, `score_continuation`) moves the host counters itself and schedules its next step; a compiled
step or a CUDA-graph replay runs none of this Python, and the engine moves the counters after it
(`KVCache.advance`). `torch.compile` guards on the bool, so the step has two compiled versions, never one per
step.

Decode attention: the store's live slots and the window's in one
`kvbench.quant_kernels.packed_decode_attention` call (Triton on CUDA, dequantizing in registers; where the
plane kernel takes the store, the window is one more of its programs, otherwise
`kvbench.kernels.decode_attention` merged through the log-sum-exp; the PyTorch references elsewhere). A layer
with several packed parts (ZipCache's two sets) attends them and the window in one
`kvbench.quant_kernels.packed_sets_attention` call (one launch of the plane kernel over both sets and the
window, one combine); one with none (QuaRot at 16 bits: the window only) or simulated storage attends each
part and the window apart and merges them; either applies `decode_rotation` around them.
`storage="simulated"` keeps the dequantized values in model-dtype buffers instead (accuracy studies; more
bytes, and counted as such).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench import kernels, token_quant
from kvbench.cache import KVLayer, LayerSpec, batch_head_index
from kvbench.errors import require
from kvbench.method import Method
from kvbench.quant import AXES, BITS, PARAM_DTYPE, Quantized, dequantize, packed_width, quantize
from kvbench.quant_kernels import (
    PackedSlots,
    Window,
    merge_attention,
    packed_decode_attention,
    packed_sets_attention,
    ring_positions,
    rotate,
    scale_channels,
)

STORAGES = ("packed", "simulated")


@dataclass(frozen=True)
class QuantSpec:
    """How one of K or V is quantized: `bits`; groups of `group` channels of a token (axis="token") or of
    `group` tokens of a channel (axis="channel"); the range shrunk by `clip_ratio` (1: none)."""

    bits: int
    axis: str
    group: int
    clip_ratio: float = 1.0


@dataclass
class QuantizedMethod(Method):
    """Base of quantizing methods: `storage` packed (codes in bytes) or simulated (dequantized floats)."""

    storage: str = "packed"

    exact: ClassVar[bool] = False  # lossy at every setting: no configuration reproduces the dense cache

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.storage in STORAGES, "method.storage", self.storage, f"one of {STORAGES}")


def check_bits(key: str, bits: int) -> None:
    require(bits in BITS, key, bits, f"one of {BITS}")


def check_clip(key: str, clip_ratio: float) -> None:
    require(0 < clip_ratio <= 1, key, clip_ratio, "a number in (0, 1]")


def check_channel_group(key: str, group: int, head_dim: int, bits: int) -> None:
    """A group of channels must tile head_dim, which must pack into whole bytes."""
    require(group >= 1 and head_dim % group == 0, key, group, f"a divisor of the model's head_dim ({head_dim})")
    require(head_dim % 8 == 0, key, group, f"a model whose head_dim ({head_dim}) is a multiple of 8 (packing)")


class PackedStore:
    """K or V of one part of a layer: `slots` token slots per KV head, as packed codes with their float16
    scales and zero-points (see `kvbench.quant_kernels.PackedSlots` for which parameter row a slot uses), or,
    simulated, as the dequantized values in `dtype`."""

    def __init__(
        self,
        spec: QuantSpec,
        shape: tuple[int, int, int, int],
        param_rows: int,
        row_tokens: int,
        lead: torch.Tensor,
        dtype: torch.dtype,
        simulated: bool,
    ) -> None:
        b, h, slots, dim = shape
        device = lead.device
        self.spec, self.dim, self.row_tokens, self.lead, self.simulated = spec, dim, row_tokens, lead, simulated
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.prompt_row = False  # `PackedSlots.prompt_row`: set by `fill` with a group of its own
        if simulated:
            self.codes = torch.zeros(b, h, slots, dim, dtype=dtype, device=device)
            return
        self.codes = torch.zeros(b, h, slots, packed_width(dim, spec.bits), dtype=torch.uint8, device=device)
        cols = dim // spec.group if spec.axis == "token" else dim
        self.scale = torch.zeros(b, h, param_rows, cols, dtype=PARAM_DTYPE, device=device)
        self.zero = torch.zeros_like(self.scale)

    def quantize(self, x: torch.Tensor, group_tokens: int = 0) -> Quantized:
        """x [B, H, n, D] in this store's layout (per-channel groups of `group_tokens`, 0: row_tokens);
        simulated: (the dequantized values, None, None)."""
        group_tokens = group_tokens or self.row_tokens
        group = self.spec.group if self.spec.axis == "token" else group_tokens
        q = quantize(x, self.spec.bits, self.spec.axis, group, self.spec.clip_ratio)
        if self.simulated:
            return Quantized(dequantize(q, self.spec.bits, self.spec.axis, group, self.codes.dtype), None, None)
        return q

    def fill(self, x: torch.Tensor, group_tokens: int = 0) -> None:
        """Prefill: tokens x [B, H, n, D] into slots [0, n), parameters into rows from 0; per-channel groups
        of `group_tokens` tokens (0: the store's row_tokens). A group of its own is a prompt set in row 0
        (ZipCache's, whose size is the store's lead): the kernels may then fold that row for the tiles below
        lead (`PackedSlots.prompt_row`)."""
        n = x.shape[2]
        if n == 0:
            return
        self.prompt_row = self.spec.axis == "channel" and group_tokens > 0
        codes, scale, zero = self.quantize(x, group_tokens)
        self.codes[:, :, :n] = codes
        if scale is not None:
            self.scale[:, :, : scale.shape[2]] = scale
            self.zero[:, :, : zero.shape[2]] = zero

    def write_block(
        self, start: torch.Tensor, x: torch.Tensor, commit: torch.Tensor | None, group_tokens: int = 0
    ) -> None:
        """Decode: tokens x [B, H, n, D] into slots start[b] + [0, n) of each sequence b, where commit[b]
        (None: all). Indexed assignment of `where(commit, new, old)`: static, in place under torch.compile.
        A block that is not committed may reach past the buffer; its indices are clamped (it rewrites the
        old values)."""
        self.write_quantized(start, self.quantize(x, group_tokens), commit)

    def write_quantized(self, start: torch.Tensor, quantized: Quantized, commit: torch.Tensor | None) -> None:
        """`write_block` of tokens already quantized in this store's layout (codes [B, H, n, bytes] and their
        parameter rows; simulated: the dequantized values, no parameters)."""
        codes, scale, zero = quantized
        b, h, n = codes.shape[:3]
        rows = torch.arange(b, device=codes.device).view(b, 1, 1)
        heads = torch.arange(h, device=codes.device).view(1, h, 1)
        slots = (start.view(b, 1, 1) + torch.arange(n, device=codes.device)).clamp_max(self.codes.shape[2] - 1)
        self._put(self.codes, (rows, heads, slots), codes, commit)
        if scale is None:
            return
        if self.spec.axis == "token":
            param_rows = slots  # one parameter row per slot
        else:
            first = torch.where(
                start < self.lead, 0, 1 + torch.div(start - self.lead, self.row_tokens, rounding_mode="floor")
            )
            param_rows = (first.view(b, 1, 1) + torch.arange(scale.shape[2], device=codes.device)).clamp_max(
                self.scale.shape[2] - 1
            )
        self._put(self.scale, (rows, heads, param_rows), scale, commit)
        self._put(self.zero, (rows, heads, param_rows), zero, commit)

    @staticmethod
    def _put(buffer: torch.Tensor, index: tuple, new: torch.Tensor, commit: torch.Tensor | None) -> None:
        if commit is not None:
            new = torch.where(commit.view(-1, 1, 1, 1), new, buffer[index])
        buffer[index] = new

    def slots_view(self) -> PackedSlots:
        col_channels = self.spec.group if self.spec.axis == "token" else 1
        return PackedSlots(
            self.codes, self.scale, self.zero, self.lead, self.spec.bits, self.row_tokens, col_channels, self.prompt_row
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        held = {"codes": self.codes, "scale": self.scale, "zero": self.zero}
        return {f"{prefix}.{name}": t for name, t in held.items() if t is not None}

    @staticmethod
    def cat(stores: list[PackedStore]) -> PackedStore:
        """One store holding the sequences of `stores` as one batch."""
        out = copy.copy(stores[0])
        for name in ("codes", "scale", "zero", "lead"):
            if getattr(out, name) is not None:
                setattr(out, name, torch.cat([getattr(s, name) for s in stores]))
        return out


@dataclass
class Part:
    """A K store and a V store whose slots [0, length[b]) hold the same tokens of sequence b."""

    keys: PackedStore
    values: PackedStore
    length: torch.Tensor  # [B]

    def attend(
        self,
        query: torch.Tensor,
        scale: float,
        window: Window | None = None,
        rotation: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over this part's slots; a packed part's also over `window`, in the basis `rotation`
        stores the slots in and with its output's channels times `out_scale` where given
        (`packed_decode_attention`); a simulated one's takes none (the layer merges, rotates and scales
        around it)."""
        if not self.keys.simulated:
            keys, values = self.keys.slots_view(), self.values.slots_view()
            return packed_decode_attention(query, keys, values, self.length, scale, window, rotation, out_scale)
        if window is not None or rotation is not None or out_scale is not None:
            raise ValueError("a simulated part attends over its own slots only")
        return kernels.decode_attention(query, self.keys.codes, self.values.codes, self.length, scale)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {**self.keys.tensors(f"{prefix}.keys"), **self.values.tensors(f"{prefix}.values")}

    @staticmethod
    def cat(parts: list[Part]) -> Part:
        return Part(
            PackedStore.cat([p.keys for p in parts]),
            PackedStore.cat([p.values for p in parts]),
            torch.cat([p.length for p in parts]),
        )


class QuantizedLayer(KVLayer):
    """Every token kept: quantized in `parts` (one part here), the newest in a full-precision window
    (see the module doc for the write/flush order and the hooks)."""

    stores_positions = False
    flushes_after_attention: ClassVar[bool] = False  # the flush needs the step's attention (ZipCache's ranking)
    # transform_keys / transform_values are the identity, or the rotation by `decode_rotation` (QuaRot): a new
    # token may then be rotated and quantized in one kernel (`quantize_new_token`). Other transforms: False.
    transforms_are_rotation: ClassVar[bool] = True

    def __init__(self, spec: LayerSpec, key: QuantSpec, value: QuantSpec, window: int, storage: str) -> None:
        super().__init__(spec, capacity=spec.prompt_len + spec.decode_len)
        channel_groups = {s.group for s in (key, value) if s.axis == "channel"}
        if len(channel_groups) > 1 or any(s.axis not in AXES for s in (key, value)):
            raise ValueError(f"per-channel K and V need one group size; axes must be in {AXES}")
        self.key_spec, self.value_spec, self.window = key, value, window
        self.simulated = storage == "simulated"
        self.block = channel_groups.pop() if channel_groups else 1  # tokens quantized together
        self.flush_tokens = self.block  # tokens one flush takes out of the window
        if window < self.block - 1 or (window == 0 and self.block > 1):
            raise ValueError(f"a window of {window} tokens cannot gather per-channel groups of {self.block}")
        self.ring = window + 1 if window else 0  # the window's slots: `window` tokens + the one being written
        self.parts: list[Part] = []
        self.quantized: torch.Tensor | None = None  # [B] tokens in the stores
        self.window_keys: torch.Tensor | None = None
        self.window_values: torch.Tensor | None = None
        # The flush schedule, on the host: each row's tokens in the window, and whether the next step flushes.
        self.window_tokens: list[int] = []
        self.flush_step = True
        self.rotation: torch.Tensor | None = None  # `decode_rotation`'s matrix, made at the end of prefill
        # Whether a decode token is quantized and written into the stores by one kernel launch
        # (`token_quant.quantize_tokens_into`; decided once, not per decode step).
        self.one_launch_tokens = (
            self.transforms_are_rotation
            and not self.simulated
            and key == value
            and token_quant.fits(key.bits, key.axis, key.group, spec.model.head_dim)
        )

    # ----- hooks -----
    def transform_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [B, Hkv, T, D] as they are stored (window included)."""
        return keys

    def transform_values(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def transform_query(self, query: torch.Tensor) -> torch.Tensor:
        """A decode query [B, Hq, D] as it meets the stored keys."""
        return query

    def transform_output(self, out: torch.Tensor) -> torch.Tensor:
        """Decode attention's output [B, Hq, Dv] over the stored values, back to the model's space."""
        return out

    def output_scale(self) -> torch.Tensor | None:
        """Scales [B, Hkv, Dv] (channels contiguous) that decode attention's output channels are multiplied by,
        each query head by its KV head's, before `transform_output`, or None. Where the plane kernel takes the
        store the combine kernel applies them (no kernel of their own a step); elsewhere one product."""
        return None

    def decode_rotation(self, dim: int, device: torch.device) -> torch.Tensor | None:
        """A contiguous [dim, dim] matrix R of +-1 entries (R R = dim I; any dtype, int8 the cheapest to read,
        the kernels convert it exactly) that `transform_keys` and
        `transform_values` rotate by (x R / sqrt(dim)), or None. Decode attention then computes in the
        rotated basis, q R / sqrt(dim) against the stored keys, and rotates its output back. Asked once, at
        the end of prefill, before the prompt is transformed (made eagerly; a compiled step only reads it)."""
        return None

    def after_attention(self, query: torch.Tensor, lse: torch.Tensor, scaling: float) -> None:
        """Each decode step, after attention: the transformed query (not rotated by `decode_rotation`), the
        total log-sum-exp [B, Hq] and the attention scale."""

    # ----- prefill -----
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Only the prompt: the decode tokens go to the packed stores.
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, self.spec.prompt_len, d)
        self.values = value_states.new_zeros(b, h, self.spec.prompt_len, value_states.shape[-1])
        self.is_initialized = True

    def new_store(
        self,
        quant: QuantSpec,
        slots: int,
        dim: int,
        param_rows: int = 0,
        row_tokens: int = 0,
        lead: torch.Tensor | int = 0,
    ) -> PackedStore:
        """A store for `slots` tokens of this layer; parameter rows follow `quant`'s axis unless given."""
        b, h = self.keys.shape[:2]
        device = self.keys.device
        if not row_tokens:
            row_tokens = 1 if quant.axis == "token" else quant.group
            param_rows = slots if quant.axis == "token" else -(-slots // quant.group)
            lead = row_tokens
        lead = torch.as_tensor(lead, device=device).expand(b).clone()
        return PackedStore(quant, (b, h, slots, dim), param_rows, row_tokens, lead, self.keys.dtype, self.simulated)

    def quantize_prompt(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Make the stores and quantize the prompt's oldest tokens (keys/values [1, Hkv, L, D], transformed);
        return how many: the rest stay in the window. Here: all but the newest `window` or fewer, in whole
        blocks."""
        filled = keys.shape[2]
        quantized = max(0, -(-(filled - self.window) // self.block)) * self.block
        part = Part(
            self.new_store(self.key_spec, self.slots, keys.shape[-1]),
            self.new_store(self.value_spec, self.slots, values.shape[-1]),
            torch.full((keys.shape[0],), quantized, dtype=torch.long, device=keys.device),
        )
        part.keys.fill(keys[:, :, :quantized])
        part.values.fill(values[:, :, :quantized])
        self.parts = [part]
        return quantized

    def finish_prefill(self) -> None:
        self.prefilling = False
        filled = self.seen
        self.rotation = self.decode_rotation(self.keys.shape[-1], self.keys.device)
        keys = self.transform_keys(self.keys[:, :, :filled])
        values = self.transform_values(self.values[:, :, :filled])
        quantized = self.quantize_prompt(keys, values)
        b, h = keys.shape[:2]
        if self.ring:
            self.window_keys = keys.new_zeros(b, h, self.ring, keys.shape[-1])
            self.window_values = values.new_zeros(b, h, self.ring, values.shape[-1])
            ring_slots = torch.arange(quantized, filled, device=keys.device) % self.ring
            self.window_keys[:, :, ring_slots] = keys[:, :, quantized:]
            self.window_values[:, :, ring_slots] = values[:, :, quantized:]
        self.keys = self.values = None
        self.seen = torch.full((b,), filled, dtype=torch.long, device=keys.device)
        self.quantized = torch.full((b,), quantized, dtype=torch.long, device=keys.device)
        self.window_tokens = [filled - quantized] * b
        self.flush_step = self.decode_variant()

    # ----- decode -----
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefilling:
            return super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[2] != 1:
            raise RuntimeError("after prefill, tokens go through the cache one at a time")
        if not self.ring:  # no window: quantized as it is written
            part = self.parts[0]
            if self.one_launch_tokens:  # quantized and written into the stores by one kernel
                spec = self.key_spec
                keys, values = (Quantized(store.codes, store.scale, store.zero) for store in (part.keys, part.values))
                token_quant.quantize_tokens_into(
                    key_states, value_states, self.rotation, spec.bits, spec.group, spec.clip_ratio, keys, values,
                    self.seen,
                )  # fmt: skip
            else:
                new_keys, new_values = self.quantize_new_token(key_states, value_states)
                part.keys.write_quantized(self.seen, new_keys, None)
                part.values.write_quantized(self.seen, new_values, None)
            part.length.add_(1)
            self.quantized.add_(1)
            self.seen.add_(1)
            return key_states, value_states
        keys, values = self.transform_keys(key_states), self.transform_values(value_states)
        slot = (self.seen % self.ring).view(-1, 1).expand(*keys.shape[:2])
        rows, heads = batch_head_index(slot)
        self.window_keys[rows, heads, slot] = keys[:, :, 0]
        self.window_values[rows, heads, slot] = values[:, :, 0]
        self.seen.add_(1)
        if self.flush_step:
            self.flush_window()
        if not self.flushes_after_attention:
            self._step_done()
        # transformers hands these to the attention function, which ignores them (the layer attends itself).
        return key_states, value_states

    def quantize_new_token(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[Quantized, Quantized]:
        """A decode token's K and V [B, Hkv, 1, D], transformed and quantized for the store (no window), where
        `kvbench.token_quant` does not take the layout (`one_launch_tokens`: per-token 4- or 2-bit groups, the same
        for K and V, packed, transforms that are `rotation` or nothing, written by the kernel itself)."""
        part = self.parts[0]
        return part.keys.quantize(self.transform_keys(keys)), part.values.quantize(self.transform_values(values))

    def _step_done(self) -> None:
        # A step run as Python moves the host counters; after a compiled step or a graph replay the engine does
        # (a capture runs nothing: each replay is one step). Dynamo sees a constant and traces no branch here.
        if torch.compiler.is_compiling() or (self.window_keys.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        self.advance()

    def window_block(self, start: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's tokens at positions start[b] + [0, n): keys and values [B, Hkv, n, D]."""
        b, h, _, d = self.window_keys.shape
        ring_slots = (start.view(b, 1) + torch.arange(n, device=start.device)) % self.ring
        index = ring_slots.view(b, 1, n, 1).expand(b, h, n, d)
        values_index = ring_slots.view(b, 1, n, 1).expand(b, h, n, self.window_values.shape[-1])
        return self.window_keys.gather(2, index), self.window_values.gather(2, values_index)

    def due_rows(self) -> torch.Tensor:
        """[B] bool, on the device: the rows whose window holds more than `window` tokens (a flush is due)."""
        return self.seen - self.quantized > self.window

    def flush_window(self) -> None:
        """Where a row's window holds more than `window` tokens, quantize its oldest block into the store."""
        due = self.due_rows()
        keys, values = self.window_block(self.quantized, self.block)
        part = self.parts[0]
        part.keys.write_block(part.length, keys, due)
        part.values.write_block(part.length, values, due)
        part.length.add_(due * self.block)
        self.quantized.add_(due * self.block)

    def window_positions(self) -> torch.Tensor:
        """[B, Hkv, ring]: each window slot's position, -1 where not live (already quantized, or never written)."""
        return ring_positions(self.seen, self.quantized, self.ring, self.window_keys.shape[1])

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        if self.prefilling:
            return super().attend(query, keys, values, scaling)
        q = self.transform_query(query[:, :, 0])
        # The ring's counters, not its positions: the plane kernel derives them (no kernel a step for them);
        # the other paths (the split kernel's layouts, simulated storage) compute them (`attention_inputs`).
        window = Window(self.window_keys, self.window_values, None, self.seen, self.quantized) if self.ring else None
        out_scale = self.output_scale()
        if len(self.parts) == 1 and not self.simulated:  # one call: window, rotation and scales inside where it can
            out, lse = self.parts[0].attend(q, scaling, window, self.rotation, out_scale)
        else:
            rotated = q if self.rotation is None else rotate(q, self.rotation)
            packed_sets = len(self.parts) > 1 and not self.simulated
            scaled_inside = packed_sets and self.rotation is None  # in the sets' combine: nothing rotates after it
            if packed_sets:
                # Packed parts (ZipCache's sets) and the window as one attention: one launch where the plane
                # kernel takes both sets (`packed_sets_attention`).
                sets = [(part.keys.slots_view(), part.values.slots_view(), part.length) for part in self.parts]
                out, lse = packed_sets_attention(rotated, sets, scaling, window, out_scale if scaled_inside else None)
            else:
                pieces = [part.attend(rotated, scaling) for part in self.parts]
                if window is not None:
                    pieces.append(kernels.decode_attention(rotated, *window.attention_inputs(), scaling))
                out, lse = merge_attention(pieces)
            out = out if self.rotation is None else rotate(out, self.rotation)
            if out_scale is not None and not scaled_inside:
                out = scale_channels(out, out_scale)
        self.after_attention(q, lse, scaling)
        if self.ring and self.flushes_after_attention:
            self._step_done()
        return self.transform_output(out).unsqueeze(1)

    # ----- the flush schedule, on the host (see the module doc) -----
    def decode_variants(self) -> tuple[bool, ...]:
        """The values `flush_step` takes over the coming steps (empty: no window, no schedule)."""
        return (False, True) if self.ring else ()

    def variant_period(self) -> int:
        """Each row is due once every `flush_tokens` steps."""
        return self.flush_tokens

    def decode_variant(self) -> bool:
        """Whether the next step must flush: some row's window will hold more than `window` tokens."""
        return bool(self.ring) and any(tokens + 1 > self.window for tokens in self.window_tokens)

    def take_variant(self, flush: bool) -> None:
        """The next step flushes or not; the cache passes True wherever `decode_variant()` is (a flush is
        exact on any step, skipping a due one is not)."""
        self.flush_step = flush

    def advance(self) -> None:
        """A decode step ran with `flush_step`: move each row's window count as the device did, and schedule
        the next step from the counts."""
        flushed = self.flush_step
        self.window_tokens = [
            tokens + 1 - (self.flush_tokens if flushed and tokens + 1 > self.window else 0)
            for tokens in self.window_tokens
        ]
        self.flush_step = self.decode_variant()

    def window_overflow(self) -> bool:
        """Whether some row's window holds more than `window` tokens after a step, which only a skipped due
        flush leaves (the ring's next write would overwrite its oldest token). One device sync: for checks."""
        return bool(self.due_rows().any())

    # ----- transformers, batching, accounting -----
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.prefilling:
            return super().get_mask_sizes(query_length)
        return self.slots, 0

    def decode_state(self) -> dict[str, torch.Tensor]:
        state = {"seen": self.seen, "quantized": self.quantized}
        if self.ring:
            state.update(window_keys=self.window_keys, window_values=self.window_values)
        return state

    @classmethod
    def stack(cls, layers: list[KVLayer]) -> KVLayer:
        stacked = super().stack(layers)
        stacked.parts = [Part.cat([layer.parts[i] for layer in layers]) for i in range(len(layers[0].parts))]
        stacked.window_tokens = [tokens for layer in layers for tokens in layer.window_tokens]
        stacked.flush_step = stacked.decode_variant()
        return stacked

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.prefilling:
            return super().tensors()
        held = {}
        for i, part in enumerate(self.parts):
            held.update(part.tensors(f"part{i}"))
        if self.ring:
            held.update(window_keys=self.window_keys, window_values=self.window_values)
        return held

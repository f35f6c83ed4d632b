"""ZipCache: salient tokens at high bits, the rest at low bits, saliency from probe queries' normalized attention.

He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification",
NeurIPS 2024, arXiv 2405.14256; code ThisisBillhe/ZipCache@b6932b9 (`zipcache/models/modeling_llama.py`,
`CompressUtils/compress_function.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench import kernels
from kvbench.cache import KVLayer, LayerSpec, ModelSpec, aligned_slots
from kvbench.errors import require
from kvbench.quant import PARAM_DTYPE
from kvbench.quantized_layer import Part, QuantizedLayer, QuantizedMethod, QuantSpec, check_bits

# Random probes are the positions p with frac(p * GOLDEN) < probe_random: a fixed, evenly spread pseudo-random
# set that depends on the position only (not on the chunking or the prompt's length), so a sequence gets the
# same probes alone and in a batch. The golden ratio's Weyl sequence is the most evenly spread such choice.
GOLDEN = (math.sqrt(5) - 1) / 2
PROBE_BLOCK = 64
# The paper's score, and two ablations: accumulated attention (H2O's, biased toward early tokens) and random.
SALIENCY = (
    "normalized",
    "accumulated",
    "random",
)  # probe queries per block when their attention is computed (bounds the [probes, L] matrix)


def ascending_order(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argsort(dim=-1, stable=True)` for a short last dimension (the decode buffer's `gap` tokens),
    from ranks: token i's rank counts the tokens below it and the equal ones before it (NaN above every number
    and equal to NaN, as the sort puts them), a permutation, and the order puts token i at its rank. Why not
    argsort: in the compiled step Inductor lowers a stable sort to a bitonic Triton kernel, and on the H100 the
    last of that kernel's three cache entries finished 37 s after the entry before it, of a 73 s ZipCache
    compile (`benchmarks/README.md`, session 59); this is a [.., n, n] comparison, a sum and a scatter."""
    index = torch.arange(scores.shape[-1], device=scores.device)
    nan = scores.isnan()
    left, right = scores.unsqueeze(-1), scores.unsqueeze(-2)  # [..., i, j]: token i against token j
    below = (left > right) | (nan.unsqueeze(-1) & ~nan.unsqueeze(-2))  # token j below token i
    equal = (left == right) | (nan.unsqueeze(-1) & nan.unsqueeze(-2))
    rank = (below | (equal & (index[:, None] > index[None, :]))).sum(dim=-1)
    return torch.empty_like(rank).scatter_(-1, rank, index.expand_as(rank).contiguous())


@dataclass
class ZipCache(QuantizedMethod):
    """Mixed-precision KV quantization: per KV head, the `low_ratio` least salient tokens get `low_bits`,
    the others `high_bits` (paper: 4/2 bits, 40% low, average 3.2 bits).

    Saliency (paper §4.2): normalized attention, the attention a token receives summed over queries and
    divided by how many of them could see it (removing the causal mask's bias toward early tokens),
    estimated from probe queries only (§4.3): the last `probe_recent` of the prompt and `probe_random` of
    the other positions, so prefill itself attends with a fused kernel. Summed over each KV head's query
    heads: one ranking per KV head. Keys: per-channel min/max quantization over the salient set and over
    the rest (the code's `mixed_channelwiseQ`). Values: channel-separable token-wise quantization (CSTQuant,
    §4.1): each channel divided by c = sqrt(max |v|) over the prompt, then asymmetric per token. Prefill
    attends in full precision; decode tokens wait in a full-precision buffer, and every `gap` tokens
    (paper: 100) the buffer is split by the current query's attention (un-normalized, as in the code) and
    quantized into the two sets. `saliency` offers two ablations of the prompt's ranking: "accumulated"
    (no normalization, the paper's foil) and "random" (does the ranking matter at all?).

    Deviations from the paper and its code:
    - Normalization divides by the number of *probe* queries that see the token (the metric's definition
      on the rows actually summed); the code divides the probe sum by L - j, the full matrix's count.
    - Random probes: positions whose golden-ratio hash falls below `probe_random` (about that fraction,
      spread evenly, excluding the recent probes), instead of `torch.randint` draws with replacement.
    - Token-wise value groups are one token of one KV head (group = head_dim); the code's rows span all
      heads, mixing tokens of different heads after its per-head gather. The value channel scales c and
      the key ranges are per sequence (the code's are over the batch).
    - Decode: each `gap`-token block is quantized on its own (key ranges over the block's salient and
      other tokens; values with the prompt's channel scales) and older tokens keep their codes; the code
      re-quantizes the whole cache from its dequantized values every `gap` steps. Ours keeps the decode
      step static (the block's flush runs on the steps the host schedules, committed with a per-row mask)
      and does not compound rounding error; a partial last block stays in full precision.
    - Codes are packed and decode attention reads them (`kvbench.quant_kernels`); the code dequantizes
      the whole cache each step and runs FlashAttention on fp16.
    """

    high_bits: int = 4
    low_bits: int = 2
    low_ratio: float = 0.4
    probe_recent: float = 0.05
    probe_random: float = 0.05
    gap: int = 100
    saliency: str = "normalized"

    gqa_policy: ClassVar[str] = "one saliency ranking per KV head, probe attention summed over its query heads"
    scores_question: ClassVar[str] = "yes: the prompt's last tokens are probes"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits("method.high_bits", self.high_bits)
        check_bits("method.low_bits", self.low_bits)
        require(0 <= self.low_ratio <= 1, "method.low_ratio", self.low_ratio, "a fraction in [0, 1]")
        require(0 < self.probe_recent <= 1, "method.probe_recent", self.probe_recent, "a fraction in (0, 1]")
        require(0 <= self.probe_random <= 1, "method.probe_random", self.probe_random, "a fraction in [0, 1]")
        require(self.saliency in SALIENCY, "method.saliency", self.saliency, f"one of {SALIENCY}")
        require(self.gap >= 2, "method.gap", self.gap, "an integer >= 2 (decode tokens quantized together)")

    def check(self, model: ModelSpec) -> None:
        super().check(model)
        require(
            model.head_dim % 8 == 0,
            "method.high_bits",
            self.high_bits,
            f"a model whose head_dim ({model.head_dim}) is a multiple of 8 (packing)",
        )

    def low_count(self, tokens: int) -> int:
        """How many of `tokens` tokens get the low bit width."""
        return int(self.low_ratio * tokens)

    @property
    def average_bits(self) -> float:
        return self.high_bits * (1 - self.low_ratio) + self.low_bits * self.low_ratio

    def describe(self) -> dict:
        return {**super().describe(), "average_bits": self.average_bits}

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        return ZipCacheLayer(spec, self)


class ZipCacheLayer(QuantizedLayer):
    """Two parts, the salient set (high bits) and the rest (low bits); the window is the decode buffer."""

    flushes_after_attention = True
    transforms_are_rotation = False  # transform_values is not a rotation

    def __init__(self, spec: LayerSpec, method: ZipCache) -> None:
        self.method = method
        self.block_counts = (method.gap - method.low_count(method.gap), method.low_count(method.gap))
        key = QuantSpec(method.high_bits, "channel", max(1, self.block_counts[0]))
        value = QuantSpec(method.high_bits, "token", spec.model.head_dim)
        # The window (the decode buffer) holds up to `gap` tokens: window = gap - 1 gives a ring of gap slots.
        super().__init__(spec, key, value, method.gap - 1, method.storage)
        self.flush_tokens = method.gap  # a flush empties the buffer
        self.channel_scale: torch.Tensor | None = None  # CSTQuant's c [B, Hkv, 1, D], float16
        self.part_sets: list[int] = []  # which set (0: salient, 1: the rest) each part holds
        self.recent_queries: torch.Tensor | None = None
        self.random_queries: list[torch.Tensor] = []
        self.random_positions: list[torch.Tensor] = []
        self.scaling = 1.0  # the model's attention scale, seen at the first attention call

    # ----- prefill: probes and saliency -----
    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        self.scaling = scaling
        return super().attend(query, keys, values, scaling)

    def observe(self, query: torch.Tensor, received: torch.Tensor | None) -> None:
        if not self.prefilling:
            return
        end = self.seen
        positions = torch.arange(end - query.shape[2], end, device=query.device)
        random = (positions.double() * GOLDEN) % 1 < self.method.probe_random
        self.random_queries.append(query[:, :, random])
        self.random_positions.append(positions[random])
        # The recent probes are the prompt's last tokens: keep enough of the latest queries for the longest
        # prompt this cache is sized for.
        keep = math.ceil(self.method.probe_recent * self.spec.prompt_len)
        recent = query if self.recent_queries is None else torch.cat([self.recent_queries, query], dim=2)
        self.recent_queries = recent[:, :, -keep:]

    def probes(self, filled: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Probe queries [B, Hq, P, D] and their positions [P]: the last `probe_recent` of the prompt, then
        the random ones before them."""
        recent = max(1, math.ceil(self.method.probe_recent * filled))
        positions = torch.cat(self.random_positions)
        earlier = positions < filled - recent
        queries = torch.cat(
            [torch.cat(self.random_queries, dim=2)[:, :, earlier], self.recent_queries[:, :, -recent:]], 2
        )
        positions = torch.cat([positions[earlier], torch.arange(filled - recent, filled, device=positions.device)])
        self.recent_queries, self.random_queries, self.random_positions = None, [], []
        return queries, positions

    def saliency(self, keys: torch.Tensor) -> torch.Tensor:
        """Normalized attention of each prompt token from the probes, summed over each KV head's query
        heads: float32 [B, Hkv, L] (paper §4.2-4.3); or, as ablations, the accumulated attention
        (un-normalized, H2O's score) or random scores."""
        queries, positions = self.probes(keys.shape[2])
        if self.method.saliency == "random":
            gen = torch.Generator(device=keys.device).manual_seed(self.spec.layer_idx)
            return torch.rand(keys.shape[:3], generator=gen, device=keys.device)
        b, hq, p, d = queries.shape
        hkv, filled = keys.shape[1], keys.shape[2]
        k = keys.float()
        received = torch.zeros(b, hkv, filled, device=keys.device)
        for start in range(0, p, PROBE_BLOCK):
            q = queries[:, :, start : start + PROBE_BLOCK].float()
            q = q.view(b, hkv, hq // hkv, q.shape[2], d)
            logits = torch.einsum("bhgpd,bhld->bhgpl", q, k) * self.scaling
            visible = torch.arange(filled, device=keys.device) <= positions[start : start + PROBE_BLOCK, None]
            received += logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).sum(dim=(2, 3))
        # Probes that could see token j: those at positions >= j (at least the last token, always a probe).
        if self.method.saliency == "accumulated":
            return received
        seen_by = (positions.view(-1, 1) >= torch.arange(filled, device=keys.device)).sum(dim=0)
        return received / seen_by

    # ----- quantizing -----
    def finish_prefill(self) -> None:
        values = self.values[:, :, : self.seen].float()
        # CSTQuant's channel scales c = sqrt(max_t |v|), from the prompt; stored as float16 parameters.
        c = values.abs().amax(dim=2, keepdim=True).sqrt().clamp_min(1e-4)
        self.channel_scale = c.to(PARAM_DTYPE)
        super().finish_prefill()

    def transform_values(self, values: torch.Tensor) -> torch.Tensor:
        return (values.float() / self.channel_scale.float()).to(values.dtype)

    def output_scale(self) -> torch.Tensor:
        """Attention over values stored divided by c comes out divided by c: times c, each KV head's for its
        query heads (in the combine kernel where the plane kernel takes the sets)."""
        return self.channel_scale[:, :, 0]

    def quantize_prompt(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Every prompt token goes to its set; the decode buffer starts empty."""
        filled, d = keys.shape[2], keys.shape[-1]
        low = self.method.low_count(filled)
        order = self.saliency(keys).argsort(dim=-1, stable=True)  # least salient first
        sets = (order[..., low:].sort(dim=-1).values, order[..., :low].sort(dim=-1).values)
        bits = (self.method.high_bits, self.method.low_bits)
        decode_blocks = self.spec.decode_len // self.method.gap
        low_capacity = self.method.low_count(self.spec.prompt_len)  # the longest prompt this cache is sized for
        prompt_capacity = (self.spec.prompt_len - low_capacity, low_capacity)
        self.parts, self.part_sets = [], []
        for which, (index, set_bits, per_block, capacity) in enumerate(
            zip(sets, bits, self.block_counts, prompt_capacity, strict=True)
        ):
            slots = aligned_slots(capacity + decode_blocks * per_block)
            if slots == 0:
                continue
            count = index.shape[-1]
            part = Part(
                # Keys: one parameter row for the prompt's set (row 0, `count` tokens), then one per block.
                self.new_store(
                    QuantSpec(set_bits, "channel", max(1, per_block)),
                    slots,
                    d,
                    param_rows=1 + decode_blocks,
                    row_tokens=max(1, per_block),
                    lead=count,
                ),
                self.new_store(QuantSpec(set_bits, "token", d), slots, d),
                torch.full((keys.shape[0],), count, dtype=torch.long, device=keys.device),
            )
            gather = index.unsqueeze(-1).expand(-1, -1, -1, d)
            part.keys.fill(keys.gather(2, gather), group_tokens=count)
            part.values.fill(values.gather(2, gather))
            self.parts.append(part)
            self.part_sets.append(which)
        return filled

    def flush_window(self) -> None:
        """The buffer is quantized after attention (`after_attention`), which ranks its tokens."""

    def after_attention(self, query: torch.Tensor, lse: torch.Tensor, scaling: float) -> None:
        """Once the buffer holds `gap` tokens, split them by the attention the current query gave them (the
        `low_ratio` least attended to the low set) and quantize each share into its set: on the steps the host
        schedules a flush (`flush_step`), masked to the rows that are due."""
        if not self.flush_step:
            return
        positions = self.window_positions()
        received = kernels.received_attention(query, self.window_keys, positions, scaling, lse)
        due = self.due_rows()  # the buffer holds `gap` tokens
        order = ascending_order(received)  # least attended first
        low = self.block_counts[1]
        shares = (order[..., low:], order[..., :low])
        d, dv = self.window_keys.shape[-1], self.window_values.shape[-1]
        for part, which in zip(self.parts, self.part_sets, strict=True):
            share = shares[which]
            n = share.shape[-1]
            if n == 0:  # this set gets no token of a decode block
                continue
            keys = self.window_keys.gather(2, share.unsqueeze(-1).expand(-1, -1, -1, d))
            values = self.window_values.gather(2, share.unsqueeze(-1).expand(-1, -1, -1, dv))
            part.keys.write_block(part.length, keys, due, group_tokens=n)
            part.values.write_block(part.length, values, due)
            part.length.add_(due * n)
        self.quantized.add_(due * self.method.gap)

    # ----- batching and accounting -----
    def decode_state(self) -> dict[str, torch.Tensor]:
        return {**super().decode_state(), "channel_scale": self.channel_scale}

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.prefilling:
            probes = [self.recent_queries, *self.random_queries]
            return {**super().tensors(), **{f"probe_queries{i}": q for i, q in enumerate(probes) if q is not None}}
        return {**super().tensors(), "channel_scale": self.channel_scale}

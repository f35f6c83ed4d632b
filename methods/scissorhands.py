"""Scissorhands: keep the tokens whose importance persists; drop the persistently unimportant ones.

Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache
Compression at Test Time", NeurIPS 2023, arXiv 2305.17118. Official code: lzcemma/Scissorhands@d0bf444
(`Decentralized_FM_alpha/modules/hf_opt_dropkv.py`, `run_infer_opt_66b_sparse_c4.sh`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.cache import KVLayer, LayerSpec, ModelSpec, batch_head_index
from kvbench.errors import require
from kvbench.method import Method, check_budget_fits
from kvbench.topk import largest_keys

THRESHOLDS = ("average", "top10")
# A drop key sorts by unimportance count first, then by age: count * 2**32 - position (positions < 2**31).
# Counts stay below 2**15 (the history window's bound), so keys lie within +-2**47, which
# `kvbench.topk.largest_keys`' kernel packs with slot indices of up to 14 bits.
COUNT_SHIFT = 32
MAX_HISTORY_WINDOW = 2**15 - 1
NOT_A_CANDIDATE = -(2**47)


@dataclass
class Scissorhands(Method):
    """Keep at most `budget` tokens per layer and KV head; when full, drop the `drop` least important.

    The paper's algorithm (Alg. 1-2): each step appends the new token; at each step a token whose
    attention is below a threshold counts as unimportant at that step. When the cache holds `budget`
    tokens, Compress drops `drop = max(1, int(budget * drop_ratio))` tokens at once: those unimportant
    the most times over the last `history_window` steps, never one of the `recent_window` most recent
    tokens. The cache then refills for `drop` steps before the next compression (the paper amortizes
    compression this way; kvbench's step runs Compress only on the steps that may fill a row, which the
    host knows from its own counts, so the other steps only record). Ties drop the older token first.
    Importance thresholds (`threshold`): "average": attention below 1 / (tokens the query sees) is
    unimportant (the uniform share, as AnswerDotAI's cold-compress implements the paper's Alg. 2);
    "top10": attention outside the step's top 10% of tokens is unimportant (the official code's
    90th-percentile threshold).

    The prompt is prefilled with full attention; at its end the last `history_window` prompt queries
    give each prompt token its counts (the steps of a prompt are its positions), and a prompt that
    fills the budget is compressed as Alg. 1 would: to `budget - drop` tokens.

    Defaults: history window 400 and recent window 10 (the paper's Alg. 2, as cold-compress cites it);
    the paper's drop amount was not recovered, `drop_ratio=0.25` is kvbench's choice. The history is
    held as one bit per slot and step (the paper keeps the w x budget attention scores themselves), so
    the counters cost `history_window / 8` bytes per slot and KV head, counted in the cache's bytes.

    The paper and the official code differ; kvbench follows the paper. The code is a masking
    simulation of C4 perplexity in one teacher-forced forward of OPT-66B: for each query row i from
    100 on, key j stays visible iff its attention exceeded the row's 90th-percentile value in at least
    one of the previous 100 rows, or j is among the 10 most recent; others are masked and the row
    re-softmaxed. It counts importance (keep if ever important), has no budget (the kept share is an
    outcome it logs), never frees memory, only compresses layers 5-35 of 64, and only inside a prompt
    (not during decoding). Cheap to offer here: its threshold (`threshold="top10"`), its windows
    (`history_window=100`, `recent_window=10`) and a first-layers exemption (`exempt_layers`). Not
    offered: budget-free masking inside prefill attention (kvbench's prefill attends to the whole
    prompt, and its cache bytes would be the dense cache's).

    Further deviations: under GQA a KV head's attention is the mean over its query heads (the paper's
    OPT models are MHA) and eviction is per KV head; keys are post-RoPE at original positions (OPT has
    learned absolute positions).
    """

    budget: int = 256
    history_window: int = 400
    recent_window: int = 10
    drop_ratio: float = 0.25
    threshold: str = "average"

    gqa_policy: ClassVar[str] = "per KV head, attention averaged over its query heads"
    scores_question: ClassVar[str] = "yes: the last history_window prompt queries give the prompt's counts"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.budget > 0, "method.budget", self.budget, "a positive number of tokens per layer and KV head")
        require(
            1 <= self.history_window <= MAX_HISTORY_WINDOW,
            "method.history_window",
            self.history_window,
            f"an integer in [1, {MAX_HISTORY_WINDOW}] (steps)",
        )
        require(self.recent_window >= 0, "method.recent_window", self.recent_window, "an integer >= 0")
        require(0 < self.drop_ratio < 1, "method.drop_ratio", self.drop_ratio, "a number in (0, 1)")
        require(
            self.recent_window + self.drop <= self.budget,
            "method.recent_window",
            self.recent_window,
            f"at most method.budget minus the drop amount ({self.budget} - {self.drop}): "
            "the recent window must survive a compression",
        )
        require(self.threshold in THRESHOLDS, "method.threshold", self.threshold, f"one of {THRESHOLDS}")

    @property
    def drop(self) -> int:
        return max(1, int(self.budget * self.drop_ratio))

    def check(self, model: ModelSpec) -> None:
        super().check(model)
        check_budget_fits(self.budget, model)

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        return ScissorhandsLayer(spec, self)


class ScissorhandsLayer(KVLayer):
    def __init__(self, spec: LayerSpec, method: Scissorhands) -> None:
        super().__init__(spec, capacity=min(method.budget, spec.prompt_len + spec.decode_len))
        self.method = method
        self.group = spec.model.num_heads // spec.model.num_kv_heads
        # uint8 [B, Hkv, slots, ceil(w / 8)]: bit (p mod w) of a slot is set when its token was unimportant
        # to the query at position p; the last w steps, a ring over steps. Built at the end of prefill.
        self.history: torch.Tensor | None = None
        self.window_queries: torch.Tensor | None = None  # prefill: the last w queries
        self.scaling = 1.0
        # Decode needs the attention each slot received; prefill computes its own per-query statistics.
        self.needs_received_attention = False
        # The compression schedule, on the host (as a quantized window's flush, kvbench/quantized_layer.py):
        # each row's live tokens, moved by one a step and cut by `drop` when the row fills, so the host knows
        # which steps may compress without asking the device. Only those run Compress (`compress_step`).
        self.live_tokens: list[int] = []
        self.compress_step = True

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        self.scaling = scaling  # the model's attention scale, reused for the prompt's counts
        return super().attend(query, keys, values, scaling)

    def observe(self, query: torch.Tensor, received: torch.Tensor | None) -> None:
        if self.prefilling:
            recent = query if self.window_queries is None else torch.cat([self.window_queries, query], dim=2)
            self.window_queries = recent[:, :, -self.method.history_window :]
            return
        live = self.positions >= 0
        unimportant = live & ~important(received / self.group, live, live.sum(dim=-1, keepdim=True), self.method)
        self.record(unimportant)
        if self.compress_step:
            self.compress_if_full(live)
        self._step_done()

    def record(self, unimportant: torch.Tensor) -> None:
        """Set this step's bit of every slot: column (query position mod w) of the history ring."""
        column = (self.seen - 1) % self.method.history_window  # `seen` already counts this step's token
        byte = (column // 8).view(-1, 1, 1)
        bit = (column % 8).to(torch.uint8).view(-1, 1, 1)
        b, h, s = unimportant.shape
        device = unimportant.device
        rows, heads = torch.arange(b, device=device).view(b, 1, 1), torch.arange(h, device=device).view(1, h, 1)
        index = (rows, heads, torch.arange(s, device=device).view(1, 1, s), byte)
        current = self.history[index]
        cleared = current & ~(torch.ones_like(bit) << bit)
        self.history[index] = cleared | (unimportant.to(torch.uint8) << bit)

    def compress_if_full(self, live: torch.Tensor) -> None:
        """Alg. 1: once `budget` tokens are live, drop the `drop` with the highest unimportance counts."""
        full = live[:, :, : self.capacity].all(dim=-1, keepdim=True)  # [B, Hkv, 1]
        recent = self.positions >= self.seen.view(-1, 1, 1) - self.method.recent_window
        key = drop_key(unimportance_counts(self.history), self.positions).masked_fill(recent | ~live, NOT_A_CANDIDATE)
        victim_key, victims = largest_keys(key, min(self.method.drop, self.capacity))
        rows, heads = batch_head_index(victims[:, :, 0])
        rows, heads = rows.unsqueeze(-1), heads.unsqueeze(-1)
        evict = full & (victim_key > NOT_A_CANDIDATE)
        self.positions[rows, heads, victims] = torch.where(evict, -1, self.positions[rows, heads, victims])
        # A freed slot's history is cleared here, so that the token written there next starts with none: only
        # compress steps pay for it, not every step's write. A device zero: a Python scalar is a CPU tensor,
        # which a CUDA graph capture cannot copy from.
        history = self.history[rows, heads, victims]
        self.history[rows, heads, victims] = torch.where(evict.unsqueeze(-1), history.new_zeros(()), history)

    def select_prefill(self) -> torch.Tensor | None:
        queries, self.window_queries, filled = self.window_queries, None, self.seen
        unimportant = prompt_unimportance(queries, self.keys[:, :, :filled], self.scaling, self.method)
        self.history = pack_history(unimportant, filled, self.method.history_window)
        self.needs_received_attention = True
        if filled < self.method.budget:
            return None
        # The prompt filled the budget: compress once, as Alg. 1 would have, to budget - drop tokens.
        first_recent = filled - self.method.recent_window  # from here on, never dropped
        counts = unimportant[..., :first_recent].sum(dim=2)
        key = drop_key(counts, torch.arange(first_recent, device=self.keys.device))
        kept_older = self.method.budget - self.method.drop - self.method.recent_window
        older = (-key).topk(kept_older, dim=-1).indices.sort(dim=-1).values  # the lowest keys stay
        newest = torch.arange(first_recent, filled, device=older.device).expand(*older.shape[:2], -1)
        return torch.cat([older, newest], dim=-1)

    def compact_state(self, keep: torch.Tensor | None, filled: int) -> None:
        self.history = self._compact(self.history, keep, filled)
        self.live_tokens = [filled if keep is None else keep.shape[-1]] * self.keys.shape[0]
        self.compress_step = self.decode_variant()

    # ----- the compression schedule, on the host -----
    def decode_variants(self) -> tuple[bool, ...]:
        """Steps that compress where a row is full, and steps that do not run Compress at all."""
        return (False, True)

    def variant_period(self) -> int:
        """A row refills `drop` steps after each compression."""
        return self.method.drop

    def decode_variant(self) -> bool:
        """Whether the next step may fill a row (its new token makes `capacity` live tokens)."""
        return any(tokens + 1 >= self.capacity for tokens in self.live_tokens)

    def take_variant(self, compress: bool) -> None:
        """The cache passes True wherever `decode_variant()` is: Compress is exact on any step (rows that are
        not full evict nothing), skipping it on a step that fills a row is not."""
        self.compress_step = compress

    def advance(self) -> None:
        """A decode step ran with `compress_step`: move each row's live count as the device did."""
        # A full row drops `drop` tokens, fewer only if the recent window leaves fewer candidates.
        dropped = min(self.method.drop, max(0, self.capacity - self.method.recent_window))
        self.live_tokens = [
            tokens + 1 - (dropped if self.compress_step and tokens + 1 >= self.capacity else 0)
            for tokens in self.live_tokens
        ]
        self.compress_step = self.decode_variant()

    def _step_done(self) -> None:
        # A step run as Python moves the host counters; after a compiled step or a graph replay the engine does
        # (a capture runs nothing: each replay is one step). Dynamo sees a constant and traces no branch here.
        if torch.compiler.is_compiling() or (self.keys.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        self.advance()

    @classmethod
    def stack(cls, layers: list[KVLayer]) -> KVLayer:
        stacked = super().stack(layers)
        stacked.live_tokens = [tokens for layer in layers for tokens in layer.live_tokens]
        stacked.compress_step = stacked.decode_variant()
        return stacked

    def decode_state(self) -> dict[str, torch.Tensor]:
        return {**super().decode_state(), "history": self.history}

    def tensors(self) -> dict[str, torch.Tensor]:
        held = super().tensors()
        for name in ("history", "window_queries"):
            if getattr(self, name) is not None:
                held[name] = getattr(self, name)
        return held


def important(attention: torch.Tensor, live: torch.Tensor, seen: torch.Tensor, method: Scissorhands) -> torch.Tensor:
    """Which tokens one query found important: `attention` [..., S] (mean over a KV head's query heads),
    `live` [..., S] the tokens it sees, `seen` [..., 1] how many."""
    if method.threshold == "average":
        return live & (attention >= 1.0 / seen)
    # top10: at least the k-th largest attention of the live tokens, k = ceil(seen / 10).
    ranked = attention.masked_fill(~live, -1.0).sort(dim=-1, descending=True).values
    kth = ranked.gather(-1, ((seen + 9) // 10 - 1).expand(*attention.shape[:-1], 1))
    return live & (attention >= kth)


def prompt_unimportance(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, method: Scissorhands, query_block: int = 64
) -> torch.Tensor:
    """bool [B, Hkv, w', T]: which of the T prompt tokens each of the last w' prompt queries [B, Hq, w', D]
    found unimportant (False where the query cannot see the token)."""
    b, hq, rows, d = queries.shape
    hkv, t = keys.shape[1], keys.shape[2]
    blocks = []
    for start in range(0, rows, query_block):
        q = queries[:, :, start : start + query_block].float()
        n = q.shape[2]
        logits = torch.einsum("bhgnd,bhtd->bhgnt", q.view(b, hkv, hq // hkv, n, d), keys.float()) * scaling
        # Query `start + i` of the window sits at position t - rows + start + i and sees keys up to there.
        visible = torch.ones(n, t, dtype=torch.bool, device=keys.device).tril(t - rows + start)
        attention = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).mean(dim=2)
        seen = visible.sum(dim=-1, keepdim=True)
        blocks.append(visible & ~important(attention, visible, seen, method))
    return torch.cat(blocks, dim=2)


def pack_history(unimportant: torch.Tensor, filled: int, window: int) -> torch.Tensor:
    """The prompt's history ring, uint8 [B, Hkv, T, ceil(w / 8)], from `unimportant` [B, Hkv, w', T] of the
    queries at positions filled - w' .. filled - 1 (position p sets bit p mod w)."""
    rows = unimportant.shape[2]
    column = torch.arange(filled - rows, filled, device=unimportant.device) % window
    weights = (1 << (column % 8)).to(torch.int32)
    history = torch.zeros(*unimportant.shape[:2], filled, -(-window // 8), dtype=torch.int32, device=column.device)
    # Each (byte, bit) is set by one query at most, so adding the bit values is OR-ing them.
    history.index_add_(-1, column // 8, unimportant.transpose(2, 3).to(torch.int32) * weights)
    return history.to(torch.uint8)


def unimportance_counts(history: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, S]: set bits per slot over the history window."""
    # Made on the history's device: a module-level CPU tensor copied in the step breaks CUDA-graph capture.
    shifts = torch.arange(8, dtype=torch.uint8, device=history.device)
    bits = (history.unsqueeze(-1) >> shifts) & 1
    return bits.sum(dim=(-1, -2))


def drop_key(counts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 [..., S]: the higher, the sooner dropped: more often unimportant first, then older."""
    return (counts.long() << COUNT_SHIFT) - positions

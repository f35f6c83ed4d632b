"""Block Transformer: global-to-local language modelling (Ho et al., "Block Transformer: Global-to-Local
Language Modeling for Fast Inference", NeurIPS 2024, arXiv 2406.02657; code itsnamgyu/block-transformer).

The paper's Figure 1 in code, tokens x_0 x_1 ... cut into blocks of L_B tokens (block k = x_{kL_B} ...):
- embedder (§2.1): block k's embedding e_k is the concatenation of its L_B token embeddings of width
  d / L_B (`block_embed_tokens`), a vector of width d;
- block decoder (§2.2): causal self-attention over the block sequence [s, e_0, e_1, ...], where s is a
  learned start vector; its output at block position k, h_k, has seen blocks 0..k-1 only. Its KV cache
  holds one entry per block: 1 / L_B of a token-level cache per layer;
- token decoder (§2.3, the `prefix` strategy): block k's tokens are decoded by a causal decoder over
  [prefix_k, x_{kL_B}, ..., x_{kL_B+L_B-2}], where prefix_k is h_k expanded by one linear map into
  `prefix_tokens` vectors of width d. The output at prefix_k's last vector predicts x_{kL_B}, the output at
  x_{kL_B+j} predicts x_{kL_B+j+1}. It never sees another block's tokens: its KV cache is local, at most
  `prefix_tokens + L_B - 1` entries per sequence, reset at every block boundary.

Generation through kvbench's engine (`BlockCache`): prefill runs whole blocks (teacher-forced, chunks must
start on a block boundary); each decode step feeds one token to the token decoder, except the step whose
token completes a block: that step embeds the block, runs one block-decoder step, and starts the next
block's token decoder from its prefix. The host knows which sequences complete a block at each step from
the step count (positions advance by one per step), so no step waits on the device; a batch of prompts
whose lengths differ modulo L_B runs the block decoder for the completing rows only. For CUDA graphs the
cache names the step's shape (`decode_variant`, the rows completing a block) and the engine captures one
graph per shape (at most L_B). Logits follow transformers' convention: position t predicts token t + 1.

Deviations from the paper (all stated in the benchmark's output as well):
- Llama-style layers (RMSNorm, RoPE, SwiGLU, no biases) instead of the paper's GPT-NeoX/Pythia layers,
  so the vanilla baseline (kvbench.train's `llama`) and both decoders share one layer design.
- The block decoder's first input is a learned start vector, so block 0's tokens are predicted too (from
  its prefix) and every token but the first is a target, as in the vanilla model. The official code
  (itsnamgyu/block-transformer, model/block_transformer.py) feeds blocks 0..K-1 and token-decodes blocks
  1..K only, and left-pads a prompt with masked padding tokens to a block boundary; here no prompt is
  padded (each sequence keeps its exact positions; rows complete blocks at different steps).
- Prefix expansion is one linear map d -> prefix_tokens x d (the official `prefix` strategy expands with a
  kernel-1 convolution, the same map; `expansion_ratio: 2` there is the default `prefix_tokens=2` here).
- The token decoder's output head is tied to its input embedding; the embedder has its own table.
- The loss skips the prediction of the first token (as the vanilla model's), so both train on the same
  targets.
- `engine=compiled` is not supported (the step's shape is chosen on the host from a counter that
  torch.compile would guard on); `engine=graph` captures the eager step, one graph per shape.
- Only the dense cache (method=full) applies: the block decoder's cache is indexed by block, not token.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from kvbench.attention import decode_attention
from kvbench.cache import prefill_attention

MODEL_TYPE = "kvbench_block"

# attend(layer index, q [B, Hq, T, D], k [B, Hkv, T, D], v) -> [B, T, Hq, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BlockConfig(PretrainedConfig):
    """Shape of a Block Transformer. `num_hidden_layers` is block + token layers (what a dense cache of the
    same depth would hold, for the harness's dense reference)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 128,
        intermediate_size: int = 384,
        block_layers: int = 2,
        token_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        block_len: int = 4,
        prefix_tokens: int = 2,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        **kwargs,
    ) -> None:
        kwargs.pop("num_hidden_layers", None)  # derived, saved for readers of config.json
        kwargs["tie_word_embeddings"] = False  # the head shares the token embedding inside the model
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.block_layers, self.token_layers = block_layers, token_layers
        self.num_hidden_layers = block_layers + token_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.block_len, self.prefix_tokens = block_len, prefix_tokens
        self.max_position_embeddings, self.rope_theta, self.rms_norm_eps = (
            max_position_embeddings,
            rope_theta,
            rms_norm_eps,
        )
        super().__init__(**kwargs)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention, as transformers' Llama): x [B, H, T, D], cos/sin [B, 1, T, D]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Layer(nn.Module):
    """One pre-norm Llama-style layer. The projections keep transformers' names and call order, so
    kvbench's projection fusion (engine=graph) applies to them as to the vanilla model's."""

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.attn_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Callable) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        x = x + self.o_proj(attend(rotate(q, cos, sin), rotate(k, cos, sin), v).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(nn.Module):
    """A stack of layers and a final norm; `attend` decides what each layer's queries see."""

    def __init__(self, config: BlockConfig, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(config) for _ in range(layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x [B, T, d] at `positions` [B, T] (or [T])."""
        # RoPE frequencies made per call, not kept as a buffer: from_pretrained leaves non-persistent
        # buffers uninitialised (a few tiny kernels per step).
        exponents = torch.arange(0, self.head_dim, 2, device=x.device, dtype=torch.float32) / self.head_dim
        angles = positions.float().unsqueeze(-1) * self.rope_theta**-exponents
        angles = torch.cat((angles, angles), dim=-1)
        if angles.dim() == 2:
            angles = angles.unsqueeze(0)
        cos, sin = angles.cos().to(x.dtype).unsqueeze(1), angles.sin().to(x.dtype).unsqueeze(1)
        for idx, layer in enumerate(self.layers):
            x = layer(x, cos, sin, lambda q, k, v, idx=idx: attend(idx, q, k, v))
        return self.norm(x)


def causal(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True).transpose(1, 2)


class BlockForCausalLM(PreTrainedModel):
    config_class = BlockConfig
    base_model_prefix = "block_transformer"
    _supports_attention_backend = True  # loads with kvbench's attention name; its own attention ignores it

    def __init__(self, config: BlockConfig) -> None:
        super().__init__(config)
        d, length = config.hidden_size, config.block_len
        self.block_embed_tokens = nn.Embedding(config.vocab_size, d // length)  # §2.1: concatenated per block
        self.block_start = nn.Embedding(1, d)  # the block decoder's input before block 0
        self.block_decoder = Decoder(config, config.block_layers)
        self.to_prefix = nn.Linear(d, config.prefix_tokens * d, bias=False)  # §2.3, the `prefix` strategy
        self.embed_tokens = nn.Embedding(config.vocab_size, d)  # the token decoder's; also its output head
        self.token_decoder = Decoder(config, config.token_layers)
        self.post_init()
        # transformers gives generation settings only to models with its `generate()` (this one decodes
        # through kvbench's engine); the engine reads the end-of-text token from here.
        self.generation_config = GenerationConfig.from_model_config(config)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Embedding:
        return self.embed_tokens  # the head is tied to it (the engine reads the vocabulary size here)

    # ----- the three parts -----
    def embed_blocks(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, K * L_B] token ids -> [B, K, d] block embeddings (token embeddings concatenated)."""
        b = ids.shape[0]
        return self.block_embed_tokens(ids).view(b, -1, self.config.hidden_size)

    def prefixes(self, context: torch.Tensor) -> torch.Tensor:
        """Block-decoder outputs [B, K, d] -> the token decoder's prefixes [B, K, P, d]."""
        b, k, d = context.shape
        return self.to_prefix(context).view(b, k, self.config.prefix_tokens, d)

    def decode_tokens(self, prefixes: torch.Tensor, ids: torch.Tensor, attend: Attend = causal) -> torch.Tensor:
        """Token decoder over each block on its own: prefixes [B, K, P, d], ids [B, K * L_B] (a last partial
        block padded). Returns hidden states [B, K * L_B, d]; row kL_B + j predicts token kL_B + j. Each block
        is a separate sequence of the batch, so no block attends to another's tokens."""
        b, k, p, d = prefixes.shape
        length = self.config.block_len
        inputs = self.embed_tokens(ids.view(b, k, length)[:, :, : length - 1])  # a block's last token is never an input
        sequence = torch.cat((prefixes, inputs), dim=2).view(b * k, p + length - 1, d)
        hidden = self.token_decoder(sequence, torch.arange(p + length - 1, device=ids.device), attend)
        return hidden.view(b, k, p + length - 1, d)[:, :, p - 1 :].reshape(b, k * length, d)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed_tokens.weight)

    # ----- forward -----
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: BlockCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] (the last `logits_to_keep` if > 0); position t predicts token t + 1. Without
        a cache, `input_ids` start at position 0; with one, `position_ids` place them (see BlockCache)."""
        if past_key_values is None:
            hidden = self._teacher_forced(input_ids)
        elif past_key_values.prefilling:
            hidden = past_key_values.prefill(self, input_ids, int(position_ids[0, 0]))
        else:
            hidden = past_key_values.decode(self, input_ids[:, 0], position_ids[:, 0]).unsqueeze(1)
        logits = self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _teacher_forced(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, n, d] of the whole model over `ids` [B, n] from position 0."""
        b, n = ids.shape
        length = self.config.block_len
        complete = n // length
        start = self.block_start.weight.expand(b, 1, -1)
        blocks = torch.cat((start, self.embed_blocks(ids[:, : complete * length])), dim=1)
        context = self.block_decoder(blocks, torch.arange(complete + 1, device=ids.device), causal)
        padded = F.pad(ids, (0, (complete + 1) * length - n))
        return self.decode_tokens(self.prefixes(context), padded)[:, 1 : n + 1]

    def make_kvbench_cache(self, method, prompt_len: int, decode_len: int) -> BlockCache:
        """The engine's cache hook: this model keeps its own cache (block decoder + local token decoder)."""
        if method.compresses:
            raise ValueError(
                f"method={type(method).__name__}: a Block Transformer keeps its own dense cache (block "
                "decoder by block, token decoder within the block); use method=full"
            )
        return BlockCache(self, prompt_len + decode_len)


class BlockCache:
    """A Block Transformer's cache for one generation (or a stacked batch).

    - block decoder: per layer keys/values [B, Hkv, block_slots, D], block_slots = ceil(tokens / L_B) + 1
      (the start vector's entry included); `block_seen` [B] entries written;
    - token decoder: per layer keys/values [B, Hkv, P + L_B - 1, D], `token_live` [B, P + L_B - 1] marks
      the current block's entries (its prefix and its tokens fed so far);
    - `pending` [B, L_B]: the current block's tokens (embedded once the block completes); `prefix` [B, P, d]:
      the current block's prefix (for a prefill chunk that continues the block). These are token ids and
      two vectors per sequence, not K/V, and are not counted in `kv_bytes`.
    """

    layers: tuple = ()  # no per-layer cache objects: the engine's graph-safety check has nothing to refuse

    def __init__(self, model: BlockForCausalLM, tokens: int) -> None:
        config = model.config
        param = model.embed_tokens.weight
        device, dtype = param.device, param.dtype
        self.block_len, self.prefix_tokens = config.block_len, config.prefix_tokens
        self.local_slots = config.prefix_tokens + config.block_len - 1
        kv = (1, config.num_key_value_heads)
        block_slots = -(-tokens // config.block_len) + 1

        def buffers(layers: int, slots: int) -> list[torch.Tensor]:
            return [torch.zeros(*kv, slots, config.head_dim, device=device, dtype=dtype) for _ in range(layers)]

        self.block_keys, self.block_values = (
            buffers(config.block_layers, block_slots),
            buffers(config.block_layers, block_slots),
        )
        self.token_keys = buffers(config.token_layers, self.local_slots)
        self.token_values = buffers(config.token_layers, self.local_slots)
        self.block_seen = torch.zeros(1, dtype=torch.long, device=device)
        self.token_live = torch.zeros(1, self.local_slots, dtype=torch.bool, device=device)
        self.pending = torch.zeros(1, config.block_len, dtype=torch.long, device=device)
        self.prefix = torch.zeros(1, config.prefix_tokens, config.hidden_size, device=device, dtype=dtype)
        self.host_positions = [0]  # each sequence's next position, known on the host without a sync
        self.prefilling = True
        self.row_index: dict[tuple[int, ...], torch.Tensor] = {}

    # ----- the engine's interface -----
    def finish_prefill(self) -> None:
        self.prefilling = False
        self._index_variants()

    @classmethod
    def stack(cls, caches: list[BlockCache]) -> BlockCache:
        stacked = caches[0]
        for name in ("block_keys", "block_values", "token_keys", "token_values"):
            setattr(
                stacked, name, [torch.cat(parts) for parts in zip(*(getattr(c, name) for c in caches), strict=True)]
            )
        for name in ("block_seen", "token_live", "pending", "prefix"):
            setattr(stacked, name, torch.cat([getattr(c, name) for c in caches]))
        stacked.host_positions = [p for c in caches for p in c.host_positions]
        stacked._index_variants()
        return stacked

    def kv_bytes(self) -> tuple[int, int]:
        """(device, host) bytes of the keys and values held: block decoder's plus token decoder's."""
        tensors = self.block_keys + self.block_values + self.token_keys + self.token_values
        return sum(t.numel() * t.element_size() for t in tensors), 0

    def stats(self) -> dict[str, float]:
        return {}

    # ----- the step's shape, for CUDA graphs -----
    def _completing(self, positions: list[int]) -> tuple[int, ...]:
        """Rows whose token at `positions` completes a block (the next step runs the block decoder for them)."""
        return tuple(row for row, p in enumerate(positions) if (p + 1) % self.block_len == 0)

    def _index_variants(self) -> None:
        """Index tensors of the rows of every step shape (and of the other rows), made before any graph
        is captured: a capture may not copy from the host."""
        batch = len(self.host_positions)
        for rows in self.decode_variants():
            for index in (rows, tuple(row for row in range(batch) if row not in rows)):
                self.row_index[index] = torch.tensor(index, dtype=torch.long, device=self.block_seen.device)

    def decode_variant(self) -> tuple[int, ...]:
        """The shape of the next decode step: the rows that run the block decoder."""
        return self._completing(self.host_positions)

    def decode_variants(self) -> list[tuple[int, ...]]:
        """The shapes of the next L_B steps, in order (they repeat every L_B steps)."""
        return [self._completing([p + shift for p in self.host_positions]) for shift in range(self.block_len)]

    @contextlib.contextmanager
    def hold_variant(self, variant: tuple[int, ...]) -> Iterator[None]:
        """Make the next step take `variant`'s shape (for capturing it), then restore the host counters."""
        saved = list(self.host_positions)
        shift = next(s for s in range(self.block_len) if self._completing([p + s for p in saved]) == variant)
        self.host_positions = [p + shift for p in saved]
        try:
            yield
        finally:
            self.host_positions = saved

    def advance(self) -> None:
        """One decode step ran without Python (a graph replay): move the host counters with it."""
        self.host_positions = [p + 1 for p in self.host_positions]

    # ----- prefill: whole blocks, teacher-forced -----
    def prefill(self, model: BlockForCausalLM, ids: torch.Tensor, start: int) -> torch.Tensor:
        """One prefill chunk `ids` [1, m] at position `start` (a block boundary); hidden states [1, m, d]."""
        length, m = self.block_len, ids.shape[1]
        if start % length:
            raise ValueError(f"kvbench.prefill_chunk: a Block Transformer's chunks start on blocks of {length}")
        complete = m // length
        blocks = model.embed_blocks(ids[:, : complete * length])
        if start == 0:
            blocks = torch.cat((model.block_start.weight.unsqueeze(0), blocks), dim=1)
        first = int(self.block_seen[0])
        positions = torch.arange(first, first + blocks.shape[1], device=ids.device)

        def attend_blocks(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.block_keys[idx][:, :, first : first + k.shape[2]] = k
            self.block_values[idx][:, :, first : first + k.shape[2]] = v
            seen = first + k.shape[2]
            return prefill_attention(
                q, self.block_keys[idx][:, :, :seen], self.block_values[idx][:, :, :seen], q.shape[-1] ** -0.5
            )

        # The block this chunk opens got its prefix at the end of the previous chunk (start > 0).
        prefixes = self.prefix.unsqueeze(1)[:, : int(start > 0)]
        if blocks.shape[1]:
            prefixes = torch.cat((prefixes, model.prefixes(model.block_decoder(blocks, positions, attend_blocks))), 1)
        recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def attend_tokens(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            recorded[idx] = (k, v)
            return causal(idx, q, k, v)

        padded = F.pad(ids, (0, (complete + 1) * length - m))
        hidden = model.decode_tokens(prefixes, padded, attend_tokens)[:, 1 : m + 1]
        # The last (open) block's prefix and tokens stay in the token decoder's local cache.
        present = self.prefix_tokens + m - complete * length
        for idx, (k, v) in recorded.items():
            self.token_keys[idx][:] = 0
            self.token_values[idx][:] = 0
            self.token_keys[idx][:, :, :present] = k[-1:, :, :present]
            self.token_values[idx][:, :, :present] = v[-1:, :, :present]
        self.token_live[:] = False
        self.token_live[:, :present] = True
        self.pending[:] = 0
        self.pending[:, : m - complete * length] = ids[:, complete * length :]
        self.prefix = prefixes[:, -1]
        self.block_seen += blocks.shape[1]
        self.host_positions = [start + m]
        return hidden

    # ----- decode: one token per sequence -----
    def decode(self, model: BlockForCausalLM, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` [B] at `positions` [B]; hidden states [B, d] that predict the next tokens."""
        if torch.compiler.is_compiling():
            raise NotImplementedError("kvbench.engine=compiled: a Block Transformer decodes with engine=graph or eager")
        batch = tokens.shape[0]
        offset = positions % self.block_len
        rows_all = torch.arange(batch, device=tokens.device)
        self.pending[rows_all, offset] = tokens
        completing = self.decode_variant()
        if not completing:  # the usual step: every row within its block
            hidden = self._token_step(model, tokens, offset, rows_all, everyone=True)
        elif len(completing) == batch:  # every L_B-th step of a block-aligned batch
            hidden = self._block_step(model, rows_all, everyone=True)
        else:  # prompts of lengths that differ modulo L_B: each row takes its own step
            rows, rest = self.row_index[completing], self._rows_not(completing, batch)
            hidden = torch.empty(batch, model.config.hidden_size, device=tokens.device, dtype=self.prefix.dtype)
            hidden[rest] = self._token_step(model, tokens[rest], offset[rest], rest, everyone=False)
            hidden[rows] = self._block_step(model, rows, everyone=False)
        self.host_positions = [p + 1 for p in self.host_positions]
        return hidden

    def _rows_not(self, completing: tuple[int, ...], batch: int) -> torch.Tensor:
        return self.row_index[tuple(row for row in range(batch) if row not in completing)]

    def _token_step(self, model, tokens, offset, rows, everyone: bool) -> torch.Tensor:
        """The token decoder's step within a block: attend over the block's local entries only."""
        slot = self.prefix_tokens + offset  # the local slot of a block's (offset)-th token
        # Values as device tensors, not Python scalars: nothing in a captured step may come from the host.
        self.token_live[rows, slot] = torch.ones_like(slot, dtype=torch.bool)
        live = self.token_live if everyone else self.token_live[rows]
        mask = live.view(len(rows), 1, 1, -1)

        def attend(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.token_keys[idx][rows, :, slot] = k[:, :, 0]
            self.token_values[idx][rows, :, slot] = v[:, :, 0]
            keys = self.token_keys[idx] if everyone else self.token_keys[idx][rows]
            values = self.token_values[idx] if everyone else self.token_values[idx][rows]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True).transpose(1, 2)

        x = model.embed_tokens(tokens).unsqueeze(1)
        return model.token_decoder(x, slot.view(-1, 1), attend)[:, 0]

    def _block_step(self, model, rows: torch.Tensor, everyone: bool) -> torch.Tensor:
        """A block completed: embed it, one block-decoder step (§2.2), then its successor's prefix through a
        fresh local cache of the token decoder (§2.3). Returns the prefix's last output per row."""
        slot = self.block_seen[rows]
        block = model.embed_blocks(self.pending[rows])  # [n, 1, d]

        def attend_blocks(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.block_keys[idx][rows, :, slot] = k[:, :, 0]
            self.block_values[idx][rows, :, slot] = v[:, :, 0]
            keys = self.block_keys[idx] if everyone else self.block_keys[idx][rows]
            values = self.block_values[idx] if everyone else self.block_values[idx][rows]
            filled = torch.arange(keys.shape[2], device=keys.device).view(1, 1, -1)
            block_positions = filled.masked_fill(filled > slot.view(-1, 1, 1), -1).expand(*keys.shape[:3])
            out, _ = decode_attention(q[:, :, 0], keys, values, block_positions, q.shape[-1] ** -0.5)
            return out.unsqueeze(1)

        context = model.block_decoder(block, slot.view(-1, 1), attend_blocks)
        prefix = model.prefixes(context)[:, 0]  # [n, P, d]
        self.block_seen[rows] = slot + 1
        self.prefix[rows] = prefix
        self.pending.index_fill_(0, rows, 0)
        p = self.prefix_tokens
        live = torch.zeros(len(rows), self.local_slots, dtype=torch.bool, device=rows.device)
        live[:, :p] = True
        self.token_live[rows] = live

        def attend_prefix(idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.token_keys[idx][rows, :, :p] = k
            self.token_values[idx][rows, :, :p] = v
            return causal(idx, q, k, v)

        hidden = model.token_decoder(prefix, torch.arange(p, device=rows.device), attend_prefix)
        return hidden[:, -1]


def kv_bytes_formula(config: BlockConfig, tokens: int, bytes_per_element: int) -> int:
    """What `BlockCache` holds for one sequence of `tokens` tokens: 2 (K and V) x kv heads x head_dim x
    element size x (block layers x (ceil(tokens / L_B) + 1) block entries + token layers x (P + L_B - 1))."""
    per_entry = 2 * config.num_key_value_heads * config.head_dim * bytes_per_element
    blocks = math.ceil(tokens / config.block_len) + 1
    local = config.prefix_tokens + config.block_len - 1
    return per_entry * (config.block_layers * blocks + config.token_layers * local)


_registered = False


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know the model type (so `model=hf model.path=<checkpoint>`
    loads it without remote code). Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, BlockConfig, exist_ok=True)
    AutoModelForCausalLM.register(BlockConfig, BlockForCausalLM, exist_ok=True)
    _registered = True

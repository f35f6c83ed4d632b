"""Settings of `python -m kvbench.train`: the model's shape (`model.`), the corpus (`data.`) and the
optimisation (`train.`). Every range check runs in `__post_init__`, before any text is read or model built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbench.errors import require

# Model constructions `model.arch` selects (kvbench/train/model.py builds them): a Llama-style decoder, or
# a Block Transformer (kvbench/block_model.py) whose `layers` are split between its block and token decoders.
ARCHS = ("llama", "block")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class ModelShape:
    """A Llama-style decoder. `kv_heads`: 1 = MQA, `heads` = MHA, between = GQA. `kv_sharing`: CLA's
    sharing factor s (Brandon et al. 2024): layer i attends over the keys and values of layer i - i % s.

    `arch: block` (Ho et al. 2024): `block_layers` of the `layers` form the block decoder (0: half), the
    rest the token decoder; `block_len` tokens per block; `prefix_tokens` vectors of prefix per block."""

    name: str = "gqa"
    arch: str = "llama"
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    kv_sharing: int = 1
    head_dim: int = 0  # 0: hidden / heads
    intermediate: int = 0  # 0: 8/3 hidden rounded up to a multiple of 64 (the SwiGLU convention)
    max_positions: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    block_len: int = 4
    block_layers: int = 0  # 0: half of `layers`
    prefix_tokens: int = 2

    def __post_init__(self) -> None:
        require(self.arch in ARCHS, "model.arch", self.arch, f"one of {ARCHS}")
        for key in ("layers", "hidden", "heads", "kv_heads", "max_positions"):
            value = getattr(self, key)
            require(value >= 1, f"model.{key}", value, "an integer >= 1")
        require(
            self.heads % self.kv_heads == 0,
            "model.kv_heads",
            self.kv_heads,
            f"a divisor of model.heads ({self.heads}): 1 = MQA, {self.heads} = MHA",
        )
        require(
            1 <= self.kv_sharing <= self.layers,
            "model.kv_sharing",
            self.kv_sharing,
            f"an integer from 1 (no sharing) to model.layers ({self.layers})",
        )
        require(
            self.head_dim > 0 or self.hidden % self.heads == 0,
            "model.hidden",
            self.hidden,
            f"a multiple of model.heads ({self.heads}), or set model.head_dim",
        )
        require(self.head_dim >= 0, "model.head_dim", self.head_dim, "0 (hidden / heads) or an integer >= 1")
        require(self.intermediate >= 0, "model.intermediate", self.intermediate, "0 (8/3 hidden) or an integer >= 1")
        require(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "a positive number")
        if self.arch == "block":
            self._check_block()

    def _check_block(self) -> None:
        require(self.block_len >= 1, "model.block_len", self.block_len, "an integer >= 1 (tokens per block)")
        require(
            self.hidden % self.block_len == 0,
            "model.block_len",
            self.block_len,
            f"a divisor of model.hidden ({self.hidden}): each token's block embedding is hidden / block_len wide",
        )
        require(
            self.layers >= 2,
            "model.layers",
            self.layers,
            "an integer >= 2 for arch=block (block and token decoders need a layer each)",
        )
        require(
            0 <= self.block_layers < self.layers,
            "model.block_layers",
            self.block_layers,
            f"0 (half) or 1..{self.layers - 1}: the rest of model.layers ({self.layers}) form the token decoder",
        )
        require(self.prefix_tokens >= 1, "model.prefix_tokens", self.prefix_tokens, "an integer >= 1")
        require(
            self.kv_sharing == 1,
            "model.kv_sharing",
            self.kv_sharing,
            "1 for arch=block (cross-layer sharing is a llama-arch option)",
        )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def resolved_block_layers(self) -> int:
        return self.block_layers or self.layers // 2

    @property
    def resolved_intermediate(self) -> int:
        return self.intermediate or -(-8 * self.hidden // 3 // 64) * 64


@dataclass
class DataSettings:
    """The training corpus: local files or folders (`paths`: .txt, .jsonl / .json with `text_field`), or a
    `datasets` hub id (`hub_id`, `hub_config`, `split`, `text_field`). Every `val_every`-th piece of
    `seq_len` tokens is held out for the validation loss."""

    paths: list[str] = field(default_factory=list)
    hub_id: str = ""
    hub_config: str = ""
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = ""  # a tokenizer folder or hub id; empty: the embedded SmolLM2's (saved with the model)
    val_every: int = 50
    max_tokens: int = 0  # 0: the whole corpus; else its first max_tokens tokens

    def __post_init__(self) -> None:
        require(
            bool(self.paths) != bool(self.hub_id),
            "data.paths",
            self.paths,
            "a list of files/folders, or empty with data.hub_id set (exactly one of the two)",
        )
        require(self.val_every >= 2, "data.val_every", self.val_every, "an integer >= 2 (1 piece in N held out)")
        require(self.max_tokens >= 0, "data.max_tokens", self.max_tokens, "0 (all) or a positive token count")


@dataclass
class TrainSettings:
    """Optimisation: AdamW, linear warm-up then cosine decay to `min_lr_ratio * lr`, per optimizer step.
    A step is `grad_accum` micro-batches of `batch` pieces of `seq_len` tokens."""

    steps: int = 200
    batch: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    device: str = "auto"
    seed: int = 0
    save_every: int = 100
    eval_every: int = 50
    out_dir: str = "results/train/gqa"
    resume: bool = True  # continue from out_dir/checkpoint if there is one
    progress: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "batch", "grad_accum", "save_every", "eval_every"):
            value = getattr(self, key)
            require(value >= 1, f"train.{key}", value, "an integer >= 1")
        require(self.seq_len >= 2, "train.seq_len", self.seq_len, "an integer >= 2 (a token and its successor)")
        require(self.lr > 0, "train.lr", self.lr, "a positive learning rate")
        require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a number >= 0 (0: no clipping)")
        require(self.precision in PRECISIONS, "train.precision", self.precision, f"one of {PRECISIONS}")
        require(bool(self.out_dir.strip()), "train.out_dir", self.out_dir, "a folder path")


@dataclass
class TrainConfig:
    model: ModelShape
    data: DataSettings
    train: TrainSettings

    def __post_init__(self) -> None:
        require(
            self.train.seq_len <= self.model.max_positions,
            "train.seq_len",
            self.train.seq_len,
            f"at most model.max_positions ({self.model.max_positions})",
        )
        if self.model.arch == "block":
            require(
                self.train.seq_len % self.model.block_len == 0,
                "train.seq_len",
                self.train.seq_len,
                f"a multiple of model.block_len ({self.model.block_len}): pieces are whole blocks",
            )

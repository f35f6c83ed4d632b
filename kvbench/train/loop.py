"""The training loop: AdamW with warm-up + cosine, gradient accumulation, bf16 autocast on CUDA,
validation loss every `eval_every` steps, checkpoints every `save_every` steps and at the end, resume.

Resume neither loses nor repeats a step: the batches are a function of (seed, step) (`BatchOrder`), the
learning rate a function of the step (`lr_at`, no scheduler state to restore), and the checkpoint holds
the weights, the optimizer state, the RNG states and the step, so a killed run, resumed, writes the same
loss log and ends with the same weights as one that was never stopped (tested, on CPU, fp32).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel

from kvbench.errors import ConfigError, require
from kvbench.models import resolve_device
from kvbench.train import checkpoint
from kvbench.train.config import TrainConfig, TrainSettings
from kvbench.train.data import BatchOrder, Pieces, load_pieces
from kvbench.train.model import build_model, forward_kwargs, parameter_counts, unused_parameters

# Settings that may change between a run and its resumption: where and how often it writes, and where it
# runs (a device change keeps the run going, though not bit for bit). Any other change is refused.
RESUMABLE_CHANGES = ("train.out_dir", "train.resume", "train.progress", "train.save_every", "train.eval_every",
                     "train.device")  # fmt: skip


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # optimizer steps done
    tokens: int  # training tokens seen
    elapsed_s: float  # training time over all sessions of the run (evaluation and saving included)
    loss: float  # the last step's training loss
    val_loss: float  # on the held-out pieces, at the last evaluation (every eval_every steps and the last)
    params: dict[str, int]
    stopped_early: bool  # `max_seconds` ran out before `train.steps`


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (weights and optimizer stay fp32), or None for plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def lr_at(step: int, settings: TrainSettings) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio * lr."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def make_optimizer(model: PreTrainedModel, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms do not; a CLA model's unused K/V projections are left out."""
    unused = unused_parameters(model)
    params = [(n, p) for n, p in model.named_parameters() if n not in unused]
    groups = [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), fused=fused)


def batch_loss(model: PreTrainedModel, tokens: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Mean next-token loss of a batch of pieces (each predicts its tokens 2..seq_len)."""
    autocast = torch.autocast(tokens.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        return model(input_ids=tokens, labels=tokens, **forward_kwargs()).loss


@torch.no_grad()
def evaluate(model: PreTrainedModel, pieces: torch.Tensor, batch: int, dtype: torch.dtype | None) -> float:
    """Mean next-token loss over `pieces` (all the same length, so batch means weigh equally per piece)."""
    device = next(model.parameters()).device
    model.eval()
    total = 0.0
    for start in range(0, len(pieces), batch):
        chunk = pieces[start : start + batch].to(device)
        total += batch_loss(model, chunk, dtype).item() * len(chunk)
    model.train()
    return total / len(pieces)


def flat(config: TrainConfig) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in asdict(config).items() for key, value in values.items()}


def check_resume(config: TrainConfig) -> bool:
    """Whether the run resumes from `out_dir/checkpoint`; a checkpoint of other settings is bad input."""
    out_dir = Path(config.train.out_dir)
    require(not out_dir.is_file(), "train.out_dir", str(out_dir), "a folder (this is a file)")
    if not checkpoint.has_checkpoint(out_dir):
        return False
    require(
        config.train.resume,
        "train.resume",
        config.train.resume,
        f"true: {out_dir}/checkpoint exists (resume it, or choose another train.out_dir)",
    )
    saved, current = checkpoint.saved_config(out_dir), flat(config)
    for key, value in current.items():
        if key not in RESUMABLE_CHANGES and saved.get(key) != value:
            raise ConfigError(key, value, f"{saved.get(key)!r}, as in the checkpoint being resumed ({out_dir})")
    return True


class Trainer:
    """One training run in `config.train.out_dir` (resumed from its checkpoint when it has one)."""

    def __init__(self, config: TrainConfig, pieces: Pieces, vocab_size: int, tokenizer=None) -> None:
        self.config, self.settings, self.pieces, self.tokenizer = config, config.train, pieces, tokenizer
        self.out_dir = Path(self.settings.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(self.settings.device, "train.device")
        self.dtype = autocast_dtype(self.settings.precision, self.device)
        torch.manual_seed(self.settings.seed)  # the initial weights
        bos, eos = (tokenizer.bos_token_id, tokenizer.eos_token_id) if tokenizer is not None else (None, None)
        self.model = build_model(config.model, vocab_size, bos, eos).to(self.device).train()
        self.optimizer = make_optimizer(self.model, self.settings)
        self.order = BatchOrder(len(pieces.train), self.settings.seed)
        self.step, self.elapsed_s, self.val_loss = 0, 0.0, math.nan
        if check_resume(config):
            state = checkpoint.load_checkpoint(self.out_dir, self.model)
            self.optimizer.load_state_dict(state["optimizer"])
            checkpoint.set_rng_states(state["rng"])
            self.step, self.elapsed_s, self.val_loss = state["step"], state["elapsed_s"], state["val_loss"]
        checkpoint.cut_loss_log(self.out_dir, self.step)

    @property
    def tokens_per_step(self) -> int:
        return self.settings.batch * self.settings.grad_accum * self.settings.seq_len

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns its mean loss."""
        settings = self.settings
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, settings)
        total = torch.zeros((), device=self.device)
        for micro in range(settings.grad_accum):
            index = self.order.micro_batch(self.step, micro, settings.batch, settings.grad_accum)
            loss = batch_loss(self.model, self.pieces.train[index].to(self.device), self.dtype) / settings.grad_accum
            loss.backward()
            total += loss.detach()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total.item()

    def save(self) -> None:
        state = {
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "val_loss": self.val_loss,
            "optimizer": self.optimizer.state_dict(),
            "rng": checkpoint.rng_states(),
        }
        checkpoint.save_checkpoint(self.out_dir, self.model, self.tokenizer, state, flat(self.config))

    def run(self, max_seconds: float = math.inf) -> TrainResult:
        """Train to `train.steps` (or until `max_seconds` of this session pass), then save and plot."""
        settings, started, first_step = self.settings, time.perf_counter(), self.step
        elapsed_before, last_loss, stopped_early = self.elapsed_s, math.nan, False
        bar = _progress(settings, self.step, self.config.model.name)
        while self.step < settings.steps:
            if time.perf_counter() - started > max_seconds:
                stopped_early = True
                break
            last_loss = self.train_step()
            row = {"step": self.step, "loss": last_loss, "lr": lr_at(self.step - 1, settings)}
            if self.step % settings.eval_every == 0 or self.step == settings.steps:
                self.val_loss = evaluate(self.model, self.pieces.val, settings.batch, self.dtype)
                row["val_loss"] = self.val_loss
            self.elapsed_s = elapsed_before + time.perf_counter() - started
            row.update(tokens=self.step * self.tokens_per_step, elapsed_s=round(self.elapsed_s, 3))
            checkpoint.append_loss(self.out_dir, row)
            if self.step % settings.save_every == 0 and self.step < settings.steps:
                self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", val=f"{self.val_loss:.3f}")
        bar.close()
        if self.step > first_step:  # a finished run, started again, has nothing new to save
            self.save()
        plot_loss(self.out_dir)
        return TrainResult(
            out_dir=self.out_dir,
            step=self.step,
            tokens=self.step * self.tokens_per_step,
            elapsed_s=self.elapsed_s,
            loss=last_loss,
            val_loss=self.val_loss,
            params=parameter_counts(self.model),
            stopped_early=stopped_early,
        )


def _progress(settings: TrainSettings, done: int, name: str):
    from tqdm import tqdm

    return tqdm(total=settings.steps, initial=done, desc=f"train {name}", unit="step", disable=not settings.progress)


def load_tokenizer(name: str):
    """`data.tokenizer`, or the embedded SmolLM2's tokenizer when empty (saved with every checkpoint)."""
    if not name:
        from kvbench.models import ModelConfig
        from kvbench.models import load_tokenizer as embedded_tokenizer

        return embedded_tokenizer(ModelConfig())
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ConfigError("data.tokenizer", name, f"a tokenizer folder or hub id ({error})") from None


def train(config: TrainConfig) -> TrainResult:
    """`python -m kvbench.train`: check the settings and the output folder, read the corpus, train."""
    check_resume(config)
    resolve_device(config.train.device, "train.device")
    tokenizer = load_tokenizer(config.data.tokenizer)
    pieces = load_pieces(config.data, tokenizer, config.train.seq_len)
    return Trainer(config, pieces, len(tokenizer), tokenizer).run()


def plot_loss(out_dir: Path) -> None:
    """`loss.png`: training loss per step and validation loss where it was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the GPU machine has no matplotlib; loss.jsonl holds the same numbers
        print("kvbench.train: matplotlib missing, no loss.png", file=sys.stderr)
        return
    rows = checkpoint.read_loss_log(out_dir)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", linewidth=1)
    val = [r for r in rows if "val_loss" in r]
    axes.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation (held out)")
    axes.set(xlabel="optimizer step", ylabel="loss (nats / token)", title=out_dir.name)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "loss.png", dpi=120)
    plt.close(figure)

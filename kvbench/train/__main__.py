"""`python -m kvbench.train [overrides]`: train a small decoder (configs/train.yaml, configs/train_model/).

Exit status: 0 trained (or already finished), 2 bad input (one line naming the key), 130 on Ctrl-C (the
last checkpoint is kept; the same command resumes from it).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from kvbench.config import build_dataclass
from kvbench.errors import ConfigError, report, require
from kvbench.train.config import DataSettings, ModelShape, TrainConfig, TrainSettings

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SECTIONS = {"model": ModelShape, "data": DataSettings, "train": TrainSettings}


def build(cfg: DictConfig) -> TrainConfig:
    """Typed, checked settings from the composed config: unknown keys and bad values are one-line errors."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise ConfigError(str(error.full_key), "???", "required: set it on the command line") from None
    except InterpolationResolutionError as error:
        raise ConfigError(str(error.full_key), None, f"a value that resolves ({error.msg})") from None
    assert isinstance(plain, dict)
    for key in plain:
        require(key in SECTIONS, str(key), plain[key], f"one of the sections {', '.join(SECTIONS)}")
    sections = {name: build_dataclass(cls, plain.get(name, {}), name) for name, cls in SECTIONS.items()}
    return TrainConfig(**sections)


def summary(result) -> str:
    params = result.params
    lines = [
        f"trained {result.step} steps, {result.tokens:,} tokens, {result.elapsed_s:.0f} s"
        + (" (stopped early)" if result.stopped_early else ""),
        f"loss {result.loss:.4f}, validation loss {result.val_loss:.4f} (perplexity {math.exp(result.val_loss):.2f})",
        f"parameters {params['params']:,} ({params['params_non_embedding']:,} non-embedding"
        + (f"; {params['params_unused']:,} unused CLA K/V projections left out)" if params["params_unused"] else ")"),
        f"checkpoint {result.out_dir / 'checkpoint'} (model=hf model.path=...), log {result.out_dir / 'loss.jsonl'}",
    ]
    return "\n".join(lines)


def main() -> None:
    status: list[int] = []

    @hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="train")
    def app(cfg: DictConfig) -> None:
        try:
            config = build(cfg)
            from kvbench.train.loop import train  # torch and transformers: only for good input

            print(summary(train(config)))
            status.append(0)
        except ConfigError as error:
            report(error)
            status.append(2)

    try:
        app()
    except KeyboardInterrupt:
        print(
            "kvbench.train: interrupted; the last checkpoint is kept: rerun the same command to resume from it",
            file=sys.stderr,
        )
        sys.exit(130)
    sys.exit(max(status, default=0))


if __name__ == "__main__":
    main()

"""`python -m kvbench [overrides]` — the Hydra app. `-m` sweeps (multirun)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kvbench.errors import ConfigError
from kvbench.run import run

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def app(cfg: DictConfig) -> None:
    choices = HydraConfig.get().runtime.choices
    names = {group: choices[group] for group in ("model", "method", "task") if group in choices}
    try:
        run(cfg, names)
    except ConfigError as error:
        if cfg.kvbench.debug:
            raise
        print(f"kvbench: error: {error}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

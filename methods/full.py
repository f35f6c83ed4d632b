"""The uncompressed baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.cache import FullLayer, KVLayer, LayerSpec
from kvbench.method import Method


@dataclass
class Full(Method):
    """No compression: a dense cache preallocated for the prompt and every decode token.

    Attention never expands KV heads (SDPA with `enable_gqa`), so this is the efficient dense baseline.
    `budget` is accepted so that a sweep over `method.budget` can include the baseline; it has no effect
    and is left out of the run's identity, so the sweep runs the baseline once.
    """

    budget: int | None = None

    compresses: ClassVar[bool] = False

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        return FullLayer(spec)

    def describe(self) -> dict:
        described = super().describe()
        described.pop("budget")
        return described

"""Cross-Layer Attention applied post hoc: layers in groups of `sharing` attend over the group's first layer's KV.

Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention", NeurIPS 2024,
arXiv 2405.12981.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.cache import FullLayer, KVLayer, LayerSpec, ModelSpec
from kvbench.errors import require
from kvbench.method import Method


@dataclass
class CLA(Method):
    """Cross-layer KV sharing on a model trained without it: an ablation, not the paper's setting.

    CLA (paper §2) groups adjacent layers by a sharing factor s: the first layer of each group computes and
    caches keys and values, the other layers keep their own query and output projections but attend over
    the first layer's keys and values and cache nothing, so KV bytes fall by about s. The paper trains its
    models with CLA from scratch (1B and 3B parameters) and finds s = 2 the best trade-off; it does not
    convert pretrained models. Applied to a pretrained model, as here, the consumer layers meet keys and
    values they were never trained on: expect a large loss. `kvbench.train` trains models with it natively
    (their config's `kvbench_kv_sharing`; every method then shares, see `Method.kv_producer`).

    `sharing`: s (1 reproduces the dense cache). `exempt_layers`: the first N layers keep their own keys and
    values and the groups of s start after them, which restricts sharing to the upper layers, where the
    post-hoc literature (MiniCache, arXiv 2405.14366) finds adjacent layers' KV most alike. The last group
    may be shorter than s. Producers keep the full dense cache. `budget` is accepted so that sweeps over
    `method.budget` can include this method; it has no effect and is left out of the run's identity.

    Deviations from the paper: the sharing is imposed after training, not trained (above); the consumer
    layers' own key and value projections still run in the forward and their output is dropped (the paper
    removes them: here compute is unchanged and only the cache shrinks); with `exempt_layers`, groups start
    after the exempt layers rather than at layer 0.
    """

    sharing: int = 2
    budget: int | None = None

    positions_policy: ClassVar[str] = "original positions (post-RoPE keys, the producer's)"
    gqa_policy: ClassVar[str] = "KV heads kept; consumers read the producer's KV heads"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.sharing >= 1, "method.sharing", self.sharing, "an integer >= 1 (layers per group)")

    @property
    def exact(self) -> bool:
        """Whether this setting reproduces the dense cache (whatever the budget): only without sharing."""
        return self.sharing == 1

    def check(self, model: ModelSpec) -> None:
        require(
            self.sharing <= model.num_layers,
            "method.sharing",
            self.sharing,
            f"at most the model's {model.num_layers} layers",
        )
        require(
            model.kv_sharing == 1,
            "method.sharing",
            self.sharing,
            f"a model without native KV sharing; {model.name} already shares each group of {model.kv_sharing} "
            "layers (kvbench_kv_sharing in its config): use another method",
        )
        super().check(model)

    def kv_producer(self, layer_idx: int, model: ModelSpec) -> int:
        if layer_idx < self.exempt_layers:
            return layer_idx
        return layer_idx - (layer_idx - self.exempt_layers) % self.sharing

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        return FullLayer(spec)

    def describe(self) -> dict:
        described = super().describe()
        described.pop("budget")
        return {**described, "posthoc": True}

"""The method contract: a dataclass of hyper-parameters (filled by Hydra) that builds one generation's cache.

A method file subclasses `Method`, declares its hyper-parameters as dataclass fields, states its policies
as class variables, and implements `make_layer`. Nothing in the core knows a method by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from kvbench.cache import FullLayer, KVCache, KVLayer, LayerSpec, ModelSpec, SharedLayer
from kvbench.errors import require


@dataclass
class Method:
    """Base of every method. `exempt_layers`: the first N layers keep the full cache."""

    exempt_layers: int = 0

    # Policies every record carries (architecture guide, "The method contract").
    positions_policy: ClassVar[str] = "original positions (post-RoPE keys)"
    gqa_policy: ClassVar[str] = "per KV head"
    scores_question: ClassVar[str] = "n/a"  # whether the question is inside what the method scores
    compresses: ClassVar[bool] = True  # False only for the dense baseline

    def __post_init__(self) -> None:
        require(self.exempt_layers >= 0, "method.exempt_layers", self.exempt_layers, "an integer >= 0")

    def check(self, model: ModelSpec) -> None:
        """Checks that need the model's shape (read from its config, before weights load)."""
        require(
            self.exempt_layers <= model.num_layers,
            "method.exempt_layers",
            self.exempt_layers,
            f"at most the model's {model.num_layers} layers",
        )
        self.check_kv_sharing(model)

    def check_kv_sharing(self, model: ModelSpec) -> None:
        """Every layer that shares its keys and values must keep them where a `SharedLayer` can read them.

        The layer a method would make is built for a one-token generation (no tensors) and asked; unit RoPE
        frequencies stand in for the model's, which are unknown before it loads and change no layer's type.
        """
        inv_freq = torch.ones(model.head_dim // 2)
        for idx in range(model.num_layers):
            producer = self.kv_producer(idx, model)
            if producer == idx:
                continue
            layer = self.own_layer(LayerSpec(producer, model, 1, 1, 1, inv_freq))
            require(
                layer.decodes_from_slots(),
                "method",
                type(self).__name__,
                f"a method whose decode attention reads key/value slots: layer {idx} attends over layer "
                f"{producer}'s keys and values (kvbench_kv_sharing={model.kv_sharing}), which "
                f"{type(layer).__name__} keeps in another form",
            )

    def kv_producer(self, layer_idx: int, model: ModelSpec) -> int:
        """The layer whose keys and values layer `layer_idx` attends over (itself: it caches its own).

        Here: the model's own sharing, groups of `kv_sharing` layers from layer 0 whose first layer
        produces. Exempt layers follow it too: a model trained with sharing needs it whatever the method.
        """
        return layer_idx - layer_idx % model.kv_sharing

    def own_layer(self, spec: LayerSpec) -> KVLayer:
        """The cache of a layer that keeps its own keys and values: dense if exempt, else the method's."""
        return FullLayer(spec) if spec.layer_idx < self.exempt_layers else self.make_layer(spec)

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        raise NotImplementedError

    def make_cache(
        self,
        model: ModelSpec,
        prompt_len: int,
        decode_len: int,
        batch_size: int = 1,
        rope_inv_freq: torch.Tensor | None = None,
    ) -> KVCache:
        layers = []
        for idx in range(model.num_layers):
            spec = LayerSpec(idx, model, batch_size, prompt_len, decode_len, rope_inv_freq)
            producer = self.kv_producer(idx, model)
            layers.append(self.own_layer(spec) if producer == idx else SharedLayer(spec, producer))
        return KVCache(layers)

    def describe(self) -> dict:
        """Hyper-parameters and policies, as they go into the record."""
        return {
            **asdict(self),
            "positions_policy": self.positions_policy,
            "gqa_policy": self.gqa_policy,
            "scores_question": self.scores_question,
        }


def check_budget(budget: int, reserved: int, reserved_what: str) -> None:
    """A token budget per layer and KV head must be positive and leave room beyond what is always kept."""
    require(budget > 0, "method.budget", budget, "a positive number of tokens per layer and KV head")
    require(
        budget > reserved,
        "method.budget",
        budget,
        f"more than {reserved_what} ({reserved}), which are always kept",
    )


def check_budget_fits(budget: int, model: ModelSpec) -> None:
    require(
        budget <= model.max_positions,
        "method.budget",
        budget,
        f"at most the model's {model.max_positions} positions",
    )

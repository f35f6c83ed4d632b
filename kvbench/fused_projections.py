"""One matrix product for the projections that read the same input: q/k/v, and the MLP's gate/up.

At decode a layer's projections are matrix-vector products bound by reading their weights. Separate
products leave bandwidth unused where a matrix is small (the K/V projections of a GQA model, 8 MiB each
for Llama-3.1-8B, ran at about half the copy bandwidth on an H100: benchmarks/README.md, profile_step.py)
and cost a launch each. gpt-fast stores `wqkv` and `w1/w3` fused for the same reason. The weights are
concatenated once, and each member's parameters become views into the fused matrix, so the model holds
no second copy and its state dict keeps the same names and shapes.

transformers' attention and MLP forwards stay as they are: they still call `q_proj`, `k_proj`, `v_proj`
(and `gate_proj`, `up_proj`) in that order on the same input. The first member of a group computes the
whole product and keeps it for the others; each later member checks that it receives the very same input
tensor and returns its slice (a forward that called them in another order or on another input fails
loudly instead of computing something wrong). Each output element is the same dot product as before;
only the kernel that computes it changes, so results agree to float rounding, not bit for bit.

Fuse after the weights are final: a member's parameter replaced afterwards (not written in place) is not
seen by the fused product, which reads the group's own matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Handoff:
    """The last fused product of a group, from its first member to the later ones."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()


class FusedFirst(nn.Module):
    """The group's first projection: one product for every member; returns its own slice."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], handoff: _Handoff):
        super().__init__()
        # The state dict keeps this member's own rows under its own name; the whole matrix is a buffer
        # that is not saved (the parameters of every member are views into it).
        self.weight = nn.Parameter(weight[: sizes[0]], requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias[: sizes[0]], requires_grad=False)
        self.register_buffer("fused_weight", weight, persistent=False)
        self.register_buffer("fused_bias", bias, persistent=False)
        self.sizes = sizes
        self.handoff = handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = F.linear(x, self.fused_weight, self.fused_bias).split(self.sizes, dim=-1)
        self.handoff.input, self.handoff.parts = x, parts
        return parts[0]


class FusedPart(nn.Module):
    """A later projection of the group: its slice of the product the first member just made."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, index: int, handoff: _Handoff, last: bool):
        super().__init__()
        # A view into the fused weight: the parameter the model's state dict names, at no extra memory.
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.index, self.handoff, self.last = index, handoff, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handoff.input is not x:
            raise RuntimeError("fused projection called out of order or on another input than its group's first")
        part = self.handoff.parts[self.index]
        if self.last:  # drop the references so nothing outlives the forward
            self.handoff.input, self.handoff.parts = None, ()
        return part


def _fuse_group(parent: nn.Module, names: tuple[str, ...]) -> bool:
    linears = [getattr(parent, name, None) for name in names]
    if not all(type(linear) is nn.Linear for linear in linears):
        return False  # absent, already fused, or a subclass (e.g. quantized) we do not know how to merge
    if len({linear.in_features for linear in linears}) != 1 or len({linear.bias is None for linear in linears}) != 1:
        return False
    with torch.no_grad():
        weight = torch.cat([linear.weight for linear in linears])
        bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    sizes = [linear.out_features for linear in linears]
    handoff = _Handoff()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    setattr(parent, names[0], FusedFirst(weight, bias, sizes, handoff))
    for index in range(1, len(names)):
        rows = slice(starts[index], starts[index] + sizes[index])
        part_bias = None if bias is None else bias[rows]
        last = index == len(names) - 1
        setattr(parent, names[index], FusedPart(weight[rows], part_bias, index, handoff, last))
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of `model` in place; returns how many groups were fused (0 on a
    second call: already fused groups are left alone)."""
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            fused += _fuse_group(module, names)
    return fused

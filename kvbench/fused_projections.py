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

`one_row_kernels=True` also routes the products of a single row (the batch-1 decode step) through
`kvbench.gemv`: q/k/v, o and down as Triton GEMVs, and the MLP's gate/up with its SiLU product as one kernel
(the MLP module's forward is replaced on the instance for that; any other input takes the model's own
forward). Off by default: not yet timed in the compiled step.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from kvbench.gemv import is_one_row, one_row_linear, one_row_silu_mul

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
        self.one_row = False  # one-row inputs through kvbench.gemv (`set_one_row_kernels`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_row and self.fused_bias is None and is_one_row(x):
            product = one_row_linear(x, self.fused_weight)
        else:
            product = F.linear(x, self.fused_weight, self.fused_bias)
        parts = product.split(self.sizes, dim=-1)
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


def fuse_projections(model: nn.Module, one_row_kernels: bool = False) -> int:
    """Fuse every q/k/v and gate/up group of `model` in place and set whether one-row products go through
    `kvbench.gemv`; returns how many groups were fused (0 on a second call: fused groups are left alone)."""
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            fused += _fuse_group(module, names)
    set_one_row_kernels(model, one_row_kernels)
    return fused


ONE_ROW_LINEARS = ("o_proj", "down_proj")  # the plain projections after attention and the MLP's product


def set_one_row_kernels(model: nn.Module, enabled: bool) -> None:
    """Route a fused model's one-row products through `kvbench.gemv`, or back to the library products."""
    for module in list(model.modules()):
        if isinstance(module, FusedFirst):
            module.one_row = enabled
        for name in ONE_ROW_LINEARS:
            linear = getattr(module, name, None)
            if type(linear) is nn.Linear and linear.bias is None:
                _patch_forward(linear, _one_row_linear_forward if enabled else None)
        if _is_fused_silu_mlp(module):
            _patch_forward(module, _one_row_mlp_forward if enabled else None)


def _patch_forward(module: nn.Module, forward) -> None:
    """Replace a module instance's forward (None: back to its class's)."""
    if forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = types.MethodType(forward, module)


def _one_row_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return one_row_linear(x, self.weight) if is_one_row(x) else F.linear(x, self.weight)


def _is_fused_silu_mlp(module: nn.Module) -> bool:
    gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    return (
        isinstance(gate, FusedFirst)
        and isinstance(up, FusedPart)
        and gate.fused_bias is None
        and len(gate.sizes) == 2
        and gate.sizes[0] == gate.sizes[1]
        and isinstance(getattr(module, "down_proj", None), nn.Linear)
        and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
    )


def _one_row_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down(SiLU(gate x) * up x): one kernel for gate/up and the product on one row, else the model's own."""
    if is_one_row(x):
        return self.down_proj(one_row_silu_mul(x, self.gate_proj.fused_weight))
    return type(self).forward(self, x)

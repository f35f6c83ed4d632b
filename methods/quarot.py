"""QuaRot's KV-cache part: Hadamard-rotated keys and values, quantized per token and head; and plain RTN.

Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024, arXiv 2404.00456;
code spcl/QuaRot@5008669 (`fake_quant/rotation_utils.py`: `QKRotationWrapper`, `rotate_ov_proj`;
`fake_quant/quant_utils.py`: `ActQuantizer`; `quarot/transformers/kv_cache.py`: the int4 cache).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.cache import KVLayer, LayerSpec, ModelSpec
from kvbench.errors import require
from kvbench.hadamard import hadamard_matrix, hadamard_transform, is_power_of_two
from kvbench.quant import BITS
from kvbench.quantized_layer import QuantizedLayer, QuantizedMethod, QuantSpec, check_channel_group, check_clip

UNQUANTIZED = 16  # `bits` that turns quantization off: the rotations alone, for checking them


@dataclass
class QuaRot(QuantizedMethod):
    """Keys and queries rotated by an orthonormal Walsh-Hadamard matrix H (size head_dim) after RoPE, values
    rotated per head by the same H; then K and V quantized asymmetrically, round-to-nearest, `bits` bits
    per group of `group` channels of one token and KV head (QuaRot §4: "KV cache"). `rotate: false` is the
    un-rotated round-to-nearest ablation (`method=rtn`). `bits: 16` quantizes nothing: every token stays in
    the model's dtype, so only the rotations act (exact in exact arithmetic; a check, not a compressor).

    Implementation choice, value rotation: QuaRot folds H into `v_proj`'s output rows and `o_proj`'s input
    columns per head (`rotate_ov_proj`); kvbench methods build caches and leave weights alone, so the layer
    rotates each value as it is written and un-rotates each query head's attention output. With
    probabilities p_i, sum_i p_i (H v_i) = H o and H^-1 = H, so `o_proj` sees what the folded weights
    give it, up to float rounding (tested against a model with folded weights). On the GPU the query's
    rotation and the output's run inside the decode attention kernels (`packed_decode_attention`).

    Deviations from the paper/code:
    - Clipping: `clip_ratio` scales each group's minimum and maximum before the scale is computed, as the
      code's `find_params_per_token_groupwise` does. The code's default is 1.0 (no clipping); the
      maintainers say the paper's clip ratios must be passed to reproduce its numbers (spcl/QuaRot#55), and
      0.95 is the KV clip ratio that work built on QuaRot's scripts passes (e.g. IntactKV's QuaRot runs:
      `--k_clip_ratio 0.95 --v_clip_ratio 0.95`). The paper's own text was not re-read here.
    - Zero-point: a float16 zero (the clipped group minimum) and float16 scale, as QuaRot's int4 cache
      kernel stores them (`kv_cache.py`); the fake-quant code uses an integer zero, round(-min / scale).
    - Prefill attends to the prompt in full precision (as the int4 kernel path does) and the prompt is
      quantized at its end; each decode token is quantized when written and attends to its own quantized
      K/V. The paper's perplexities come from one forward in which every query sees quantized K/V
      (spcl/QuaRot#42), which is not this protocol.
    - `group` may be any divisor of head_dim (the code: head_dim, or -1 for the whole hidden width, which
      assumes as many KV heads as query heads and is not offered). head_dim must be a power of two for the
      rotation (the code asserts it too); no non-power-of-two fallback (QuaRot's had_K tables).
    - `rotate: false` rotates nothing. QuaRot's code rotates queries and keys whenever keys are quantized,
      with or without `--rotate` (which only adds the value/weight rotations); ours is plain RTN.
    - One `bits` for K and V (the code has k_bits and v_bits).
    """

    bits: int = 4
    group: int | None = None  # channels per quantization group; None: head_dim (one group per token and head)
    clip_ratio: float = 0.95
    rotate: bool = True

    gqa_policy: ClassVar[str] = "per KV head (the query heads of a group meet their KV head's rotated keys)"
    scores_question: ClassVar[str] = "n/a: keeps every token"

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed_bits = (*BITS, UNQUANTIZED)
        require(self.bits in allowed_bits, "method.bits", self.bits, f"one of {allowed_bits} (16: no quantization)")
        require(
            self.group is None or self.group >= 1,
            "method.group",
            self.group,
            "null (head_dim) or a positive divisor of head_dim",
        )
        check_clip("method.clip_ratio", self.clip_ratio)

    def check(self, model: ModelSpec) -> None:
        super().check(model)
        check_channel_group("method.group", self.group or model.head_dim, model.head_dim, self.bits)
        require(
            not self.rotate or is_power_of_two(model.head_dim),
            "method.rotate",
            self.rotate,
            f"false for this model: its head_dim ({model.head_dim}) is not a power of two, which the Walsh-Hadamard "
            "rotation needs",
        )

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        # bits 16 makes no store, so its QuantSpec is never used; 8 only keeps it valid.
        bits = self.bits if self.quantizes else 8
        quant = QuantSpec(bits, "token", self.group or spec.model.head_dim, self.clip_ratio)
        return QuaRotLayer(spec, quant, self.storage, self.rotate, self.quantizes)

    @property
    def quantizes(self) -> bool:
        return self.bits != UNQUANTIZED


class QuaRotLayer(QuantizedLayer):
    """With `rotate`, stores H k and H v (on the GPU a decode token's are rotated and quantized in one kernel,
    `kvbench.token_quant`; elsewhere the fast transform, then `quantize`); decode attention rotates the query to meet
    the keys and rotates its output back (H = H^-1; `decode_rotation` holds H as a +-1 matrix for that),
    inside the attention kernels on the GPU; prefill attends to the unrotated prompt in full precision.
    Without `quantizes` (bits 16) the full-precision window holds the whole generation, so no packed store
    exists, and the decode path (hooks, window attention, merge) is still the quantized layer's."""

    def __init__(self, spec: LayerSpec, quant: QuantSpec, storage: str, rotate: bool, quantizes: bool) -> None:
        window = 0 if quantizes else spec.prompt_len + spec.decode_len
        super().__init__(spec, quant, quant, window, storage)
        self.rotate, self.quantizes = rotate, quantizes

    def decode_rotation(self, dim: int, device: torch.device) -> torch.Tensor | None:
        return _sign_hadamard(dim, device) if self.rotate else None

    # The prompt's keys and values (and a decode token's where `kvbench.token_quant` does not run) by the
    # butterfly, not by a float32 product with the held matrix: in the compiled decode step cuBLAS ran that
    # [8, 128] x [128, 128] product in 52 us (an sm80 SIMT kernel; H200, profile_step.py).
    def transform_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return keys if self.rotation is None else hadamard_transform(keys)

    def transform_values(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.rotation is None else hadamard_transform(values)

    def quantize_prompt(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        if self.quantizes:
            return super().quantize_prompt(keys, values)
        self.parts = []
        return 0  # the whole prompt stays in the window

    def decode_variants(self) -> tuple[bool, ...]:
        if self.quantizes:  # no window: tokens are quantized as they are written, nothing to schedule
            return super().decode_variants()
        return (False,)  # the window has room for the whole generation: never due, so no step flushes


@functools.cache
def _sign_hadamard(dim: int, device: torch.device) -> torch.Tensor:
    """One +-1 Sylvester-Hadamard matrix per size and device, shared by every layer: int8 (16 KiB at head_dim
    128), exact in every float type and a quarter of float32's bytes for each attention program that reads
    it (every split program rotates its query: float32 made QuaRot's plane kernel 4 us a layer slower than
    RTN's, H200 profile)."""
    return hadamard_matrix(dim, dtype=torch.int8, device=device, normalized=False)

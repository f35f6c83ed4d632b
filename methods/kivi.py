"""KIVI: 2-bit (or 4-bit) KV cache, keys quantized per channel, values per token, recent tokens in full precision.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024, arXiv 2402.02750;
code jy-yuan/KIVI@876b4d2 (`models/llama_kivi.py`, `quant/`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.cache import KVLayer, LayerSpec, ModelSpec
from kvbench.errors import require
from kvbench.quantized_layer import QuantizedLayer, QuantizedMethod, QuantSpec, check_bits, check_channel_group


@dataclass
class KIVI(QuantizedMethod):
    """Keys: asymmetric per-channel quantization in groups of `group` tokens (paper §3: key outliers sit in
    fixed channels). Values: asymmetric per-token quantization in groups of `group` channels. The newest
    tokens stay in full precision (the residual, `window`). Both at `bits` bits, packed; scale and
    zero-point (the group minimum) in float16, as the code stores them. Paper defaults: group 32, window 128.

    Deviations from the code:
    - The code keeps keys and values in separate residuals: keys are flushed `window` at a time (0 to
      window - 1 keys in full precision), values one token at a time (always `window` in full precision).
      Here one window holds both: once it has more than `window` tokens, its oldest `group` tokens are
      quantized (keys per channel, values per token), so between window - group + 1 and window tokens are
      in full precision at each decode step. At the end of prefill all but the newest window - group + 1
      to window tokens are quantized, in whole groups.
    - The window lives in a fixed ring buffer of window + 1 slots in the model's dtype (the code: fp16
      tensors grown by concatenation), and the flush runs on the steps the host schedules (once every
      `group` steps per sequence), committed with a per-row mask (static decode step, two compiled
      variants: `kvbench.quantized_layer`).
    - Decode attention dequantizes in a flash-decoding kernel (`kvbench.quant_kernels`) rather than the
      code's quantized matmuls; prefill attends in full precision, as the code does.
    """

    bits: int = 2
    group: int = 32
    window: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits("method.bits", self.bits)
        require(self.group >= 1, "method.group", self.group, "an integer >= 1 (paper: 32)")
        require(
            self.window >= self.group,
            "method.window",
            self.window,
            f"at least method.group ({self.group}): keys are quantized a whole group of tokens at a time",
        )

    def check(self, model: ModelSpec) -> None:
        super().check(model)
        check_channel_group("method.group", self.group, model.head_dim, self.bits)

    def make_layer(self, spec: LayerSpec) -> KVLayer:
        keys = QuantSpec(self.bits, "channel", self.group)
        values = QuantSpec(self.bits, "token", self.group)
        return QuantizedLayer(spec, keys, values, self.window, self.storage)

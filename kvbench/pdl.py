"""Programmatic dependent launch (PDL) for the compiled decode step: an experiment, off by default, untimed.

On Hopper and later GPUs a kernel launched with PDL may be scheduled while the kernel before it in the
stream is still finishing; each of its programs first waits (`griddepcontrol.wait`) until that kernel has
completed and its writes are visible. A batch-1 decode step is ~10 small kernels a layer, and the gaps
between them (launch, ramp-up, the previous kernel's tail) are part of what keeps it above its floor
(`benchmarks/README.md`, "profile_step.py": ~10 us of idle a layer at batch 1). PDL hides part of each gap.

`Engine(pdl=True)` (`speed.py --pdl`) turns it on for `engine=compiled` on such a GPU only:
- Inductor's own kernels (norms, RoPE and cache writes, residual adds): `torch.compile(options=
  COMPILE_OPTIONS)`; Inductor places each kernel's wait itself.
- kvbench's step kernels: dense and packed decode attention with their combine, H2O's received attention
  (`kvbench.kernels`, `quant_kernels`: while `dependent_launches` is active their public functions call
  opaque twins of their operators, `kvbench.kernels.operator`, because Inductor cannot ask for the launch
  attribute for the kernels it launches itself) and QuaRot's and RTN's token quantization (`token_quant`),
  whose operator is opaque anyway. Triton's own launcher starts these kernels with the attribute, and every
  program of such a kernel waits first thing (`kvbench.kernels.await_previous_kernel`), then lets the next
  kernel launch.
cuBLAS, ATen and the other kvbench kernels (ArkVale's and Scissorhands' selection, host copies) launch as
before: each starts only once the kernel before it has finished, so no chain of waits is ever broken. A
kernel launched with PDL must wait before touching any memory, or it could read what its predecessor has
not yet written (or overwrite what it still reads); `launch_options` therefore asks for the launch and the
in-kernel wait together, or neither.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

COMPILE_OPTIONS = {"triton.enable_pdl": True}  # Inductor's switch (torch >= 2.10)
MIN_CAPABILITY = (9, 0)  # griddepcontrol: sm_90 and later

_active = False


def supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def check(enabled: bool, engine: str, device: torch.device) -> None:
    """Refuse `pdl=True` where it cannot apply (before any compile)."""
    if enabled and (engine != "compiled" or not supported(device)):
        raise ValueError(
            f"pdl=True: needs engine=compiled on a CUDA GPU of compute capability >= 9.0; "
            f"got engine={engine!r} on {device}"
        )


@contextlib.contextmanager
def dependent_launches(enabled: bool) -> Iterator[None]:
    """While active, kernels that support it (`launch_options`) launch with PDL."""
    global _active
    before, _active = _active, enabled
    try:
        yield
    finally:
        _active = before


def active() -> bool:
    return _active


def launch_options(device: torch.device) -> dict:
    """Extra arguments for a Triton launch whose kernel takes a `PDL: tl.constexpr` (waiting first thing when
    it is true): the wait and the launch attribute together, on a CUDA device while `dependent_launches` is
    active; otherwise neither (the interpreter and CPU tensors get the plain kernel)."""
    if _active and device.type == "cuda":
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}

"""Copies between device slot buffers and pinned host memory that a CUDA graph can capture.

ArkVale keeps every token in host memory and recalls pages that rank again. Which token is written, and
which pages come back, are decided on the device each step; a `torch` copy would need those indices on
the host first (a sync per layer per step) and cannot be captured. With unified virtual addressing, host
memory allocated by `cudaHostAlloc` (PyTorch's pinned memory) is directly readable and writable by
kernels at its host address, so two small Triton kernels move the bytes themselves: masked, so rows that
need no copy move nothing over PCIe, with static grids and no host sync.

The kernels are launched from opaque `torch.library` operators (`kvbench::write_rows`,
`kvbench::write_row_pairs`, `kvbench::gather_pages`, `kvbench::gather_page_pairs`) that mutate their
destination in place. Inductor would otherwise compile a user-defined Triton kernel itself, for the device
of its first tensor argument: the host buffer, a CPU tensor, for which Triton has no backend.

Elsewhere (CPU runs, no Triton) the same functions are plain `torch` ops on same-device tensors.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import weakref

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


# The gather's launch: rows of one (sequence, head) a program, and warps a program. `benchmarks/arkvale_parts.py`
# sweeps them: 16 or 32 rows, 2 to 8 warps all recall at the copy engine's PCIe rate on an H200.
GATHER_BLOCK_ROWS = 16
GATHER_WARPS = 4

# Under Triton's interpreter (TRITON_INTERPRET=1) the kernels run on CPU tensors: how the tests check them.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# cudaHostRegisterPortable | cudaHostRegisterMapped: page-locked for every device and mapped into their address
# space, so kernels reach it at its host address (unified virtual addressing).
_REGISTER_FLAGS = 1 | 2


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` copied into page-locked host memory of exactly its size (see `pinned_concat`)."""
    return pinned_concat([tensor])


def pinned_concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts)` (along the first dimension) in page-locked host memory of exactly its size, each
    part copied once into its place (a pageable `cat` first would be one more pass over the whole backup).

    Why not `Tensor.pin_memory()`: PyTorch's pinned allocator rounds every block up to a power of two, so a
    batch of 6 sequences of 30k tokens of a 7B MHA model (a 1.5 GB backup a layer for keys, one for values,
    30 ArkVale layers) takes 2.1 GB a tensor, 129 GB in all for 86 GiB of data, which bounds the batch that
    ArkVale fits in host memory. Here a private anonymous mapping of the tensor's size is registered with
    CUDA (`cudaHostRegister`) and unregistered once no tensor uses it.
    """
    first = parts[0]
    shape = (sum(part.shape[0] for part in parts), *first.shape[1:])
    numel = math.prod(shape)
    nbytes = numel * first.element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=first.dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # The tensor keeps this ctypes view alive and the view keeps the mapping: when the last tensor goes, the
    # view's finalizer unregisters the pages, and only then does the view release the mapping to be unmapped
    # (a finalizer on the mapping itself would run after the unmap).
    view = (ctypes.c_char * nbytes).from_buffer(mapping)
    address = ctypes.addressof(view)
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(address, nbytes, _REGISTER_FLAGS)
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed: {error}")
    # Not at interpreter exit: the process's memory goes back anyway, and unregistering ~100 GB takes time.
    weakref.finalize(view, cudart.cudaHostUnregister, address).atexit = False
    pinned = torch.frombuffer(view, dtype=first.dtype, count=numel).view(shape)
    start = 0
    for part in parts:
        pinned[start : start + part.shape[0]].copy_(part)
        start += part.shape[0]
    return pinned


def uses_kernels(host: torch.Tensor, device_tensor: torch.Tensor) -> bool:
    """Whether the copies between `host` and `device_tensor` go through the Triton kernels."""
    if triton is None:
        return False
    return INTERPRETED or (device_tensor.is_cuda and host.device.type == "cpu" and host.is_pinned())


def write_rows(
    hosts: tuple[torch.Tensor, ...],
    rows: torch.Tensor,
    sources: tuple[torch.Tensor, ...],
    through_kernels: bool | None = None,
) -> None:
    """host[b, h, rows[b]] = source[b, h, 0] for every sequence b and head h, for each (host, source) pair of
    `hosts` and `sources` (a layer's keys and values: one launch writes both).

    host [B, H, N, D] (pinned host memory, or the device's own), rows [B] int64, source [B, H, 1, D]. The
    kernel takes one or two pairs, both hosts of one shape and strides and both sources of one shape (each
    source with strides of its own: a layer's key and value differ there); other pairs run one launch each.
    `through_kernels`: `uses_kernels(hosts[0], sources[0])`, decided once by a caller inside a compiled step
    (`torch.compile` cannot trace `is_pinned`); None decides here.
    """
    b = sources[0].shape[0]
    if through_kernels is None:
        through_kernels = uses_kernels(hosts[0], sources[0])
    if not through_kernels:
        for host, source in zip(hosts, sources, strict=True):
            # Indexed assignment rather than scatter_: `torch.compile` keeps it in place (no buffer copy).
            batch = torch.arange(b, device=host.device)  # with rows [B]: one (sequence, row) pair each
            host[batch, :, rows.to(host.device)] = source[:, :, 0].to(host.device)
        return
    if any(t.stride(-1) != 1 for t in (*hosts, *sources)):
        raise ValueError("write_rows: the kernels need rows of D contiguous values in hosts and sources")
    # Both hosts of one layout (the kernel reads one set of host strides) and both sources of one shape: a
    # layer's key (RoPE's output) and value (a view of the projection) are alike in shape, not in strides.
    alike = (
        len(hosts) == 2
        and hosts[0].shape == hosts[1].shape
        and hosts[0].stride() == hosts[1].stride()
        and sources[0].shape == sources[1].shape
    )
    if alike:
        torch.ops.kvbench.write_row_pairs(hosts[0], hosts[1], rows, sources[0], sources[1])
        return
    for host, source in zip(hosts, sources, strict=True):
        torch.ops.kvbench.write_rows(host, rows, source)


def gather_pages(
    hosts: tuple[torch.Tensor, ...],
    targets: tuple[torch.Tensor, ...],
    positions: torch.Tensor,
    pages: torch.Tensor,
    slots: torch.Tensor,
    fetch: torch.Tensor,
    page_size: int,
    through_kernels: bool | None = None,
) -> None:
    """Recall whole pages: wherever fetch[b, g, r], page pages[b, g, r] (host rows [page * p, page * p + p),
    a backup indexed by position) goes into slot slots[b, g, r] (target rows [slot * p, slot * p + p)) for
    every KV head h of group g (h // (H / G)), in each (host, target) pair of `hosts` and `targets` (a
    layer's keys and values: one launch moves both), and positions[b, h, those rows] become the page's
    positions. Nothing else moves: a step that fetches nothing reads nothing from host memory.

    host [B, H, N, D], target [B, H, S, D] on the device; positions [B, H, S] int64; pages, slots [B, G, R]
    int64, fetch [B, G, R] bool or int8 (nonzero: fetch; `page_selection.select_pages` gives int8; its unfetched
    places may name page -1, never read). The kernel
    takes one or two pairs of equal shapes and strides; other pairs run one launch each, each writing the same
    positions. `through_kernels` as in `write_rows`.
    """
    b, h = positions.shape[:2]
    groups = pages.shape[1]
    if through_kernels is None:
        through_kernels = uses_kernels(hosts[0], targets[0])
    if not through_kernels:
        # Each head's rows: [B, G, R, p] -> [B, H, R * p], the group's pages for each of its heads.
        offsets = torch.arange(page_size, device=pages.device)

        def per_head(index: torch.Tensor) -> torch.Tensor:
            return index.flatten(2).unsqueeze(2).expand(-1, -1, h // groups, -1).reshape(b, h, -1)

        source_rows = per_head(pages.unsqueeze(-1) * page_size + offsets)
        target_rows = per_head(slots.unsqueeze(-1) * page_size + offsets)
        take = per_head(fetch.bool().unsqueeze(-1).expand(-1, -1, -1, page_size))
        batch = torch.arange(b, device=positions.device).view(b, 1, 1)
        heads = torch.arange(h, device=positions.device).view(1, h, 1)
        for host, target in zip(hosts, targets, strict=True):
            fetched = host[batch.to(host.device), heads.to(host.device), source_rows.to(host.device)]
            current = target[batch, heads, target_rows]
            target[batch, heads, target_rows] = torch.where(take.unsqueeze(-1), fetched.to(target.device), current)
        positions[batch, heads, target_rows] = torch.where(take, source_rows, positions[batch, heads, target_rows])
        return
    if any(t.stride(-1) != 1 for t in (*hosts, *targets)):
        raise ValueError("gather_pages: the kernels need rows of D contiguous values in hosts and targets")
    # The kernel reads the three page tensors with one set of strides.
    pages, slots, fetch = (t.contiguous() for t in (pages, slots, fetch))
    # Both hosts of one layout, both targets of one layout: the kernel reads one set of strides for each.
    alike = len(hosts) == 2 and all(
        first.shape == second.shape and first.stride() == second.stride() for first, second in (hosts, targets)
    )
    if alike:
        torch.ops.kvbench.gather_page_pairs(
            hosts[0], targets[0], hosts[1], targets[1], positions, pages, slots, fetch, page_size
        )
        return
    for host, target in zip(hosts, targets, strict=True):
        torch.ops.kvbench.gather_pages(host, target, positions, pages, slots, fetch, page_size)


if triton is not None:

    def _mutates_only(*args: object) -> None:
        """The operators' fake implementation: they return nothing and only write their mutated arguments."""
        return None

    def _launch_write(
        host: torch.Tensor,
        second_host: torch.Tensor | None,
        rows: torch.Tensor,
        source: torch.Tensor,
        second_source: torch.Tensor | None,
    ) -> None:
        b, h, _, d = source.shape
        pair = second_host is not None
        second = second_source if pair else source
        _write_rows_kernel[(b * h,)](
            host, second_host if pair else host, rows, source, second, h,
            host.stride(0), host.stride(1), host.stride(2), source.stride(0), source.stride(1),
            second.stride(0), second.stride(1), D=d, BLOCK_D=triton.next_power_of_2(d), PAIR=pair,
        )  # fmt: skip

    # Two operators over one launch, as for the gathers below.
    @torch.library.custom_op("kvbench::write_rows", mutates_args=("host",))
    def _write_rows_op(host: torch.Tensor, rows: torch.Tensor, source: torch.Tensor) -> None:
        _launch_write(host, None, rows, source, None)

    _write_rows_op.register_fake(_mutates_only)

    @torch.library.custom_op("kvbench::write_row_pairs", mutates_args=("host", "second_host"))
    def _write_row_pairs_op(
        host: torch.Tensor,
        second_host: torch.Tensor,
        rows: torch.Tensor,
        source: torch.Tensor,
        second_source: torch.Tensor,
    ) -> None:
        _launch_write(host, second_host, rows, source, second_source)

    _write_row_pairs_op.register_fake(_mutates_only)

    def _launch_gather(
        host: torch.Tensor,
        target: torch.Tensor,
        second_host: torch.Tensor | None,
        second_target: torch.Tensor | None,
        positions: torch.Tensor,
        pages: torch.Tensor,
        slots: torch.Tensor,
        fetch: torch.Tensor,
        page_size: int,
    ) -> None:
        b, h = positions.shape[:2]
        groups, recalled = pages.shape[1:]
        pair = second_host is not None
        rows = recalled * page_size
        _gather_pages_kernel[(b * h, triton.cdiv(rows, GATHER_BLOCK_ROWS))](
            host, target, second_host if pair else host, second_target if pair else target, positions,
            pages, slots, fetch, h, h // groups, groups, recalled, page_size, rows,
            host.stride(0), host.stride(1), host.stride(2), target.stride(0), target.stride(1), target.stride(2),
            positions.stride(0), positions.stride(1), positions.stride(2),
            D=target.shape[-1], BLOCK_M=GATHER_BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(target.shape[-1]),
            PAIR=pair, num_warps=GATHER_WARPS,
        )  # fmt: skip

    # Two operators over one launch: a single pair cannot go through the pair operator as both of its pairs
    # (one tensor passed as two mutated arguments aliases itself, which torch.library refuses to trace).
    @torch.library.custom_op("kvbench::gather_pages", mutates_args=("target", "positions"))
    def _gather_pages_op(
        host: torch.Tensor,
        target: torch.Tensor,
        positions: torch.Tensor,
        pages: torch.Tensor,
        slots: torch.Tensor,
        fetch: torch.Tensor,
        page_size: int,
    ) -> None:
        _launch_gather(host, target, None, None, positions, pages, slots, fetch, page_size)

    _gather_pages_op.register_fake(_mutates_only)

    @torch.library.custom_op("kvbench::gather_page_pairs", mutates_args=("target", "second_target", "positions"))
    def _gather_page_pairs_op(
        host: torch.Tensor,
        target: torch.Tensor,
        second_host: torch.Tensor,
        second_target: torch.Tensor,
        positions: torch.Tensor,
        pages: torch.Tensor,
        slots: torch.Tensor,
        fetch: torch.Tensor,
        page_size: int,
    ) -> None:
        _launch_gather(host, target, second_host, second_target, positions, pages, slots, fetch, page_size)

    _gather_page_pairs_op.register_fake(_mutates_only)

    @triton.jit
    def _write_rows_kernel(
        host, second_host, rows, source, second_source, heads, host_sb, host_sh, host_sn, source_sb, source_sh,
        second_sb, second_sh, D: tl.constexpr, BLOCK_D: tl.constexpr, PAIR: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        # int64 offsets: a batch's backup passes 2^31 elements from 16 sequences of 30k tokens of a 7B MHA layer.
        b, h = (pid // heads).to(tl.int64), (pid % heads).to(tl.int64)
        row = tl.load(rows + b)
        cols = tl.arange(0, BLOCK_D)
        written = b * host_sb + h * host_sh + row * host_sn + cols
        value = tl.load(source + b * source_sb + h * source_sh + cols, mask=cols < D)
        if PAIR:  # both loads before either store
            second = tl.load(second_source + b * second_sb + h * second_sh + cols, mask=cols < D)
        tl.store(host + written, value, mask=cols < D)
        if PAIR:  # after the first host's store, as the PyTorch loop writes them
            tl.store(second_host + written, second, mask=cols < D)

    @triton.jit
    def _gather_pages_kernel(
        host, target, second_host, second_target, positions, pages, slots, fetch,
        heads, heads_per_group, groups, recalled, page_size, rows,
        host_sb, host_sh, host_sn, target_sb, target_sh, target_sn, pos_sb, pos_sh, pos_sn,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PAIR: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        # int64 offsets: a batch's backup passes 2^31 elements from 16 sequences of 30k tokens of a 7B MHA layer.
        b, h = (pid // heads).to(tl.int64), pid % heads
        offsets = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this head's recalled pages
        in_range = offsets < rows
        # Row m is row m % p of the group's m // p-th page (pages, slots and fetch are contiguous [B, G, R]).
        index = (b * groups + h // heads_per_group) * recalled + offsets // page_size
        wanted = tl.load(fetch + index, mask=in_range, other=0) != 0
        within = offsets % page_size
        source = tl.load(pages + index, mask=wanted, other=0) * page_size + within
        dest = tl.load(slots + index, mask=wanted, other=0) * page_size + within
        cols = tl.arange(0, BLOCK_D)
        both = wanted[:, None] & (cols[None, :] < D)
        # Rows not taken load nothing: a step that recalls no page reads nothing from host memory. Both
        # pairs' loads are issued before either store, so twice the bytes are in flight over PCIe.
        read = b * host_sb + h * host_sh + source[:, None] * host_sn + cols[None, :]
        written = b * target_sb + h * target_sh + dest[:, None] * target_sn + cols[None, :]
        value = tl.load(host + read, mask=both)
        if PAIR:
            second = tl.load(second_host + read, mask=both)
            tl.store(second_target + written, second, mask=both)
        tl.store(target + written, value, mask=both)
        tl.store(positions + b * pos_sb + h * pos_sh + dest * pos_sn, source, mask=wanted)

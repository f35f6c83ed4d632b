"""Offline instruction counts of the plane kernel's tile loop for sm_90 (no GPU needed).

    PYTHONPATH=. python benchmarks/plane_sass.py                               # token mode, every variant
    PYTHONPATH=/path/to/triton-3.6:. python benchmarks/plane_sass.py --modes token halves
    PYTHONPATH=. python benchmarks/plane_sass.py --modes lead --variants zero_sums --warps 1 2   # ZipCache
    PYTHONPATH=. python benchmarks/plane_sass.py --modes lead halves --variants default zero_sums --bits 2
    PYTHONPATH=. python benchmarks/plane_sass.py --modes halves --variants default default_query_first --bits 2
    PYTHONPATH=. python benchmarks/plane_sass.py --modes halves --bits 2 4 --window   # registers as KIVI's step
    PYTHONPATH=. python benchmarks/plane_sass.py --modes halves --bits 2 --window --lines 10   # by source line

Compiles `kvbench.plane_kernel._plane_split_kernel` with Triton's bundled ptxas for sm_90, specialising the
integer arguments as Triton's launcher does at run time for the benchmark's launch (Llama-3.1-8B shape,
batch 1, 32k slots: strides that are multiples of 16 and 16-byte-aligned pointers marked divisible by 16,
arguments equal to 1 made constants), at 4 bits (16-bit elements) or 2 (bytes; `--bits`), under the
launch's register cap (KIVI's "halves": `halves_max_registers`). Without that
specialisation the codes load 16 bits at a time and the counts are ~60% higher than what runs. Prints, per
variant, the SASS instructions in the largest loop (the tile loop) per warp, registers, local-memory (spill)
operations, and the loop's instructions by class; with `--lines N`, the N source lines that take the most of
the loop's instructions (nvdisasm's line markers; an inline-PTX conversion shows at its call's last line).
The products take the operands in the launch's order (`plane_kernel.CODES_FIRST_KEY_MODES`: the codes first
for "token" and "halves"); variants ending in _codes_first or _query_first choose it.
Counts depend on the Triton version (the GPU image has 3.6; put its wheel first on PYTHONPATH to match).
Instructions are not time: the kernel is bound by latency as much as by issue (benchmarks/README.md,
"Where the plane kernel's instructions go"); `quant_attention.py` times the variants on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from kvbench import plane_kernel
from kvbench.quant_kernels import LaunchConfig

try:  # where Triton keeps its argument specialisation (3.6 and 3.7)
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # pragma: no cover - other Triton versions
    native_specialize_impl = None

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
HKV, HQ, D, SLOTS = 8, 32, 128, 32768
# key mode: (K_ROW_TOKENS, K_GROUP, V_GROUP, key parameter row stride, value parameter row stride)
MODES = {
    "token": (1, D, D, 1, 1),  # QuaRot / RTN: one scale and zero-point per token, K and V
    "halves": (32, 1, 32, D, 4),  # KIVI-4: per-channel key rows of 32 tokens, values in groups of 32
    "rows": (32, 1, 32, D, 4),  # the same, keys dequantized per slot
    "row": (32, 1, 32, D, 4),  # the same in tiles of one row (`--block-n 32`): one fold a tile
    "lead": (60, 1, D, D, 1),  # ZipCache's 4-bit set: row 0 over the prompt, decode rows of 60; values per token
}
VARIANTS = {"default": {}, "zero_sums": {"ZERO_SUMS": True}, "offset": {"ZERO_SUMS": True, "OFFSET": 128.0}}
VARIANTS["weighted"] = VARIANTS["offset"] | {"WEIGHTED": True}  # 2-bit codes masked in place (`weighted_crumbs`)
# ZipCache's prompt-set keys as offset codes (`lead_offset_keys`); its values take one zero-point a slot
VARIANTS["offset_keys"] = VARIANTS["zero_sums"] | {"K_OFFSET": 128.0}
# QuaRot's: the query rotated in the prologue, its planes kept in the products' layout (ROTATE 1) or reloaded
# (2, `reload_rotated_query`), per-token codes
for name in ("offset", "weighted"):
    VARIANTS[f"{name}_rotated"] = VARIANTS[name] | {"ROTATE": 1}
    VARIANTS[f"{name}_reloaded"] = VARIANTS[name] | {"ROTATE": 2}
# Where each variant's algebra holds: (key modes, key code widths, value code widths); `main` skips the rest.
ANY = (2, 4)
SCOPE = {
    "default": (tuple(MODES), ANY, ANY),
    "zero_sums": (("token", "lead"), ANY, ANY),  # one value zero-point per slot
    "offset": (("token",), ANY, ANY),
    "weighted": (("token",), (2,), (2,)),
    "offset_keys": (("lead",), ANY, ANY),
    "offset_rotated": (("token",), ANY, ANY),
    "offset_reloaded": (("token",), ANY, ANY),
    "weighted_rotated": (("token",), (2,), (2,)),
    "weighted_reloaded": (("token",), (2,), (2,)),
}
VARIANTS |= {f"{name}_unmasked": flags | {"UNMASKED": True} for name, flags in VARIANTS.items()}  # inner tiles
# the products' operands in either order (the launch's: `plane_kernel.CODES_FIRST_KEY_MODES`)
VARIANTS |= {
    f"{name}_{order}_first": flags | {"CODES_FIRST": order == "codes"}
    for name, flags in VARIANTS.items()
    for order in ("codes", "query")
}
CLASSES = [
    ("mma", r"^HMMA"), ("shared", r"^(LDS|STS|LDSM)"), ("shuffle", r"^SHFL"), ("global", r"^(LDG|STG|LDGSTS)"),
    ("barrier", r"^(BAR|DEPBAR|LDGDEPBAR)"), ("logic/shift", r"^(LOP3|SHF|PRMT)"), ("half2", r"^H(ADD|FMA|MUL)2"),
    ("convert", r"^(F2F|F2FP|I2F|F2I)"), ("float32", r"^(FFMA|FMUL|FADD|FMNMX|FSEL|FSETP|MUFU)"),
    ("integer", r"^(IMAD|IADD3|LEA|ISETP|SEL|VIADD|IMNMX)"),
]  # fmt: skip
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")
LABEL = re.compile(r"^\s*\.?(L_x_\d+|LBB\d+_\d+):")
BACK_BRANCH = re.compile(r"BRA\s+.*?`?\(?\.?(L_x_\d+|LBB\d+_\d+)")
SOURCE_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')  # nvdisasm -g: the source of what follows


def argument_values(mode: str) -> dict[str, int]:
    """The integer arguments of the benchmark's launch (batch 1; codes of D/4 elements per slot)."""
    row_tokens, _, _, key_row_stride, value_row_stride = MODES[mode]
    key_rows = SLOTS // row_tokens + 1
    elements = D // 4
    values = {"num_kv_heads": HKV, "group": HQ // HKV, "stride_qb": HQ * D, "stride_qh": D}
    values |= {"stride_kcb": HKV * SLOTS * elements, "stride_kch": SLOTS * elements, "stride_kcs": elements}
    values |= {"stride_vcb": HKV * SLOTS * elements, "stride_vch": SLOTS * elements, "stride_vcs": elements}
    values |= {"stride_ksb": HKV * key_rows * key_row_stride, "stride_ksh": key_rows * key_row_stride}
    values |= {"stride_vsb": HKV * SLOTS * value_row_stride, "stride_vsh": SLOTS * value_row_stride}
    values |= {"stride_ksr": key_row_stride, "stride_vsr": value_row_stride}
    return values


def compile_plane(
    mode: str,
    variant: str,
    num_warps: int,
    bits: int = 4,
    block_n: int = 64,
    value_bits: int = 0,
    block_g: int = 0,
    window: bool = False,
):
    """The plane kernel for `mode` and `variant`; codes of `bits` (`value_bits` for the values, if given), at
    `block_g` query rows a tile (0: the default launch's), with the window's program (a ring) if `window`."""
    value_bits = value_bits or bits
    launch = plane_kernel.plane_launch(LaunchConfig(), False, mode, 1, 1)
    if not block_g:  # the default launch's query rows for this key mode and the shape's group
        block_g = plane_kernel.query_block(launch, HQ // HKV)
    kernel = plane_kernel._plane_split_kernel
    row_tokens, k_group, v_group, _, _ = MODES[mode]
    pointers = {"q_ptr": "*bf16", "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "rotation_ptr": "*i8"}
    elements = "*i16" if bits == 4 else "*u8"  # four codes: a 16-bit word or a byte
    pointers |= {"kc_ptr": elements, "vc_ptr": "*i16" if value_bits == 4 else "*u8"}
    pointers |= {"wk_ptr": "*bf16", "wv_ptr": "*bf16", "wpos_ptr": "*i64"}
    pointers["wq_ptr"] = "*i64"
    pointers |= {name: "*fp16" for name in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")}
    pointers |= {name: "*i64" for name in ("k_lead_ptr", "v_lead_ptr", "len_ptr")}
    floats = {"scale_log2": "fp32", "rotation_scale": "fp32"}
    constexprs = {
        "HEAD_DIM": D, "VALUE_DIM": D, "K_BITS": bits, "K_ROW_TOKENS": row_tokens, "K_GROUP": k_group, "K_MODE": mode,
        "V_BITS": value_bits, "V_GROUP": v_group, "BLOCK_G": block_g, "BLOCK_N": block_n, "BLOCK_W": D // 4,
        "BLOCK_WV": D // 4,
        "DTYPE": tl.bfloat16, "K_DTYPE": tl.float16 if mode in plane_kernel.DEQUANTIZED_KEY_MODES else tl.bfloat16,
        "K_ASM": True,
        "V_ASM": True, "HAS_WINDOW": window, "ROTATE": 0, "PRECISION": "tf32", "ZERO_SUMS": False,
        "OFFSET": 0.0, "WEIGHTED": False, "K_OFFSET": 0.0, "WINDOW_RING": window, "UNMASKED": False,
        "CODES_FIRST": launch.codes_first,
    } | VARIANTS[variant]  # fmt: skip
    # the window's tile as the launch chooses it for the products' order
    constexprs["BLOCK_NW"] = plane_kernel.window_block(
        replace(launch, codes_first=constexprs["CODES_FIRST"], block_n=block_n)
    )
    values = argument_values(mode)
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name], attrs[(index,)] = pointers[name], [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = floats[name]
        elif name in values and native_specialize_impl is not None:
            kind, spec = native_specialize_impl(CUDABackend, values[name], False, True, True)
            if kind == "constexpr":  # an argument equal to 1
                signature[name], constexprs[name] = "constexpr", spec
            else:
                signature[name] = kind
                if spec == "D":
                    attrs[(index,)] = [["tt.divisibility", 16]]
        else:  # split sizes and counts: not specialised (do_not_specialize) or per-call
            signature[name] = "i32"
    positions = {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}
    source = ASTSource(kernel, signature, constexprs=positions, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": 2}
    # the register cap of the launch in the variant's order of the products (KIVI's codes-first "halves":
    # `halves_max_registers`; the query rows first: none)
    ordered = plane_kernel.plane_launch(
        replace(LaunchConfig(), codes_first=constexprs["CODES_FIRST"]), False, mode, 1, 1
    )
    if ordered.max_registers:
        options["maxnreg"] = ordered.max_registers
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def loop_spans(sass: str) -> list[tuple[int, int]]:
    """Each loop (a backward branch to a label above it) as its first and last line of `sass`, in program order."""
    labels, found = {}, []
    for i, line in enumerate(sass.splitlines()):
        if match := LABEL.search(line):
            labels[match.group(1)] = i
        if (match := BACK_BRANCH.search(line)) and labels.get(match.group(1), i) < i:
            found.append((labels[match.group(1)], i))
    return found


def loops(sass: str) -> list[list[str]]:
    """The opcodes of each loop, in program order."""
    lines = sass.splitlines()
    return [[m.group(1) for m in map(INSTRUCTION.search, lines[a : b + 1]) if m] for a, b in loop_spans(sass)]


def instruction_class(opcode: str) -> str:
    return next((name for name, pattern in CLASSES if re.search(pattern, opcode)), "other")


def tile_loop_sources(sass: str) -> dict[tuple[str, int], collections.Counter]:
    """The largest loop's instructions by the source line they come from (nvdisasm -g's markers; inlined
    functions name their own lines), each line's by class: where a tile's instructions go."""
    lines = sass.splitlines()
    spans = loop_spans(sass)
    if not spans:
        return {}
    first, last = max(spans, key=lambda span: sum(bool(INSTRUCTION.search(x)) for x in lines[span[0] : span[1] + 1]))
    source = None  # the marker in force at the loop's start: the last one above it
    for line in lines[:first]:
        if match := SOURCE_LINE.search(line):
            source = (Path(match.group(1)).name, int(match.group(2)))
    by_line: dict[tuple[str, int], collections.Counter] = collections.defaultdict(collections.Counter)
    for line in lines[first : last + 1]:
        if match := SOURCE_LINE.search(line):
            source = (Path(match.group(1)).name, int(match.group(2)))
        elif match := INSTRUCTION.search(line):
            by_line[source][instruction_class(match.group(1))] += 1
    return dict(by_line)


def tile_loop(sass: str) -> list[str]:
    """The opcodes of the largest loop (the tile loop; "lead" has two, the prompt's and the decode blocks')."""
    return max(loops(sass), key=len, default=[])


def measure(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([BIN / "nvdisasm", "-c", "-g", cubin.name], capture_output=True, text=True).stdout
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin.name], capture_output=True, text=True).stdout
    loop = tile_loop(sass)
    spills = re.compile(r"^(LDL|STL)")
    classes = collections.Counter(map(instruction_class, loop))
    return {
        "loop": len(loop),
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "spill_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        # every loop of 16 or more instructions: (instructions, spill operations inside it)
        "loops": [(len(body), sum(map(bool, map(spills.match, body)))) for body in loops(sass) if len(body) >= 16],
        "classes": dict(classes.most_common()),
        "sources": tile_loop_sources(sass),
    }


def source_text(file: str, number: int) -> str:
    """The source line, for kvbench's own files (Triton's language functions are named, not shown)."""
    path = Path(plane_kernel.__file__).parent / file
    if not path.is_file():
        return ""
    lines = path.read_text().splitlines()
    return lines[number - 1].strip()[:80] if 0 < number <= len(lines) else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["token"], choices=list(MODES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--warps", type=int, nargs="+", default=[2])
    parser.add_argument("--bits", type=int, nargs="+", default=[4], choices=[2, 4])
    parser.add_argument("--block-n", type=int, default=64, help="slots a tile (mode row: 32)")
    parser.add_argument("--window", action="store_true", help="with the window's program (a ring), as KIVI's step")
    parser.add_argument("--value-bits", type=int, default=0, choices=[0, 2, 4], help="values' bits (0: --bits)")
    parser.add_argument(
        "--block-g", type=int, nargs="+", default=[0], help="query rows a tile, a power of two (0: the launch's)"
    )
    parser.add_argument("--lines", type=int, default=0, help="also the tile loop's N costliest source lines")
    args = parser.parse_args()
    if native_specialize_impl is None:
        print("this Triton has no native_specialize_impl: counts without argument specialisation")
    print(f"triton {triton.__version__}, sm_90, {args.block_n}-slot tiles; loop = SASS instructions per warp and tile")
    for mode in args.modes:
        for variant in args.variants:
            # the unmasked inner tiles' loop is one of `loops`; codes first changes only the products
            base = variant.removesuffix("_codes_first").removesuffix("_query_first").removesuffix("_unmasked")
            modes, key_widths, value_widths = SCOPE[base]
            if mode not in modes:
                continue
            for bits, warps, block_g in itertools.product(args.bits, args.warps, args.block_g):
                if bits not in key_widths or (args.value_bits or bits) not in value_widths:
                    continue
                m = measure(
                    compile_plane(mode, variant, warps, bits, args.block_n, args.value_bits, block_g, args.window)
                )
                widths = f"{bits}/{args.value_bits or bits} bits"
                rows = block_g or "default"
                print(f"{mode:<7}{variant:<22} {widths} {warps} warps {rows:>2} rows: loop {m['loop']:5d}  "
                      f"registers {m['registers']:3d}  spill ops {m['spill_ops']:3d}  loops {m['loops']}  "
                      f"{m['classes']}")  # fmt: skip
                costliest = sorted(m["sources"].items(), key=lambda item: -sum(item[1].values()))[: args.lines]
                for (file, number), classes in costliest:
                    text = source_text(file, number)
                    print(f"    {sum(classes.values()):5d}  {file}:{number:<5} {dict(classes.most_common())}  {text}")


if __name__ == "__main__":
    main()

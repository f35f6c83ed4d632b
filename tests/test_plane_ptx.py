"""The plane kernel's code conversions (`kvbench/plane_kernel.py`'s inline PTX) run only compiled for a GPU; the
interpreter takes the integer path instead. Here each conversion's PTX literal is read from its source and run by
a small emulator of the five instructions it uses (prmt, lop3, shr, mov, sub on 16-bit pairs), over every byte or
word value, against the values the kernel's algebra expects: offset + weight * code, plane by plane."""

import ast
import inspect
import re
import textwrap

import numpy as np
import pytest

pytest.importorskip("triton")
from kvbench import plane_kernel

MASK32 = 0xFFFFFFFF


def _ptx_of(name: str) -> tuple[str, int]:
    """The PTX literal of `plane_kernel.<name>` and its count of outputs."""
    function = getattr(plane_kernel, name)
    tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(function, "fn", function))))
    call = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "inline_asm_elementwise"
    )
    code, constraints = (argument.value for argument in call.args[:2])
    return code, constraints.count("=r")


def _halves_to_floats(word: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A 32-bit register's two 16-bit halves (low, high) as float64 values of `dtype`."""
    halves = [(word & 0xFFFF).astype(np.uint16), (word >> 16).astype(np.uint16)]
    if dtype == "f16":
        return tuple(h.view(np.float16).astype(np.float64) for h in halves)
    return tuple((h.astype(np.uint32) << 16).view(np.float32).astype(np.float64) for h in halves)


def _floats_to_halves(low: np.ndarray, high: np.ndarray, dtype: str) -> np.ndarray:
    """Two exact values per register back to 16-bit halves (the subtracts' results are small integers)."""
    bits = []
    for v in (low, high):
        if dtype == "f16":
            assert np.array_equal(v.astype(np.float16).astype(np.float64), v)
            bits.append(v.astype(np.float16).view(np.uint16).astype(np.uint32))
        else:
            single = v.astype(np.float32).view(np.uint32)
            assert np.array_equal(single.view(np.float32).astype(np.float64), v) and not (single & 0xFFFF).any()
            bits.append(single >> 16)
    return (bits[0] | (bits[1] << 16)).astype(np.uint32)


def _run_ptx(code: str, outputs: int, word: np.ndarray) -> list[np.ndarray]:
    """Emulate the PTX on every input `word` (uint32): its input is operand $outputs, its results $0...$N-1."""
    regs: dict[str, np.ndarray] = {f"${outputs}": word.astype(np.uint64)}

    def value(operand: str) -> np.ndarray | int:
        operand = operand.strip()
        if operand in regs:
            return regs[operand]
        return int(operand, 0)

    body = code.strip().strip("{}")
    for statement in (s.strip() for s in body.split(";")):
        if not statement or statement.startswith(".reg"):
            continue
        op, rest = statement.split(None, 1)
        dest, *args = [a.strip() for a in rest.split(",")]
        a = [value(x) for x in args]
        if op == "mov.b32":
            result = np.full_like(word, a[0], dtype=np.uint64)
        elif op == "shr.b32":  # .b32: logical
            result = (np.asarray(a[0], dtype=np.uint64) & MASK32) >> a[1]
        elif op == "prmt.b32":  # result byte i = byte (sel nibble i & 7) of {b, a}; no sign modes used here
            pool = (np.asarray(a[0], dtype=np.uint64) & MASK32) | ((np.asarray(a[1], dtype=np.uint64) & MASK32) << 32)
            result = np.zeros_like(word, dtype=np.uint64)
            for i in range(4):
                nibble = (a[2] >> (4 * i)) & 0xF
                assert nibble < 8, "sign-replicating selectors are not emulated"
                result |= ((pool >> (8 * nibble)) & 0xFF) << (8 * i)
        elif op == "lop3.b32":  # bit = lut[(a << 2) | (b << 1) | c]
            x, y, z = (np.asarray(v, dtype=np.uint64) & MASK32 for v in a[:3])
            result = np.zeros_like(word, dtype=np.uint64)
            for i in range(8):
                if (a[3] >> i) & 1:
                    result |= (x if i & 4 else ~x) & (y if i & 2 else ~y) & (z if i & 1 else ~z) & MASK32
        elif subtract := re.fullmatch(r"sub\.rn\.(bf16|f16)x2", op):  # exact here: small integers
            la, ha = _halves_to_floats(np.asarray(a[0]).astype(np.uint32), subtract.group(1))
            lb, hb = _halves_to_floats(np.asarray(a[1]).astype(np.uint32), subtract.group(1))
            result = _floats_to_halves(la - lb, ha - hb, subtract.group(1)).astype(np.uint64)
        else:
            raise AssertionError(f"instruction {op} is not emulated")
        regs[dest] = result & MASK32
    return [regs[f"${i}"].astype(np.uint32) for i in range(outputs)]


# name: (bits, dtype, offset, plane weights)
CONVERSIONS = {
    "_bf16_nibbles": (4, "bf16", 0, (1, 1, 1, 1)),
    "_f16_nibbles": (4, "f16", 0, (1, 1, 1, 1)),
    "_bf16_offset_nibbles": (4, "bf16", 128, (1, 1, 1, 1)),
    "_f16_offset_nibbles": (4, "f16", 1024, (1, 1, 1, 1)),
    "_bf16_crumbs": (2, "bf16", 0, (1, 1, 1, 1)),
    "_f16_crumbs": (2, "f16", 0, (1, 1, 1, 1)),
    "_bf16_offset_crumbs": (2, "bf16", 128, (1, 1, 1, 1)),
    "_f16_offset_crumbs": (2, "f16", 1024, (1, 1, 1, 1)),
    # plane 3's weight is the kernels' rule (`_weighted_plane3`: 16 for bfloat16, 64 for float16)
    "_bf16_weighted_crumbs": (2, "bf16", 128, (1, 4, 16, plane_kernel._weighted_plane3(128.0))),
    "_f16_weighted_crumbs": (2, "f16", 1024, (1, 4, 16, plane_kernel._weighted_plane3(1024.0))),
}


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_a_conversions_ptx_gives_offset_plus_weight_times_code(name: str) -> None:
    """Every element value: 4-bit words (two int16 elements a register, one register a plane) and 2-bit bytes
    (four uint8 elements a register, two registers a plane, elements 0-1 then 2-3). The weighted forms' weights
    are what `_plane_codes`' integer path and `_plane_split`'s WEIGHTED algebra divide out."""
    bits, dtype, offset, weights = CONVERSIONS[name]
    code, outputs = _ptx_of(name)
    assert outputs == (4 if bits == 4 else 8)
    rng = np.random.default_rng(0)
    width = 16 if bits == 4 else 8
    values = np.arange(1 << width, dtype=np.uint64)
    for position in range(32 // width):  # each element position takes every value, the others random
        word = rng.integers(0, 1 << 32, size=values.size, dtype=np.uint64)
        word &= ~np.uint64(((1 << width) - 1) << (width * position))
        word |= values << (width * position)
        results = _run_ptx(code, outputs, word.astype(np.uint32))
        elements = [(word >> (width * e)) & ((1 << width) - 1) for e in range(32 // width)]
        registers_a_plane = outputs // 4
        for plane in range(4):
            got = []
            for r in range(registers_a_plane):
                got += list(_halves_to_floats(results[plane * registers_a_plane + r], dtype))
            for e, element in enumerate(elements):
                code_values = ((element >> (bits * plane)) & ((1 << bits) - 1)).astype(np.float64)
                expected = offset + weights[plane] * code_values
                assert np.array_equal(got[e], expected), (name, plane, e)
